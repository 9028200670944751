"""Helpers for tests that start real servers on 127.0.0.1: free ports and a throwaway redis-server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary_or_skip(name: str, require_variable: str, purpose: str) -> str:
    """The path of the program `name` (also looked for in the sbin folders); the test is skipped when it is
    absent, or fails when `require_variable` is 1 (CI installs it and sets the variable)."""
    binary = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        reason = f"{name} is not installed (apt-get install {name}) to {purpose}"
        if os.environ.get(require_variable) == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


def redis_binary_or_skip() -> str:
    return binary_or_skip("redis-server", "MULTITALK_REQUIRE_REDIS", "test the Redis backend")


def wait_for_redis(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    """Return once the redis-server `server` answers at `url`; fail the test if it exits or does not answer in time."""
    import redis

    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"redis-server did not start for {url}")
                time.sleep(0.02)
    finally:
        client.close()


@contextmanager
def running_redis() -> Iterator[str]:
    """A redis-server without persistence on a free port; yields its URL."""
    binary = redis_binary_or_skip()
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for_redis(url, server, timeout_s=10)
        yield url
    finally:
        server.terminate()
        server.wait(10)

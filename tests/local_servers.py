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


def redis_binary_or_skip() -> str:
    """redis-server's path; skipped when absent, a failure under MULTITALK_REQUIRE_REDIS=1 (CI)."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not on PATH (apt-get install redis-server) to test the Redis backend"
        if os.environ.get("MULTITALK_REQUIRE_REDIS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


@contextmanager
def running_redis() -> Iterator[str]:
    """A redis-server without persistence on a free port; yields its URL."""
    import redis

    binary = redis_binary_or_skip()
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"redis-server did not start on port {port}")
                time.sleep(0.02)
        yield url
    finally:
        client.close()
        server.terminate()
        server.wait(10)

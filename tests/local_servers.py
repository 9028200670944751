"""Helpers for tests that start real servers on 127.0.0.1: free ports, a throwaway redis-server and S3 server."""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary_or_skip(name: str, require_variable: str, purpose: str, install: str | None = None) -> str:
    """The path of the program `name` (also looked for in the sbin folders); the test is skipped when it is
    absent, or fails when `require_variable` is 1 (CI installs it and sets the variable)."""
    binary = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        reason = f"{name} is not installed ({install or f'apt-get install {name}'}) to {purpose}"
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


# Credentials and region for the test S3 server (it accepts any); set for the test process and its servers.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def running_s3() -> Iterator[str]:
    """moto's standalone S3-compatible server, in memory, on a free port; yields its endpoint URL."""
    import httpx

    binary = binary_or_skip("moto_server", "MULTITALK_REQUIRE_S3", "test the S3 file store",
                            install="pip install 'moto[server]'")
    port = free_port()
    server = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail(f"moto_server did not start at {url}")
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(10)


class _WebhookReceiver(BaseHTTPRequestHandler):
    deliveries: queue.Queue

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        self.deliveries.put((dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@contextmanager
def receiving_webhooks(port: int | None = None) -> Iterator[tuple[str, queue.Queue]]:
    """An HTTP server taking webhooks on `port` (a free one by default); yields its URL and a queue of
    (headers, body) per delivery."""
    deliveries: queue.Queue = queue.Queue()
    handler = type("Receiver", (_WebhookReceiver,), {"deliveries": deliveries})
    server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", deliveries
    finally:
        server.shutdown()
        server.server_close()

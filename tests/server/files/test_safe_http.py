"""safe_http on its own: address classification, vetting's two failure types, and the pinned request
(input fetching and webhooks test it through their callers: test_input_fetch.py, test_webhooks.py)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from server.files import safe_http
from server.files.safe_http import Refused, Unreachable, is_allowed_host, is_ip_literal, is_public_address


@pytest.mark.parametrize(
    "address, public",
    [
        ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True), ("2002:808:808::", True),
        ("::ffff:127.0.0.1", False), ("64:ff9b::7f00:1", False), ("2002:c0a8:101::", False),
        ("64:ff9b::a9fe:a9fe", False),
    ],
)  # fmt: skip
def test_embedded_ipv4_forms_are_judged_by_the_ipv4_address(address, public):
    assert is_public_address(address) is public


@pytest.mark.parametrize("host, literal", [("10.0.0.1", True), ("::1", True), ("media.example", False), ("", False)])
def test_ip_literals(host, literal):
    assert is_ip_literal(host) is literal


def test_allowed_hosts_compare_without_case_or_trailing_dot():
    assert is_allowed_host("Media.Example.", {"media.example"})
    assert is_allowed_host("media.example", {"MEDIA.EXAMPLE."})
    assert not is_allowed_host("other.example", {"media.example"})


def _fake_dns(monkeypatch, answers: dict[str, list[str]]) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    monkeypatch.setattr(safe_http, "resolve", resolve)


def _vet(url: str, allowed_hosts=frozenset(), lookup_timeout: float = 5.0) -> list[str]:
    return asyncio.run(
        safe_http.vetted_addresses(httpx.URL(url), allowed_hosts=allowed_hosts, lookup_timeout=lookup_timeout)
    )


def test_one_private_record_refuses_the_name(monkeypatch):
    _fake_dns(monkeypatch, {"media.example": ["93.184.216.34", "10.0.0.5"]})
    with pytest.raises(Refused) as refused:
        _vet("http://media.example/a.png")
    assert refused.value.reason == "points to a private or local network address (10.0.0.5), which is not allowed"
    assert _vet("http://media.example/a.png", {"10.0.0.5"}) == ["93.184.216.34", "10.0.0.5"]  # that address allowed
    assert _vet("http://media.example/a.png", {"media.example"}) == ["93.184.216.34", "10.0.0.5"]  # the name allowed


def test_unresolvable_names_are_unreachable_not_refused(monkeypatch):
    async def no_such_name(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(safe_http, "resolve", no_such_name)
    with pytest.raises(Unreachable) as unreachable:
        _vet("http://no-such-host.invalid/")
    assert unreachable.value.reason == "could not reach no-such-host.invalid: the host name does not resolve"

    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["93.184.216.34"]

    monkeypatch.setattr(safe_http, "resolve", slow)
    with pytest.raises(Unreachable) as unreachable:
        _vet("http://slow.example/", lookup_timeout=0.05)
    assert unreachable.value.reason == "could not reach slow.example: the name lookup timed out"


class _Recorder(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append((self.command, self.headers["Host"], body))
        self.send_response(302)  # a redirect the pinned request must hand back, not follow
        self.send_header("Location", "http://10.0.0.1/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def _post(url: str, addresses: list[str]) -> int:
    headers = {"Host": "evil.example", "Content-Type": "text/plain"}
    async with safe_http.pinned_request(
        "POST", httpx.URL(url), addresses, headers=headers, timeout=httpx.Timeout(5), content=b"hello"
    ) as response:
        return response.status_code


def test_pinned_request_goes_to_the_first_accepting_address_with_the_original_host(recorder):
    port = recorder.server_address[1]
    # Nothing listens on 127.0.0.2 (the server is bound to 127.0.0.1 only): refused, so the next address is tried.
    status = asyncio.run(_post(f"http://receiver.example:{port}/hook", ["127.0.0.2", "127.0.0.1"]))
    assert status == 302
    assert recorder.seen == [("POST", f"receiver.example:{port}", b"hello")]


def test_pinned_request_raises_the_connect_error_when_no_address_accepts(recorder):
    port = recorder.server_address[1]
    with pytest.raises(httpx.ConnectError):
        asyncio.run(_post(f"http://receiver.example:{port}/hook", ["127.0.0.2", "127.0.0.3"]))
    assert recorder.seen == []

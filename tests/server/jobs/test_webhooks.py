"""Webhooks: fal's payload shapes, the HMAC signature, and delivery to a real HTTP receiver on 127.0.0.1
(retries with identical bodies, giving up, timeouts, redirects not followed, private addresses refused,
prompt shutdown)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from server.files.fetch import FetchSettings
from server.jobs.store import COMPLETED, Job
from server.jobs.webhooks import (
    REQUEST_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookSender,
    check_webhook_url,
    encode,
    signature_headers,
    verify_signature,
    webhook_payload,
)

from local_servers import free_port

SECRET = "test-secret"
LOCAL = FetchSettings(allowed_hosts={"127.0.0.1"})
OUTPUT = {"video": {"url": "http://127.0.0.1/files/v.mp4", "content_type": "video/mp4", "file_name": "v.mp4",
                    "file_size": 1234}, "seed": 81}
INPUT_ERROR = {"detail": [{"loc": ["body", "image_url"], "msg": "image_url: the file is empty", "type": "value_error"}]}
FAILURE = {"detail": "generation failed: RuntimeError: boom", "error_type": "internal_error"}


def completed(outcome: str = "OK", result: dict | None = None, error: str | None = None,
              error_type: str | None = None, webhook_url: str | None = None) -> Job:
    return Job(id="req-1", app="fal-ai/ai-avatar/multi", input={}, created_at=0.0, status=COMPLETED, outcome=outcome,
               result=result, error=error, error_type=error_type, webhook_url=webhook_url)


def ok_job(webhook_url: str | None = None) -> Job:
    return completed(result={"status_code": 200, "body": OUTPUT}, webhook_url=webhook_url)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def logged(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "multitalk.webhooks" and words in r.getMessage()]


# -- payloads -----------------------------------------------------------------------------------


def test_ok_payload_is_the_model_output():
    assert webhook_payload(ok_job()) == {"request_id": "req-1", "gateway_request_id": "req-1", "status": "OK",
                                         "payload": OUTPUT, "error": None}


@pytest.mark.parametrize("status_code, body", [(422, INPUT_ERROR), (500, FAILURE)])
def test_error_payload_is_the_stored_error_body(status_code, body):
    job = completed("ERROR", {"status_code": status_code, "body": body}, "some error", "value_error")
    assert webhook_payload(job) == {"request_id": "req-1", "gateway_request_id": "req-1", "status": "ERROR",
                                    "payload": body, "error": f"Invalid status code: {status_code}"}


@pytest.mark.parametrize("error, error_type", [(None, None), ("the request was cancelled", "client_cancelled")])
def test_cancelled_payload(error, error_type):
    """Cancelled while queued (no error stored) or while running (the worker's words): the same message."""
    message = webhook_payload(completed("CANCELLED", error=error, error_type=error_type))
    assert message["status"] == "ERROR"
    assert message["error"] == "the request was cancelled"
    assert message["payload"] == {"detail": "the request was cancelled", "error_type": "client_cancelled"}


def test_error_without_a_result_body_uses_the_job_error():
    lost = "the worker running this job stopped responding on each of its 2 attempts"
    message = webhook_payload(completed("ERROR", error=lost, error_type="WorkerLost"))
    assert message["error"] == lost
    assert message["payload"] == {"detail": lost, "error_type": "WorkerLost"}


def test_payload_that_is_not_strict_json_is_replaced_by_payload_error():
    message = webhook_payload(completed(result={"status_code": 200, "body": {"seed": float("nan")}}))
    assert message["payload"] is None
    assert "could not be serialised as JSON" in message["payload_error"]
    json.loads(encode(message))


def test_a_job_that_has_not_completed_has_no_payload():
    with pytest.raises(ValueError, match="has not completed"):
        webhook_payload(Job(id="req-1", app="a", input={}, created_at=0.0))


# -- signatures ---------------------------------------------------------------------------------


def test_signature_verifies_and_rejects_tampering():
    body = encode(webhook_payload(ok_job()))
    headers = signature_headers(SECRET, body, now=1_000_000)
    assert verify_signature(SECRET, body, headers, now=1_000_000 + 299)
    assert verify_signature(SECRET, body, {name.upper(): value for name, value in headers.items()}, now=1_000_000)
    assert not verify_signature(SECRET, body.replace(b"81", b"82"), headers, now=1_000_000)
    assert not verify_signature("another-secret", body, headers, now=1_000_000)
    assert not verify_signature(SECRET, body, headers, now=1_000_000 + 301)  # replayed too late
    assert not verify_signature(SECRET, body, headers, now=1_000_000 - 301)
    assert not verify_signature(SECRET, body, {TIMESTAMP_HEADER: headers[TIMESTAMP_HEADER]}, now=1_000_000)
    assert not verify_signature(SECRET, body, {}, now=1_000_000)
    assert not verify_signature(SECRET, body, {**headers, TIMESTAMP_HEADER: "\u00b2"}, now=1_000_000)


def test_signature_covers_the_timestamp():
    body = encode(webhook_payload(ok_job()))
    headers = {**signature_headers(SECRET, body, now=1_000_000), TIMESTAMP_HEADER: "1000100"}
    assert not verify_signature(SECRET, body, headers, now=1_000_100)


# -- URL checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url, reason", [
    ("ftp://example.com/hook", "scheme must be http or https"),
    ("example.com/hook", "not an absolute URL"),
    ("http:///hook", "no host"),
    ("http://[::1", "not a valid URL"),
    ("http://127.0.0.1:8000/hook", "private or local network address (127.0.0.1)"),
    ("http://169.254.169.254/latest", "private or local network address"),
    ("http://[::1]/hook", "private or local network address (::1)"),
])  # fmt: skip
def test_unusable_webhook_urls(url, reason):
    assert reason in check_webhook_url(url)


def test_usable_webhook_urls():
    assert check_webhook_url("https://example.com/hooks/fal?token=x") is None
    assert check_webhook_url("http://127.0.0.1:8000/hook", {"127.0.0.1"}) is None


# -- delivery -----------------------------------------------------------------------------------


@dataclass
class Receiver:
    """What the test receiver saw, and what it answers next (200 once the script runs out)."""

    url: str
    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        receiver: Receiver = self.server.receiver
        body = self.rfile.read(int(self.headers["Content-Length"]))
        receiver.requests.append((dict(self.headers.items()), body))
        time.sleep(receiver.delay_s)
        status = receiver.statuses.pop(0) if receiver.statuses else 200
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
    server.daemon_threads = True
    server.receiver = Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.receiver
    server.shutdown()
    server.server_close()


@pytest.fixture
def make_sender() -> Iterator[Callable[..., WebhookSender]]:
    senders = []

    def make(secret: str | None = SECRET, **options) -> WebhookSender:
        options = {"first_backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5, "fetch_settings": LOCAL, **options}
        senders.append(WebhookSender(secret, **options))
        return senders[-1]

    yield make
    for sender in senders:
        sender.close(1)


def test_signed_delivery(receiver, make_sender, caplog):
    caplog.set_level(logging.INFO, logger="multitalk.webhooks")
    job = ok_job(receiver.url)
    make_sender().send(job)
    wait_for(lambda: receiver.requests)
    headers, body = receiver.requests[0]
    assert json.loads(body) == webhook_payload(job)
    assert headers["Content-Type"] == "application/json"
    assert headers[REQUEST_ID_HEADER] == "req-1"
    assert verify_signature(SECRET, body, headers)
    wait_for(lambda: logged(caplog, "webhook delivered request_id=req-1 attempt=1"))


def test_unsigned_delivery_has_no_signature_headers(receiver, make_sender):
    make_sender(secret=None).send(ok_job(receiver.url))
    wait_for(lambda: receiver.requests)
    headers = {name.lower() for name in receiver.requests[0][0]}
    assert REQUEST_ID_HEADER in headers
    assert SIGNATURE_HEADER not in headers and TIMESTAMP_HEADER not in headers


def test_job_without_webhook_url_sends_nothing(receiver, make_sender):
    sender = make_sender()
    sender.send(ok_job(None))
    sender.close(1)
    assert receiver.requests == []


def test_retries_until_delivered_with_identical_bodies(receiver, make_sender, caplog):
    caplog.set_level(logging.INFO, logger="multitalk.webhooks")
    receiver.statuses = [500, 500, 200]
    make_sender().send(completed("ERROR", {"status_code": 500, "body": FAILURE}, webhook_url=receiver.url))
    wait_for(lambda: logged(caplog, "webhook delivered"))
    assert len(receiver.requests) == 3
    assert len({body for _, body in receiver.requests}) == 1
    assert all(verify_signature(SECRET, body, headers) for headers, body in receiver.requests)
    assert len(logged(caplog, "webhook failed request_id=req-1")) == 2
    assert logged(caplog, "webhook delivered request_id=req-1 attempt=3")


def test_gives_up_after_the_last_attempt(receiver, make_sender, caplog):
    receiver.statuses = [503] * 10
    make_sender(attempts=3).send(ok_job(receiver.url))
    wait_for(lambda: logged(caplog, "webhook gave up"))
    assert logged(caplog, "webhook gave up request_id=req-1 attempt=3")[0].endswith("the receiver answered 503")
    assert len(receiver.requests) == 3


def test_connection_errors_and_timeouts_are_retried(receiver, make_sender, caplog):
    receiver.delay_s = 1.0
    sender = make_sender(attempts=2, timeout_s=0.2)
    started = time.monotonic()
    sender.send(ok_job(receiver.url))
    assert time.monotonic() - started < 0.1  # the job never waits for the receiver
    wait_for(lambda: logged(caplog, "webhook gave up"))
    assert "ReadTimeout" in logged(caplog, "webhook failed request_id=req-1 attempt=1")[0]
    nobody = f"http://127.0.0.1:{free_port()}/hook"
    caplog.clear()
    make_sender(attempts=2).send(ok_job(nobody))
    wait_for(lambda: logged(caplog, "webhook gave up"))
    assert "ConnectError" in logged(caplog, "webhook gave up request_id=req-1 attempt=2")[0]


def test_redirects_are_not_followed(receiver, make_sender, caplog):
    receiver.statuses = [302]
    make_sender(attempts=1).send(ok_job(receiver.url))
    wait_for(lambda: logged(caplog, "webhook gave up"))
    assert [headers["Host"] for headers, _ in receiver.requests] == [receiver.url.split("/")[2]]


def test_private_address_refused_unless_allowed(receiver, make_sender, caplog):
    make_sender(fetch_settings=FetchSettings()).send(ok_job(receiver.url))
    wait_for(lambda: logged(caplog, "webhook refused"))
    assert "private or local network address (127.0.0.1)" in logged(caplog, "webhook refused request_id=req-1")[0]
    time.sleep(0.2)  # a refusal is final: no retry comes
    assert receiver.requests == []
    assert len(logged(caplog, "webhook refused")) == 1


def test_close_returns_promptly_and_drops_pending_retries(receiver, make_sender, caplog):
    receiver.statuses = [500]
    sender = make_sender(first_backoff_s=60, max_backoff_s=60)
    sender.send(ok_job(receiver.url))
    wait_for(lambda: logged(caplog, "webhook failed"))
    started = time.monotonic()
    sender.close(5)
    assert time.monotonic() - started < 1
    assert logged(caplog, "webhook abandoned request_id=req-1 attempt=1")
    sender.send(ok_job(receiver.url))
    assert logged(caplog, "webhook dropped request_id=req-1")
    assert len(receiver.requests) == 1

"""Webhooks: fal's payload shapes, the HMAC signature, and delivery from the job store's outbox to real
HTTP receivers on 127.0.0.1 (retries with identical bodies, giving up, timeouts, redirects not followed,
private addresses refused, a hanging receiver delaying no other, retries surviving a restart, two
senders on one store making each attempt once, prompt shutdown)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from server.files.fetch import FetchSettings
from server.jobs import JobStore, open_job_store
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
    """What the test receiver saw, and what it answers next (200 once the script runs out). A
    receiver with delay_s answers that late, or when the test ends."""

    url: str
    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        receiver: Receiver = self.server.receiver
        body = self.rfile.read(int(self.headers["Content-Length"]))
        receiver.requests.append((dict(self.headers.items()), body))
        receiver.released.wait(receiver.delay_s)
        status = receiver.statuses.pop(0) if receiver.statuses else 200
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def make_receiver() -> Iterator[Callable[[], Receiver]]:
    servers = []

    def make() -> Receiver:
        server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
        server.daemon_threads = True
        server.receiver = Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook")
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server.receiver

    yield make
    for server in servers:
        server.receiver.released.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver(make_receiver) -> Receiver:
    return make_receiver()


@pytest.fixture
def jobs(tmp_path) -> Iterator[JobStore]:
    """A SQLite job store, for the tests that do not depend on the backend."""
    store = open_job_store(None, tmp_path)
    yield store
    store.close()


@pytest.fixture
def make_sender() -> Iterator[Callable[..., WebhookSender]]:
    senders = []

    def make(store: JobStore, secret: str | None = SECRET, **options) -> WebhookSender:
        options = {"first_backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5, "fetch_settings": LOCAL,
                   "poll_s": 0.05, **options}
        senders.append(WebhookSender(store, secret, **options))
        return senders[-1]

    yield make
    for sender in senders:
        sender.close(1)


def complete(store: JobStore, webhook_url: str | None, outcome: str = "OK",
             result: dict | None = None) -> str:
    """A job run by a worker to `outcome`; its id."""
    job = store.submit("fal-ai/ai-avatar/multi", {}, webhook_url=webhook_url)
    assert store.claim("w1", 60).id == job.id
    store.finish(job.id, "w1", outcome, {"status_code": 200, "body": OUTPUT} if result is None else result)
    return job.id


def webhook_state(store: JobStore, id: str) -> str | None:
    return store.get(id).webhook_state


def test_signed_delivery(jobs, receiver, make_sender, caplog):
    caplog.set_level(logging.INFO, logger="multitalk.webhooks")
    id = complete(jobs, receiver.url)
    make_sender(jobs)
    wait_for(lambda: webhook_state(jobs, id) == "delivered")
    [(headers, body)] = receiver.requests
    assert json.loads(body) == webhook_payload(jobs.get(id))
    assert headers["Content-Type"] == "application/json"
    assert headers[REQUEST_ID_HEADER] == id
    assert verify_signature(SECRET, body, headers)
    assert logged(caplog, f"webhook delivered request_id={id} attempt=1")


def test_unsigned_delivery_has_no_signature_headers(jobs, receiver, make_sender):
    complete(jobs, receiver.url)
    make_sender(jobs, secret=None)
    wait_for(lambda: receiver.requests)
    headers = {name.lower() for name in receiver.requests[0][0]}
    assert REQUEST_ID_HEADER in headers
    assert SIGNATURE_HEADER not in headers and TIMESTAMP_HEADER not in headers


def test_job_without_webhook_url_sends_nothing(jobs, receiver, make_sender):
    id = complete(jobs, None)
    sender = make_sender(jobs)
    sender.wake()
    time.sleep(0.2)
    sender.close(1)
    assert receiver.requests == [] and webhook_state(jobs, id) is None


def test_retries_until_delivered_with_identical_bodies(jobs, receiver, make_sender, caplog):
    caplog.set_level(logging.INFO, logger="multitalk.webhooks")
    receiver.statuses = [500, 500, 200]
    id = complete(jobs, receiver.url, "ERROR", {"status_code": 500, "body": FAILURE})
    make_sender(jobs)
    wait_for(lambda: webhook_state(jobs, id) == "delivered")
    assert len(receiver.requests) == 3 and jobs.get(id).webhook_attempts == 3
    assert len({body for _, body in receiver.requests}) == 1
    assert all(verify_signature(SECRET, body, headers) for headers, body in receiver.requests)
    assert len(logged(caplog, f"webhook failed request_id={id}")) == 2
    assert logged(caplog, f"webhook delivered request_id={id} attempt=3")


def test_gives_up_after_the_last_attempt(jobs, receiver, make_sender, caplog):
    receiver.statuses = [503] * 10
    id = complete(jobs, receiver.url)
    make_sender(jobs, attempts=3)
    wait_for(lambda: webhook_state(jobs, id) == "failed")
    assert logged(caplog, f"webhook gave up request_id={id} attempt=3")[0].endswith("the receiver answered 503")
    assert len(receiver.requests) == 3


def test_connection_errors_and_timeouts_are_retried(jobs, receiver, make_sender, caplog):
    receiver.delay_s = 1.0
    slow = complete(jobs, receiver.url)
    make_sender(jobs, attempts=2, timeout_s=0.2)
    wait_for(lambda: webhook_state(jobs, slow) == "failed")
    assert "ReadTimeout" in logged(caplog, f"webhook failed request_id={slow} attempt=1")[0]
    nobody = complete(jobs, f"http://127.0.0.1:{free_port()}/hook")
    wait_for(lambda: webhook_state(jobs, nobody) == "failed")
    assert "ConnectError" in logged(caplog, f"webhook gave up request_id={nobody} attempt=2")[0]


def test_redirects_are_not_followed(jobs, receiver, make_sender):
    receiver.statuses = [302]
    id = complete(jobs, receiver.url)
    make_sender(jobs, attempts=1)
    wait_for(lambda: webhook_state(jobs, id) == "failed")
    assert [headers["Host"] for headers, _ in receiver.requests] == [receiver.url.split("/")[2]]


def test_private_address_refused_unless_allowed(jobs, receiver, make_sender, caplog):
    id = complete(jobs, receiver.url)
    make_sender(jobs, fetch_settings=FetchSettings())
    wait_for(lambda: webhook_state(jobs, id) == "failed")
    assert "private or local network address (127.0.0.1)" in logged(caplog, f"webhook refused request_id={id}")[0]
    assert jobs.get(id).webhook_attempts == 1, "a refusal is final: no retry comes"
    assert receiver.requests == []


def test_a_hanging_receiver_delays_no_other_receivers_webhook(jobs, make_receiver, make_sender):
    """One thread used to post every webhook: a receiver taking timeout_s per attempt held all the others."""
    hanging, healthy = make_receiver(), make_receiver()
    hanging.delay_s = 60
    stuck = [complete(jobs, hanging.url) for _ in range(3)]  # due first, and more than its host's slots
    other = complete(jobs, healthy.url)
    sender = make_sender(jobs, timeout_s=30, max_per_host=2)
    wait_for(lambda: webhook_state(jobs, other) == "delivered")
    assert len(hanging.requests) == 2, "the hanging host holds its own two slots, no more"
    started = time.monotonic()
    sender.close(5)
    assert time.monotonic() - started < 5, "close does not wait for the hanging receiver"
    assert {webhook_state(jobs, id) for id in stuck} == {"pending"}, "interrupted attempts are made again later"


def _retry_waits_in_the_store(store: JobStore, id: str) -> bool:
    """The first attempt failed and its retry is scheduled (due within the backoff, not the hold)."""
    job = store.get(id)
    return job.webhook_attempts == 1 and job.webhook_due_at is not None and job.webhook_due_at < time.time() + 5


def test_a_retry_waiting_in_the_store_is_delivered_after_a_restart(spec, receiver, make_sender):
    receiver.statuses = [500]
    store = open_job_store(*spec)
    id = complete(store, receiver.url, "ERROR", {"status_code": 500, "body": FAILURE})
    sender = make_sender(store, first_backoff_s=1, max_backoff_s=1)
    wait_for(lambda: _retry_waits_in_the_store(store, id))
    sender.close(1)
    store.close()
    assert len(receiver.requests) == 1
    restarted = open_job_store(*spec)
    make_sender(restarted)
    wait_for(lambda: webhook_state(restarted, id) == "delivered")
    (first_headers, first_body), (headers, body) = receiver.requests
    assert body == first_body == encode(webhook_payload(restarted.get(id))), "the same bytes across the restart"
    assert verify_signature(SECRET, first_body, first_headers) and verify_signature(SECRET, body, headers)
    assert restarted.get(id).webhook_attempts == 2
    restarted.close()


def test_two_senders_on_one_store_make_each_attempt_once(spec, receiver, make_sender):
    first, second = open_job_store(*spec), open_job_store(*spec)
    ids = [complete(first, receiver.url) for _ in range(12)]
    receiver.statuses = [500] * 4  # a few retries as well
    make_sender(first)
    make_sender(second)
    wait_for(lambda: all(webhook_state(first, id) == "delivered" for id in ids))
    sent = Counter(headers[REQUEST_ID_HEADER] for headers, _ in receiver.requests)
    assert sent == {id: first.get(id).webhook_attempts for id in ids}
    assert sum(sent.values()) == len(ids) + 4
    first.close()
    second.close()

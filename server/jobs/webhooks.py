"""Webhooks: telling a caller's URL that its job completed, the way fal does (PEERS_AND_PROTOCOL.md §A.8).

A job submitted with `?fal_webhook=URL` gets one POST of JSON when it completes:

    {"request_id": id, "gateway_request_id": id, "status": "OK" | "ERROR", "payload": ..., "error": null | str}

`payload` is the model's output (`{"video": File, "seed": n}`) or, on failure, the error body the
result endpoint answers with; a payload that cannot be written as strict JSON becomes null with a
`payload_error` saying why.

Delivery runs on one background thread, so no job ever waits for a receiver. A connection error, a
timeout or a non-2xx answer is retried with doubling, capped, jittered backoff, up to `attempts`
times, always with the same body bytes: receivers must treat a repeated `request_id` as one event.
Redirects are not followed. The URL is the caller's, and the server posts from inside its own
network, so the host is resolved and refused if any of its addresses is not public (unless listed in
`FetchSettings.allowed_hosts`), and the connection goes to the vetted address, through the same
`server.files.safe_http` as input fetching: a private address is refused for good, a name that does
not resolve is retried like any other failure.

Signing. fal signs with Ed25519 keys published through JWKS; a self-hosted server has no key
infrastructure, so it uses a shared secret instead. Every attempt carries the job's id, and with a
secret configured also a timestamp and a signature:

    x-multitalk-webhook-request-id: <request id>
    x-multitalk-webhook-timestamp:  <unix seconds when this attempt was signed>
    x-multitalk-webhook-signature:  sha256=<hex HMAC-SHA256(secret, f"{timestamp}.{raw body}")>

A receiver recomputes the HMAC over the raw body bytes (not re-serialised JSON), compares it in
constant time, and rejects timestamps more than a few minutes away from its clock, which stops a
captured request from being replayed later: `verify_signature` does all three. Each retry is signed
afresh, so a retry hours later still passes the timestamp check while its body stays identical.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from server.files import safe_http
from server.files.fetch import FetchSettings
from server.jobs.store import COMPLETED, Job

logger = logging.getLogger("multitalk.webhooks")

REQUEST_ID_HEADER = "x-multitalk-webhook-request-id"
TIMESTAMP_HEADER = "x-multitalk-webhook-timestamp"
SIGNATURE_HEADER = "x-multitalk-webhook-signature"
SIGNATURE_PREFIX = "sha256="
USER_AGENT = "multitalk-server (webhook)"
# What a failed job says when it stored no error text of its own (a cancel taken while queued).
_DEFAULT_ERRORS = {"ERROR": ("the request failed", "internal_error"),
                   "CANCELLED": ("the request was cancelled", "client_cancelled")}
_MAX_DOUBLINGS = 32  # keeps 2**n finite for any `attempts`; the cap is reached long before


# -- the message --------------------------------------------------------------------------------


def webhook_payload(job: Job) -> dict[str, Any]:
    """fal's webhook body for a completed job; ValueError for one that has not completed."""
    if job.status != COMPLETED:
        raise ValueError(f"job {job.id} has not completed (status {job.status}); it has no webhook yet")
    body = job.result["body"] if job.result is not None else None
    if job.outcome == "OK":
        message = {"status": "OK", "payload": body, "error": None}
    else:
        message = {"status": "ERROR", "payload": body or _error_body(job), "error": _error_message(job)}
    message = {"request_id": job.id, "gateway_request_id": job.id, **message}
    try:
        json.dumps(message["payload"], allow_nan=False)
    except (TypeError, ValueError) as exc:  # NaN or infinity, or a value JSON has no form for
        message["payload"] = None
        message["payload_error"] = f"the payload could not be serialised as JSON: {exc}"
    return message


def _error_body(job: Job) -> dict[str, Any]:
    """fal's request-error shape, for failures that stored no response body (lost worker, cancel)."""
    detail, error_type = _DEFAULT_ERRORS[job.outcome]
    return {"detail": job.error or detail, "error_type": job.error_type or error_type}


def _error_message(job: Job) -> str:
    """fal's `error` text: the status code the result endpoint answers with, else what went wrong."""
    if job.result is not None:
        return f"Invalid status code: {job.result['status_code']}"
    return _error_body(job)["detail"]


def encode(message: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed): strict, compact JSON."""
    return json.dumps(message, allow_nan=False, separators=(",", ":")).encode()


# -- signing ------------------------------------------------------------------------------------


def _signature(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def signature_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """The timestamp and signature headers for one attempt to send `body`, signed at `now` (default:
    the clock). The request-id header goes with every webhook, signed or not."""
    timestamp = str(int(time.time() if now is None else now))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: _signature(secret, timestamp, body)}


def verify_signature(secret: str, body: bytes, headers: Mapping[str, str], tolerance_s: float = 300,
                     now: float | None = None) -> bool:
    """True when `headers` sign exactly `body` with `secret` at a time within tolerance_s of `now`.

    For receivers: pass the raw request body and its headers (any capitalisation of the names).
    """
    named = {name.lower(): value for name, value in headers.items()}
    timestamp, signature = named.get(TIMESTAMP_HEADER, ""), named.get(SIGNATURE_HEADER, "")
    if not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(signature.encode(), _signature(secret, timestamp, body).encode())


# -- where it may go ----------------------------------------------------------------------------


def check_webhook_url(url: str, allowed_hosts: Set[str] = frozenset()) -> str | None:
    """Why `url` cannot take webhooks, judged from its text alone (no DNS), or None if it may.

    The API calls this at submit time to answer 422 at once rather than fail silently later; names
    that resolve to private addresses are caught at delivery, when the name is resolved.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"not a valid URL ({exc})"
    if parsed.scheme not in safe_http.HTTP_SCHEMES:
        return f"the URL scheme must be http or https, not '{parsed.scheme}'" if parsed.scheme else "not an absolute URL"
    if not parsed.host:
        return "the URL has no host"
    host = parsed.host
    allowed = safe_http.is_allowed_host(host, allowed_hosts)
    if safe_http.is_ip_literal(host) and not allowed and not safe_http.is_public_address(host):
        return f"points to a private or local network address ({host}), which is not allowed"
    return None


# -- delivery -----------------------------------------------------------------------------------


class _Refused(Exception):
    """A delivery that no retry can help: the URL is unusable or points somewhere it must not."""


@dataclass
class _Delivery:
    request_id: str
    url: str
    body: bytes
    attempts: int = 0

    @property
    def host(self) -> str:
        """host[:port] for logs; the rest of the URL may hold a caller's token."""
        try:
            return urlsplit(self.url).netloc.rpartition("@")[2]
        except ValueError:  # e.g. an unclosed IPv6 bracket; the log line must still be written
            return "(unparsable URL)"


class WebhookSender:
    """Posts completed jobs' webhooks from one daemon thread, retrying failures on a schedule.

    Deliveries wait in a heap ordered by when they are next due, so one receiver in backoff does
    not hold up the others; one that is slow to answer holds the thread for at most timeout_s.
    A falsy `secret` sends unsigned webhooks. `fetch_settings.allowed_hosts` exempts hosts from the
    private-address refusal (an on-prem receiver, 127.0.0.1 in tests).
    """

    def __init__(self, secret: str | None, attempts: int = 10, first_backoff_s: float = 5,
                 max_backoff_s: float = 900, timeout_s: float = 15, fetch_settings: FetchSettings | None = None):
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.secret = secret or None
        self.attempts = attempts
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout = httpx.Timeout(timeout_s)
        self.settings = fetch_settings or FetchSettings()
        self._due: list[tuple[float, int, _Delivery]] = []
        self._order = itertools.count()  # breaks ties in the heap; deliveries themselves do not compare
        self._wake = threading.Condition()
        self._closing_by: float | None = None
        self._thread = threading.Thread(target=self._run, name="multitalk-webhooks", daemon=True)
        self._thread.start()

    def send(self, job: Job) -> None:
        """Queue the webhook of a completed job and return at once; nothing when it has no webhook_url."""
        if job.webhook_url is None:
            return
        delivery = _Delivery(job.id, job.webhook_url, encode(webhook_payload(job)))
        with self._wake:
            if self._closing_by is not None:
                logger.warning("webhook dropped request_id=%s attempt=0 host=%s reason=the sender is closed",
                               delivery.request_id, delivery.host)
                return
            self._schedule(delivery, time.monotonic())

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking webhooks, make the attempts already due within timeout_s, and drop (logging
        each) those waiting for a retry; returns within about timeout_s even if a receiver hangs."""
        with self._wake:
            if self._closing_by is None:
                self._closing_by = time.monotonic() + timeout_s
            self._wake.notify()
        self._thread.join(timeout_s)

    def _schedule(self, delivery: _Delivery, due: float) -> None:
        """Add to the heap and wake the thread; the caller holds self._wake."""
        heapq.heappush(self._due, (due, next(self._order), delivery))
        self._wake.notify()

    def _run(self) -> None:
        while (delivery := self._next()) is not None:
            try:
                self._attempt(delivery)
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad delivery
                logger.exception("webhook failed unexpectedly request_id=%s attempt=%d host=%s",
                                 delivery.request_id, delivery.attempts, delivery.host)

    def _next(self) -> _Delivery | None:
        """The next delivery once it is due; None when closing and nothing more is to be sent."""
        with self._wake:
            while True:
                now = time.monotonic()
                closing = self._closing_by is not None
                if self._due and self._due[0][0] <= now and not (closing and now >= self._closing_by):
                    return heapq.heappop(self._due)[2]
                if closing:
                    self._abandon_all()
                    return None
                self._wake.wait(self._due[0][0] - now if self._due else None)

    def _abandon_all(self) -> None:
        for _, _, delivery in self._due:
            logger.warning("webhook abandoned request_id=%s attempt=%d host=%s reason=the sender closed "
                           "before the next attempt", delivery.request_id, delivery.attempts, delivery.host)
        self._due.clear()

    def _attempt(self, delivery: _Delivery) -> None:
        """One try; then done, rescheduled, or given up."""
        delivery.attempts += 1
        try:
            failure = self._post(delivery)
        except _Refused as exc:
            logger.warning("webhook refused request_id=%s attempt=%d host=%s reason=%s",
                           delivery.request_id, delivery.attempts, delivery.host, exc)
            return
        if failure is None:
            logger.info("webhook delivered request_id=%s attempt=%d host=%s",
                        delivery.request_id, delivery.attempts, delivery.host)
        elif delivery.attempts >= self.attempts:
            logger.warning("webhook gave up request_id=%s attempt=%d host=%s reason=%s",
                           delivery.request_id, delivery.attempts, delivery.host, failure)
        else:
            delay = self._backoff(delivery.attempts)
            logger.warning("webhook failed request_id=%s attempt=%d of %d host=%s reason=%s retry_in=%.1fs",
                           delivery.request_id, delivery.attempts, self.attempts, delivery.host, failure, delay)
            with self._wake:
                self._schedule(delivery, time.monotonic() + delay)

    def _backoff(self, failures: int) -> float:
        """Doubling from first_backoff_s, capped at max_backoff_s, times a random factor in [0.5, 1]
        so that webhooks which failed together (a receiver restarting) do not all return at once."""
        base = min(self.max_backoff_s, self.first_backoff_s * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))
        return base * random.uniform(0.5, 1.0)

    def _post(self, delivery: _Delivery) -> str | None:
        """POST once to a vetted address: None when the receiver took it, else why not (worth a retry).
        Raises _Refused when no retry can help."""
        reason = check_webhook_url(delivery.url, self.settings.allowed_hosts)
        if reason is not None:
            raise _Refused(reason)
        return asyncio.run(self._post_to_vetted(httpx.URL(delivery.url), delivery))

    async def _post_to_vetted(self, url: httpx.URL, delivery: _Delivery) -> str | None:
        """`_post` after the URL check: vet the host's addresses, then POST to one of them (a fresh
        transport per attempt: webhooks are rare, see `safe_http.pinned_request`)."""
        try:
            addresses = await safe_http.vetted_addresses(
                url, allowed_hosts=self.settings.allowed_hosts, lookup_timeout=self.settings.connect_timeout)
        except safe_http.Refused as exc:  # a private address: refused, not unreachable
            raise _Refused(exc.reason) from None
        except safe_http.Unreachable as exc:  # the name may resolve later
            return exc.reason
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, REQUEST_ID_HEADER: delivery.request_id}
        if self.secret is not None:
            headers.update(signature_headers(self.secret, delivery.body))
        try:
            async with safe_http.pinned_request("POST", url, addresses, headers=headers, timeout=self.timeout,
                                                content=delivery.body) as response:
                status = response.status_code
        except httpx.TransportError as exc:  # connection failures and timeouts
            return f"{type(exc).__name__}: {exc}"
        return None if 200 <= status < 300 else f"the receiver answered {status}"

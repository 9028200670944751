"""Webhooks: telling a caller's URL that its job completed, the way fal does (PEERS_AND_PROTOCOL.md §A.8).

A job submitted with `?fal_webhook=URL` gets one POST of JSON when it completes:

    {"request_id": id, "gateway_request_id": id, "status": "OK" | "ERROR", "payload": ..., "error": null | str}

`payload` is the model's output (`{"video": File, "seed": n}`) or, on failure, the error body the
result endpoint answers with; a payload that cannot be written as strict JSON becomes null with a
`payload_error` saying why.

The outbox. A webhook waits in the job store, with its job: the write that completes a job marks its
webhook pending and due now, so neither a crash right after completion nor a restart while a retry
waits loses it. Every process with the server's services (the API, each `multitalk worker`) runs one
WebhookSender, which takes due webhooks from the store one attempt at a time (atomically, for a hold
longer than an attempt can last: two senders never make the same attempt, and an attempt whose
sender died or was closed is made again by whoever takes it after the hold) and records how each
went. Attempts run concurrently, at most `max_per_host` at a time to one receiver host and
`max_in_flight` in all, so a slow or hanging receiver only ever occupies its own slots; no job ever
waits for a receiver. A connection error, a timeout or a non-2xx answer is retried with doubling,
capped, jittered backoff, up to `attempts` times, always with the same body bytes (rebuilt from the
stored job, identical across restarts). Delivery is at least once: receivers must treat a repeated
`request_id` as one event.

Redirects are not followed. The URL is the caller's, and the server posts from inside its own
network, so the host is resolved and refused if any of its addresses is not public (unless listed in
`FetchSettings.allowed_hosts`), and the connection goes to the vetted address, through the same
`server.files.safe_http` as input fetching: a private address is refused for good (no retry), a name
that does not resolve is retried like any other failure.

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
import hmac
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from server.files import safe_http
from server.files.fetch import FetchSettings
from server.jobs.failures import StoreOutage
from server.jobs.store import (
    COMPLETED,
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    Job,
    JobStore,
    WebhookState,
)

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
_PHASES_PER_ATTEMPT = 3  # connecting, sending, the answer: each within timeout_s
_HOLD_MARGIN_S = 30.0  # a taken webhook's hold beyond its attempt's limit, for the store writes around it


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


@dataclass(frozen=True)
class _Delivery:
    """One attempt at one job's webhook, as taken from the outbox."""

    request_id: str
    url: str
    body: bytes
    attempt: int

    @classmethod
    def of(cls, job: Job) -> _Delivery:
        return cls(job.id, job.webhook_url, encode(webhook_payload(job)), job.webhook_attempts)

    @property
    def host(self) -> str:
        return _host(self.url)


def _host(url: str) -> str:
    """host[:port], for logs and the per-receiver cap; the rest of the URL may hold a caller's token."""
    try:
        return urlsplit(url).netloc.rpartition("@")[2].lower()
    except ValueError:  # e.g. an unclosed IPv6 bracket; the log line must still be written
        return "(unparsable URL)"


class WebhookSender:
    """Delivers the job store's pending webhooks from an asyncio loop on one daemon thread.

    The loop lists the due webhooks when woken (`wake`, after a job completed; a slot freed; a retry
    falling due) and every poll_s (webhooks that other processes left due), and starts an attempt for
    each while its receiver host has a free slot. A falsy `secret` sends unsigned webhooks.
    `fetch_settings.allowed_hosts` exempts hosts from the private-address refusal (an on-prem
    receiver, 127.0.0.1 in tests).
    """

    def __init__(self, store: JobStore, secret: str | None, attempts: int = 10, first_backoff_s: float = 5,
                 max_backoff_s: float = 900, timeout_s: float = 15, fetch_settings: FetchSettings | None = None,
                 max_in_flight: int = 32, max_per_host: int = 4, poll_s: float = 1.0):
        for name, value in (("attempts", attempts), ("max_in_flight", max_in_flight), ("max_per_host", max_per_host)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("timeout_s", timeout_s), ("poll_s", poll_s)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.store = store
        self.secret = secret or None
        self.attempts = attempts
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout = httpx.Timeout(timeout_s)
        # Each phase of an attempt gets timeout_s; the attempt as a whole is cut off at the sum, which
        # also stops a receiver that trickles its answer. The hold adds room for the store writes around it.
        self.attempt_limit_s = _PHASES_PER_ATTEMPT * timeout_s
        self.hold_s = self.attempt_limit_s + _HOLD_MARGIN_S
        self.settings = fetch_settings or FetchSettings()
        self.max_in_flight = max_in_flight
        self.max_per_host = max_per_host
        self.poll_s = poll_s
        self._in_flight: dict[str, asyncio.Task[None]] = {}  # by job id; touched on the loop's thread only
        self._per_host: Counter[str] = Counter()
        self._outage = StoreOutage(logger, "while reading the webhook outbox")
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._wakeup = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="multitalk-webhooks", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for due webhooks now (a job just completed) rather than at the next poll. Thread-safe;
        nothing after close (the webhook waits in the store for the next sender)."""
        try:
            self._loop.call_soon_threadsafe(self._wakeup.set)
        except RuntimeError:  # the loop is closed
            pass

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop sending and return within about timeout_s even if a receiver hangs. Attempts in
        flight are abandoned: taken again when their hold ends, by this server's next start or
        another process."""
        self._closing = True
        self.wake()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._dispatch())
        finally:
            self._loop.close()

    async def _dispatch(self) -> None:
        while not self._closing:
            self._wakeup.clear()
            try:
                due = await asyncio.to_thread(self.store.due_webhooks)
            except Exception as exc:  # the sender must outlive a store outage (logged once) or a bug; it polls on
                if self._outage.noted(exc) is None:
                    logger.exception("webhook outbox could not be read retry_in=%.1fs", self.poll_s)
                due = []
            else:
                self._outage.recovered()
            for id, url in due:
                if len(self._in_flight) >= self.max_in_flight:
                    break
                self._start(id, _host(url))
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.poll_s)
            except TimeoutError:
                pass
        interrupted = list(self._in_flight.items())
        for id, task in interrupted:
            logger.warning("webhook attempt interrupted request_id=%s reason=the sender closed; it is made again "
                           "after its hold", id)
            task.cancel()
        await asyncio.gather(*(task for _, task in interrupted), return_exceptions=True)

    def _start(self, id: str, host: str) -> None:
        """An attempt at job `id`'s webhook, unless one is running here already or its host is at its cap."""
        if id in self._in_flight or self._per_host[host] >= self.max_per_host:
            return
        self._per_host[host] += 1
        task = self._loop.create_task(self._deliver(id))
        self._in_flight[id] = task

        def release(_: asyncio.Task[None]) -> None:
            del self._in_flight[id]
            self._per_host[host] -= 1
            self._wakeup.set()  # a slot is free: a webhook waiting for it may go

        task.add_done_callback(release)

    async def _deliver(self, id: str) -> None:
        """Take the webhook for one attempt, make it, record the result (retries wake the loop when due)."""
        try:
            job = await asyncio.to_thread(self.store.take_webhook, id, self.hold_s)
            if job is None:  # another sender took it first, or it was just delivered
                return
            delivery = _Delivery.of(job)
            state, retry_in_s, outcome = await self._attempt(delivery)
            if not await asyncio.to_thread(self.store.record_webhook_attempt, id, delivery.attempt, state, retry_in_s):
                logger.warning("webhook attempt outlived its hold request_id=%s attempt=%d host=%s; the next "
                               "attempt decides", id, delivery.attempt, delivery.host)
            elif state == WEBHOOK_PENDING:
                self._loop.call_later(retry_in_s, self._wakeup.set)
            await self._note(id, f"webhook attempt {delivery.attempt} to {delivery.host}: {outcome}",
                             "INFO" if state == WEBHOOK_DELIVERED else "WARN")
        except Exception as exc:  # a store outage (logged once) or a bug: taken again when its hold ends
            if self._outage.noted(exc) is None:
                logger.exception("webhook attempt could not be taken or recorded request_id=%s", id)

    async def _note(self, id: str, message: str, level: str) -> None:
        """The attempt in the request's logs, where its client sees it; a line lost to an outage is only a line."""
        try:
            await asyncio.to_thread(self.store.append_log, id, message, level)
        except Exception as exc:
            if self._outage.noted(exc) is None:
                raise

    async def _attempt(self, delivery: _Delivery) -> tuple[WebhookState, float, str]:
        """One try: what to record (delivered, failed, or pending again), when pending the delay, and what happened
        in words (for the request's logs, where the client sees its webhook's attempts)."""
        try:
            failure = await self._post(delivery)
        except _Refused as exc:
            logger.warning("webhook refused request_id=%s attempt=%d host=%s reason=%s",
                           delivery.request_id, delivery.attempt, delivery.host, exc)
            return WEBHOOK_FAILED, 0.0, f"refused ({exc}); not retried"
        except Exception as exc:  # a bug here counts as a failed attempt, so it cannot loop forever
            logger.exception("webhook failed unexpectedly request_id=%s attempt=%d host=%s",
                             delivery.request_id, delivery.attempt, delivery.host)
            failure = f"{type(exc).__name__}: {exc}"
        if failure is None:
            logger.info("webhook delivered request_id=%s attempt=%d host=%s",
                        delivery.request_id, delivery.attempt, delivery.host)
            return WEBHOOK_DELIVERED, 0.0, "delivered"
        if delivery.attempt >= self.attempts:
            logger.warning("webhook gave up request_id=%s attempt=%d host=%s reason=%s",
                           delivery.request_id, delivery.attempt, delivery.host, failure)
            return WEBHOOK_FAILED, 0.0, f"failed ({failure}); that was the last of {self.attempts} attempts"
        delay = self._backoff(delivery.attempt)
        logger.warning("webhook failed request_id=%s attempt=%d of %d host=%s reason=%s retry_in=%.1fs",
                       delivery.request_id, delivery.attempt, self.attempts, delivery.host, failure, delay)
        return WEBHOOK_PENDING, delay, f"failed ({failure}); next attempt in {delay:.0f} s"

    def _backoff(self, failures: int) -> float:
        """Doubling from first_backoff_s, capped at max_backoff_s, times a random factor in [0.5, 1]
        so that webhooks which failed together (a receiver restarting) do not all return at once."""
        base = min(self.max_backoff_s, self.first_backoff_s * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))
        return base * random.uniform(0.5, 1.0)

    async def _post(self, delivery: _Delivery) -> str | None:
        """POST once to a vetted address: None when the receiver took it, else why not (worth a retry).
        Raises _Refused when no retry can help."""
        reason = check_webhook_url(delivery.url, self.settings.allowed_hosts)
        if reason is not None:
            raise _Refused(reason)
        try:
            async with asyncio.timeout(self.attempt_limit_s):
                return await self._post_to_vetted(httpx.URL(delivery.url), delivery)
        except TimeoutError:
            return f"the attempt took longer than {self.attempt_limit_s:g}s"

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

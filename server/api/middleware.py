"""ASGI middleware: queue-host routing, body size limits, request ids and the access log.

Written as plain ASGI (not BaseHTTPMiddleware) so streaming bodies, SSE and client disconnects
pass through untouched.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import request_error_response
from server.api.public_urls import QUEUE_PREFIX
from server.files.store import FILES_PATH, UPLOADS_PATH

logger = logging.getLogger("multitalk.access")

REQUEST_ID_HEADER = b"x-fal-request-id"


class QueueHostRouting:
    """`POST queue.<host>/fal-ai/...` is the queue API on fal (§A.1); here it is under `/queue`.
    A Host starting with `queue.` gets the prefix added, so both addressing styles work."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            path = scope["path"]
            if host.startswith("queue.") and not path.startswith(QUEUE_PREFIX + "/") and path.startswith("/fal-ai/"):
                scope = {**scope, "path": QUEUE_PREFIX + path, "raw_path": (QUEUE_PREFIX + path).encode()}
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413 for bodies over the limit: up front from Content-Length, or as soon as a streamed body
    passes it. Uploads have their own, larger limit: refused up front from Content-Length here (a 2 GB
    declared upload is answered at once, not after the server has waited for its body), and enforced
    by the file store as it writes a body that declares no length or lies about it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int):
        self.app, self.max_body_bytes, self.max_upload_bytes = app, max_body_bytes, max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        length = dict(scope["headers"]).get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        if path.startswith(UPLOADS_PATH) or path == f"{FILES_PATH}upload":
            if declared is not None and declared > self.max_upload_bytes:
                await _refuse(scope, receive, send,
                              f"the upload is larger than {self.max_upload_bytes / (1024 * 1024):g} MiB")
                return
            await self.app(scope, receive, send)
            return
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = cut_off = refused = False

        async def limited_receive() -> Message:
            # Past the limit the 413 goes out from here, and the app is told the client left: an
            # exception would not do, as FastAPI turns errors while reading a body into its own 400.
            nonlocal received, cut_off, refused
            if cut_off:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    cut_off = True
                    if not started:
                        refused = True
                        await self._refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:  # the 413 is the answer; drop the app's reply to the cut-off body
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, tracking_send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit_mib = self.max_body_bytes / (1024 * 1024)
        await _refuse(scope, receive, send, f"the request body is larger than {limit_mib:g} MiB; upload large media "
                                            "(POST /storage/upload/initiate) and pass its URL")


async def _refuse(scope: Scope, receive: Receive, send: Send, detail: str) -> None:
    """A 413 in fal's flat error shape, sent before the body is read."""
    await request_error_response(413, detail, "payload_too_large")(scope, receive, send)


class RequestIdAndAccessLog:
    """Every response carries `x-fal-request-id` (the job's id where a route set it, else a fresh
    one): fal clients read it, and the Python client retries 5xx without it as proxy errors.
    One structured access-log line per request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        seen: dict[str, object] = {"status": 500, "request_id": None}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                request_id = next((v for k, v in headers if k.lower() == REQUEST_ID_HEADER), None)
                if request_id is None:
                    request_id = uuid.uuid4().hex.encode()
                    headers.append((REQUEST_ID_HEADER, request_id))
                seen.update(status=message["status"], request_id=request_id.decode())
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logger.info("request method=%s path=%s status=%s request_id=%s duration_ms=%.1f", scope["method"],
                        scope["path"], seen["status"], seen["request_id"], (time.monotonic() - started) * 1000)

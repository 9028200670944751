"""422 bodies in the shape fal and FastAPI share: `{"detail": [{"loc", "msg", "type", ...}]}`.

fal documents each entry as `loc` (e.g. `["body", "first_audio_url"]`), `msg` for humans, `type` as
a machine key, and optional `ctx` and `input` (PEERS_AND_PROTOCOL.md §A.9); FastAPI's default
entries (`type, loc, msg, input, ctx`, no `url`) are that shape, and both official clients parse
them (§B.3). Two things are ours: every `msg` starts with the field it is about, because clients
often show `msg` alone; and long strings inside `input` are shortened, so a rejected 8 MiB data
URI is not echoed back in full, and NaN or infinity (`num_frames: NaN`, `1e400`) is echoed as a string
that strict JSON can carry.

Errors that are not about a field (not found, unauthorised, queue full, body too large) use fal's
flat request-error shape instead: `{"detail": "<message>", "error_type": "<category>"}` plus the
`X-Fal-Error-Type` header, which the Python client reads into `FalClientHTTPError.error_type`; so do
unknown routes and wrong methods (404 `not_found`, 405 `method_not_allowed`), which FastAPI would
answer with a bare `{"detail": "Not Found"}`.

Both shapes also carry `message`, a one-line summary: the JS client (`@fal-ai/client`) builds its
`ApiError.message` from `body.message` alone (else the bare status text), while the Python client
reads `detail`, which keeps its shape.

The same body serves pydantic's errors (request validation, or a stored body re-validated by a
job) and the model's `InputError` (a field that validated but could not be used, e.g. an audio URL
that does not decode), so a client sees one format whichever layer noticed the problem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.contract.errors import InputError
from server.jobs.failures import STORAGE_ERRORS, StorageFailure, storage_failure_or_raise

ECHO_MAX_CHARS = 200  # longer strings in an error's `input` are cut to this many characters
Loc = tuple[str | int, ...]


def _field_name(loc: Loc) -> str | None:
    """`("body", "speaker_boxes", 0, 2)` → `speaker_boxes[0][2]`; None when no field is named
    (the whole body, or a JSON syntax error whose loc is a character offset)."""
    path = loc[1:]
    if not path or not isinstance(path[0], str):
        return None
    return path[0] + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path[1:])


def _named(loc: Loc, msg: str) -> str:
    """The message prefixed with its field, or with the part of the request (`body`) when no field applies."""
    name = _field_name(loc) or (str(loc[0]) if loc else None)
    return f"{name}: {msg}" if name else msg


def _shortened(value: Any) -> Any:
    """`value` made safe to echo: long strings cut, and NaN and ±infinity (which Python's JSON parser accepts in a
    body, and strict JSON cannot write back) named as JavaScript does."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str) and len(value) > ECHO_MAX_CHARS:
        return f"{value[:ECHO_MAX_CHARS]}… ({len(value)} characters)"
    if isinstance(value, dict):
        return {key: _shortened(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shortened(item) for item in value]
    return value


def validation_error_body(errors: Sequence[dict[str, Any]], loc_prefix: Loc = ()) -> dict[str, Any]:
    """`{"detail": [...]}` for pydantic error dicts.

    FastAPI's errors already start with their location (`"body"`); pass `loc_prefix=("body",)` for
    the errors of `AvatarMultiInput.model_validate(...)` (`exc.errors(include_url=False)`).
    """
    detail = []
    for error in errors:
        loc = (*loc_prefix, *error["loc"])
        entry = {**error, "loc": list(loc), "msg": _named(loc, error["msg"])}
        if "input" in entry:
            entry["input"] = _shortened(entry["input"])
        detail.append(entry)
    return _field_errors_body(jsonable_encoder(detail))


def input_error_body(exc: InputError) -> dict[str, Any]:
    """`{"detail": [...]}` for the model's InputError, whose `field` is the request field's name."""
    loc: Loc = ("body", exc.field)
    return _field_errors_body([{"loc": list(loc), "msg": _named(loc, exc.reason), "type": exc.kind}])


def _field_errors_body(detail: list[dict[str, Any]]) -> dict[str, Any]:
    """The 422 body: the entries, and their messages (each naming its field) joined as the JS client's `message`."""
    return {"detail": detail, "message": "; ".join(entry["msg"] for entry in detail)}


def validation_error_response(errors: Sequence[dict[str, Any]], loc_prefix: Loc = ()) -> JSONResponse:
    return JSONResponse(validation_error_body(errors, loc_prefix), status_code=422)


def input_error_response(exc: InputError) -> JSONResponse:
    return JSONResponse(input_error_body(exc), status_code=422)


class RequestError(Exception):
    """A request the server answers with a flat fal error; raised by routes and dependencies."""

    def __init__(self, status_code: int, detail: str, error_type: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code, self.detail, self.error_type, self.headers = status_code, detail, error_type, headers or {}


def request_error_body(detail: str, error_type: str) -> dict[str, str]:
    """The flat error body; `message` repeats `detail` for the JS client (see the module docstring)."""
    return {"detail": detail, "error_type": error_type, "message": detail}


def request_error_response(status_code: int, detail: str, error_type: str,
                           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(request_error_body(detail, error_type), status_code=status_code,
                        headers={"x-fal-error-type": error_type, **(headers or {})})


async def _on_request_error(request: Request, exc: RequestError) -> JSONResponse:
    return request_error_response(exc.status_code, exc.detail, exc.error_type, exc.headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error_response(exc.errors())


async def _on_input_error(request: Request, exc: InputError) -> JSONResponse:
    return input_error_response(exc)


NOT_STREAMING = ("this endpoint does not stream its output: use the queue (fal.subscribe, or submit and then "
                 "fal.queue.streamStatus for progress events) or the synchronous POST /fal-ai/ai-avatar/multi")


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing's own errors (an unknown path, a wrong method) in the flat shape, `error_type` named after the
    status (`not_found`, `method_not_allowed`); a `.../stream` path says what to use instead (fal.stream posts there)."""
    path = request.url.path
    reason = NOT_STREAMING if exc.status_code == 404 and path.rstrip("/").endswith("/stream") else exc.detail
    error_type = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    return request_error_response(exc.status_code, f"{request.method} {_shortened(path)}: {reason}", error_type,
                                  dict(exc.headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    """Answer invalid requests and InputErrors escaping a route with the 422 body above, RequestErrors
    with the flat body, and job-store or storage failures with a flat 503 or 507 (see below)."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(InputError, _on_input_error)
    app.add_exception_handler(RequestError, _on_request_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    for error_class in STORAGE_ERRORS:
        app.add_exception_handler(error_class, _on_storage_error)


STORE_RETRY_AFTER_S = 5  # what a 503 for an unavailable store suggests: outages are seconds to minutes


def storage_failure_response(failure: StorageFailure, status_code: int | None = None) -> JSONResponse:
    """The flat body for a store or storage failure: 503 `store_unavailable` with `Retry-After`, or 507
    `insufficient_storage`; `status_code` overrides the status (the health probes answer 503 for both)."""
    headers = {"Retry-After": str(STORE_RETRY_AFTER_S)} if failure.kind == "unavailable" else {}
    return request_error_response(status_code or failure.status_code, failure.detail, failure.error_type, headers)


async def _on_storage_error(request: Request, exc: Exception) -> JSONResponse:
    """A job-store or storage failure escaping a route is the client's 503 or 507, never a bare 500; any other
    error of the same classes (a bug) is re-raised to the server's 500 handler, which logs it."""
    return storage_failure_response(storage_failure_or_raise(exc))

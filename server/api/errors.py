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
`X-Fal-Error-Type` header, which the Python client reads into `FalClientHTTPError.error_type`.

The same body serves pydantic's errors (request validation, or a stored body re-validated by a
job) and the model's `InputError` (a field that validated but could not be used, e.g. an audio URL
that does not decode), so a client sees one format whichever layer noticed the problem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from model.contract.errors import InputError

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
    return {"detail": jsonable_encoder(detail)}


def input_error_body(exc: InputError) -> dict[str, Any]:
    """`{"detail": [...]}` for the model's InputError, whose `field` is the request field's name."""
    loc: Loc = ("body", exc.field)
    return {"detail": [{"loc": list(loc), "msg": _named(loc, exc.reason), "type": exc.kind}]}


def validation_error_response(errors: Sequence[dict[str, Any]], loc_prefix: Loc = ()) -> JSONResponse:
    return JSONResponse(validation_error_body(errors, loc_prefix), status_code=422)


def input_error_response(exc: InputError) -> JSONResponse:
    return JSONResponse(input_error_body(exc), status_code=422)


class RequestError(Exception):
    """A request the server answers with a flat fal error; raised by routes and dependencies."""

    def __init__(self, status_code: int, detail: str, error_type: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code, self.detail, self.error_type, self.headers = status_code, detail, error_type, headers or {}


def request_error_response(status_code: int, detail: str, error_type: str,
                           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "error_type": error_type}, status_code=status_code,
                        headers={"x-fal-error-type": error_type, **(headers or {})})


async def _on_request_error(request: Request, exc: RequestError) -> JSONResponse:
    return request_error_response(exc.status_code, exc.detail, exc.error_type, exc.headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error_response(exc.errors())


async def _on_input_error(request: Request, exc: InputError) -> JSONResponse:
    return input_error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Answer invalid requests and InputErrors escaping a route with the 422 body above, and
    RequestErrors with the flat body."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(InputError, _on_input_error)
    app.add_exception_handler(RequestError, _on_request_error)

"""The browser playground: a page at `/` that uploads, queues, follows and plays requests.

Plain HTML, JS and CSS from `server/playground/` (no build step, nothing from a CDN); the page
itself needs no API key, the calls it makes send the one typed into it. Left out of the OpenAPI
description: it is not part of the fal protocol.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.api.errors import RequestError

router = APIRouter(tags=["playground"], include_in_schema=False)

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
ASSETS = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
NO_CACHE = {"Cache-Control": "no-cache"}  # small files; a server upgrade shows at once


@router.get("/")
def index() -> FileResponse:
    return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html; charset=utf-8", headers=NO_CACHE)


@router.get("/playground/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise RequestError(404, "no such playground file", "file_not_found")
    return FileResponse(PLAYGROUND_DIR / name, media_type=ASSETS[name], headers=NO_CACHE)

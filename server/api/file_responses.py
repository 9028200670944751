"""`GET /files/{id}` as an HTTP response, wherever the file is kept: range requests work for both stores.

A file on this machine's disk is Starlette's `FileResponse` (ranges, conditional requests). A file in a
bucket is streamed from it: one byte range per request (what players and browsers ask for when they
seek), answered 206 with its `Content-Range`, 416 when it lies outside the file, the whole file
otherwise. Only the asked-for bytes are read from the bucket.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from fastapi.responses import FileResponse, Response, StreamingResponse

from server.files.store import FileStore, StoredFile

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def stored_file_response(files: FileStore, stored: StoredFile, range_header: str | None) -> Response:
    path = files.local_path(stored.id)
    if path is not None:
        return FileResponse(path, media_type=stored.content_type, filename=stored.file_name)
    headers = {"accept-ranges": "bytes", "content-disposition": _attachment(stored.file_name)}
    span = _byte_range(range_header, stored.size)
    if span == "unsatisfiable":
        return Response(status_code=416, headers={**headers, "content-range": f"bytes */{stored.size}"})
    start, end = span or (0, stored.size - 1)
    headers["content-length"] = str(end - start + 1)
    if span:
        headers["content-range"] = f"bytes {start}-{end}/{stored.size}"
    chunks = files.read_range(stored.id, start, end) if stored.size else iter(())
    return StreamingResponse(chunks, status_code=206 if span else 200, media_type=stored.content_type,
                             headers=headers)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, end) of a single `bytes=` range, "unsatisfiable", or None for no (or an unsupported) range,
    which is answered with the whole file as RFC 9110 allows."""
    match = _RANGE.fullmatch((header or "").strip())
    if match is None or match.groups() == ("", "") or max(map(len, match.groups())) > 18:  # past any file's size
        return None
    first, last = match.groups()
    if first and last and int(first) > int(last):  # not a range at all: ignored, as for a malformed header
        return None
    if first == "":  # the last N bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size:
        return "unsatisfiable"
    return start, end


def _attachment(file_name: str) -> str:
    quoted = quote(file_name)
    return f"attachment; filename*=utf-8''{quoted}" if quoted != file_name else f'attachment; filename="{file_name}"'

"""Files this server keeps: uploaded inputs and generated videos, on its own disk or in an S3 bucket.

fal clients hand models URLs, and they get those URLs by uploading first (§A.10/§B.1 of the
research notes): the JS client and fal-client's `fal` repository call `/storage/upload/initiate`
and PUT the bytes to the returned `upload_url`; fal-client's default `fal_v3` repository POSTs the
raw body and reads back an `access_url`. A self-hosted server has to play both roles, and it also
needs somewhere to put its outputs so results can name them by URL. This module is that storage,
kept free of HTTP so the routes stay thin: every file gets a random, unguessable id (so URLs can be
shared without exposing other users' files), ids are checked against a strict pattern before they
touch the file system (so no URL can reach outside the store), and writes go to a temporary name
first (so a reader never sees half a file).

`FileStore` holds what every backend shares (ids, URLs, the upload flows' rules); `LocalFileStore`
keeps the files under a folder, the default for one machine; `server.files.s3_store.S3FileStore`
keeps them in a bucket, so that hosts sharing only Redis and the bucket serve each other's files.
`server.services` picks one from the settings.

Layout under `root` (local): `data/<id>` (the bytes), `meta/<id>.json` (content type, file name,
size), `pending/<upload token>.json` (an initiated upload waiting for its PUT).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import os
import re
import secrets
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import SplitResult, urlsplit

DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
FILES_PATH = "/files/"
UPLOADS_PATH = "/storage/uploads/"
DEFAULT_CONTENT_TYPE = "application/octet-stream"

_TOKEN_BYTES = 24  # → 32 URL-safe characters, 192 random bits
READ_CHUNK_BYTES = 1024 * 1024
_ID = re.compile(r"[A-Za-z0-9_-]{32}(?:\.[A-Za-z0-9]{1,8})?")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32}")
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,8}")
_CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_FILE_NAME = 200


class UnknownFile(LookupError):
    """No stored file (or pending upload) has this id; also raised for ids that could never be valid."""


class UploadTooLarge(ValueError):
    """An upload went past the store's size limit; nothing of it was kept."""


@dataclass(frozen=True)
class StoredFile:
    """One stored file, with what a fal `File` object needs (`url`, `content_type`, `file_name`, `file_size`)."""

    id: str
    url: str
    content_type: str
    file_name: str
    size: int


@dataclass(frozen=True)
class PendingUpload:
    """The answer to `/storage/upload/initiate`: where to PUT the bytes, and the URL they will have."""

    upload_url: str
    file_url: str


class FileStore(ABC):
    """Uploaded inputs and generated outputs, served at `<public_base_url>/files/<id>` (or a backend's own URLs).

    Ids are random and unguessable, and checked against a strict pattern before they reach a backend."""

    def __init__(self, public_base_url: str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        base = urlsplit(public_base_url)
        if base.scheme not in _DEFAULT_PORTS or not base.hostname:
            raise ValueError(f"public_base_url must be an absolute http(s) URL, got {public_base_url!r}")
        self.public_base_url = public_base_url.rstrip("/")
        self.max_upload_bytes = max_upload_bytes
        self._base = base

    # -- adding files ---------------------------------------------------------------------------

    async def save_upload(
        self, stream: AsyncIterable[bytes], content_type: str | None, file_name: str | None
    ) -> StoredFile:
        """Store an uploaded body (fal_v3's `POST /files/upload`); raises `UploadTooLarge` past the limit."""
        return await self._save_stream(self.new_id(file_name, content_type), stream, content_type, file_name)

    @abstractmethod
    def add_file(self, source: Path, content_type: str | None, file_name: str | None = None) -> StoredFile:
        """Move a finished file (a generated video, a fetched input) into the store; `file_name` defaults to its name."""

    def initiate_upload(self, content_type: str | None, file_name: str | None) -> PendingUpload:
        """Reserve an id for `/storage/upload/initiate`; the bytes follow with a PUT to `upload_url`.

        The PUT goes to a second random token rather than to the file id, so knowing a file's public
        URL does not let anyone overwrite it, and each token works once.
        """
        file_id = self.new_id(file_name, content_type)
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        self._put_pending(token, {"id": file_id, "content_type": content_type, "file_name": file_name})
        return PendingUpload(upload_url=f"{self.public_base_url}{UPLOADS_PATH}{token}", file_url=self.url_for(file_id))

    async def complete_upload(self, token: str, stream: AsyncIterable[bytes]) -> StoredFile:
        """Store the PUT body for an initiated upload; `UnknownFile` for unknown or already used tokens.

        A PUT that breaks off (the client went away, the store failed) gives the token back, so the
        client can send the bytes again to the URL it was given; one refused as too large does not.
        """
        if not _TOKEN.fullmatch(token):
            raise UnknownFile(token)
        pending = await asyncio.to_thread(self._claim_pending, token)  # a bucket round trip: off the event loop
        try:
            return await self._save_stream(pending["id"], stream, pending["content_type"], pending["file_name"])
        except UploadTooLarge:
            raise
        except Exception:
            with contextlib.suppress(Exception):  # the store may be what failed: the first error is the one to report
                await asyncio.to_thread(self._put_pending, token, pending)
            raise

    # -- reading files --------------------------------------------------------------------------

    def url_for(self, file_id: str) -> str:
        return f"{self.public_base_url}{FILES_PATH}{file_id}"

    def result_url(self, file_id: str) -> str:
        """The URL a job's result names one of its files by (a backend may hand out its own)."""
        return self.url_for(file_id)

    @abstractmethod
    def get(self, file_id: str) -> StoredFile:
        """Everything known about a stored file; `UnknownFile` if the id is malformed or names nothing stored."""

    @abstractmethod
    def local_path(self, file_id: str) -> Path | None:
        """The file's path when it is on this machine's disk (served and read in place), else None."""

    @abstractmethod
    def open_read(self, file_id: str) -> BinaryIO:
        """The file's bytes as a binary stream to read and close (`contextlib.closing`: a bucket's stream is a
        context manager that hands out its unchecked raw stream); `UnknownFile` when nothing is stored."""

    @abstractmethod
    def read_range(self, file_id: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes `start`..`end` (inclusive) of a stored file, in chunks (what a range request serves)."""

    def local_copy(self, file_id: str, folder: Path) -> Path:
        """A path on this machine holding the file's bytes (a worker reads its inputs so): the stored file itself
        where it is on disk, else a copy written into `folder`."""
        path = self.local_path(file_id)
        if path is not None:
            return path
        target = Path(folder) / file_id
        with contextlib.closing(self.open_read(file_id)) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out, READ_CHUNK_BYTES)
        return target

    def resolve_url(self, url: str) -> str | None:
        """The file id behind one of this store's URLs, so inputs we host need no network round trip.

        None when the URL is not under `<public_base_url>/files/` (fetch it normally); `UnknownFile`
        when it is ours but names no stored file — fetching it over the network could not help.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or (scheme, parts.hostname, _port(parts)) != (
            self._base.scheme, self._base.hostname, _port(self._base)
        ):
            return None
        prefix = self._base.path.rstrip("/") + FILES_PATH
        if not parts.path.startswith(prefix):
            return None
        file_id = parts.path[len(prefix):]
        self.get(file_id)
        return file_id

    # -- removing files -------------------------------------------------------------------------

    @abstractmethod
    def delete(self, file_id: str) -> bool:
        """Remove a stored file; False if there was none."""

    @abstractmethod
    def delete_older_than(self, age_s: float, now: float | None = None) -> int:
        """Delete files (and unused upload reservations) last written more than age_s ago; returns
        how many files went. This is the retention rule: results and inputs live as long as jobs do."""

    # -- what a backend provides ----------------------------------------------------------------

    def new_id(self, file_name: str | None, content_type: str | None) -> str:
        """A random id, ending in the file's extension so URLs still tell players what they hold."""
        suffix = Path(_clean_file_name(file_name) or "").suffix.lower()
        if not _EXTENSION.fullmatch(suffix):
            suffix = mimetypes.guess_extension(_clean_content_type(content_type)) or ""
        return secrets.token_urlsafe(_TOKEN_BYTES) + suffix

    @abstractmethod
    async def _save_stream(self, file_id: str, stream: AsyncIterable[bytes], content_type: str | None,
                           file_name: str | None) -> StoredFile:
        """Store a streamed body under `file_id` (at most `max_upload_bytes`, else `UploadTooLarge`)."""

    @abstractmethod
    def _put_pending(self, token: str, pending: dict) -> None:
        """Keep an initiated upload's reservation under `token`."""

    @abstractmethod
    def _claim_pending(self, token: str) -> dict:
        """Take the reservation of `token` (it works once); `UnknownFile` when there is none."""


def file_id_is_valid(file_id: str) -> bool:
    return bool(_ID.fullmatch(file_id))


def clean_metadata(content_type: str | None, file_name: str | None, file_id: str) -> tuple[str, str]:
    """The content type and file name a stored file keeps: they are echoed in response headers."""
    return _clean_content_type(content_type), _clean_file_name(file_name) or file_id


class LocalFileStore(FileStore):
    """The files under `root` on this machine's disk."""

    def __init__(self, root: Path, public_base_url: str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
        super().__init__(public_base_url, max_upload_bytes)
        self.root = Path(root)
        for folder in ("data", "meta", "pending"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    # -- adding files ---------------------------------------------------------------------------

    async def _save_stream(self, file_id: str, stream: AsyncIterable[bytes], content_type: str | None,
                           file_name: str | None) -> StoredFile:
        await self._write_stream(file_id, stream)
        return self._commit(file_id, content_type, file_name)

    def add_file(self, source: Path, content_type: str | None, file_name: str | None = None) -> StoredFile:
        file_name = file_name or Path(source).name
        file_id = self.new_id(file_name, content_type)
        partial = self._partial_path(file_id)
        try:
            shutil.move(os.fspath(source), partial)  # a copy when crossing file systems, hence the temporary name
            os.replace(partial, self._data_path(file_id))
        finally:
            partial.unlink(missing_ok=True)  # what a failed copy (a full disk) wrote
        return self._commit(file_id, content_type, file_name)

    def _put_pending(self, token: str, pending: dict) -> None:
        _write_json_atomically(self._pending_path(token), pending)

    def _claim_pending(self, token: str) -> dict:
        pending_path = self._pending_path(token)
        try:
            pending = json.loads(pending_path.read_text())
            pending_path.unlink()  # claims the token: a concurrent second PUT fails here or on the read
        except FileNotFoundError:
            raise UnknownFile(token) from None
        return pending

    # -- looking files up -----------------------------------------------------------------------

    def path_for(self, file_id: str) -> Path:
        """The file's path on disk; `UnknownFile` if the id is malformed or nothing is stored under it."""
        path = self._data_path(file_id)
        if not path.is_file():
            raise UnknownFile(file_id)
        return path

    def get(self, file_id: str) -> StoredFile:
        """Everything known about a stored file (what `GET /files/<id>` serves)."""
        self.path_for(file_id)  # UnknownFile for a malformed id or no data
        try:
            meta = json.loads(self._meta_path(file_id).read_text())
        except FileNotFoundError:
            raise UnknownFile(file_id) from None
        return StoredFile(file_id, self.url_for(file_id), meta["content_type"], meta["file_name"], meta["size"])

    def local_path(self, file_id: str) -> Path | None:
        return self.path_for(file_id)

    def open_read(self, file_id: str) -> BinaryIO:
        return self.path_for(file_id).open("rb")

    def read_range(self, file_id: str, start: int, end: int) -> Iterator[bytes]:
        with self.open_read(file_id) as source:
            source.seek(start)
            remaining = end - start + 1
            while remaining > 0 and (chunk := source.read(min(READ_CHUNK_BYTES, remaining))):
                remaining -= len(chunk)
                yield chunk

    def delete(self, file_id: str) -> bool:
        if not _ID.fullmatch(file_id):
            return False
        self._meta_path(file_id).unlink(missing_ok=True)
        try:
            self._data_path(file_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def delete_older_than(self, age_s: float, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - age_s
        deleted = 0
        for path in (self.root / "data").iterdir():
            if _ID.fullmatch(path.name) and _mtime(path) < cutoff and self.delete(path.name):
                deleted += 1
        for path in (self.root / "pending").iterdir():
            if _mtime(path) < cutoff:
                path.unlink(missing_ok=True)
        return deleted

    # -- internals ------------------------------------------------------------------------------

    def _data_path(self, file_id: str) -> Path:
        if not _ID.fullmatch(file_id):
            raise UnknownFile(file_id)
        return self.root / "data" / file_id

    def _partial_path(self, file_id: str) -> Path:
        return self._data_path(file_id).with_name(f".{file_id}.part")

    def _meta_path(self, file_id: str) -> Path:
        return self.root / "meta" / f"{file_id}.json"

    def _pending_path(self, token: str) -> Path:
        return self.root / "pending" / f"{token}.json"

    async def _write_stream(self, file_id: str, stream: AsyncIterable[bytes]) -> None:
        partial = self._partial_path(file_id)
        size = 0
        try:
            with partial.open("wb") as out:
                async for chunk in stream:
                    size += len(chunk)
                    if size > self.max_upload_bytes:
                        raise UploadTooLarge(f"the upload is larger than {self.max_upload_bytes // (1024 * 1024)} MB")
                    out.write(chunk)
            os.replace(partial, self._data_path(file_id))
        finally:
            partial.unlink(missing_ok=True)

    def _commit(self, file_id: str, content_type: str | None, file_name: str | None) -> StoredFile:
        """Record the metadata of data already in place; the file is visible from here on. When the
        metadata cannot be written (a full disk), the data goes too: no file is kept without it."""
        content_type, file_name = clean_metadata(content_type, file_name, file_id)
        meta = {"content_type": content_type, "file_name": file_name, "size": self._data_path(file_id).stat().st_size}
        try:
            _write_json_atomically(self._meta_path(file_id), meta)
        except BaseException:
            self._data_path(file_id).unlink(missing_ok=True)
            raise
        return self.get(file_id)


def _mtime(path: Path) -> float:
    """Modification time, or +inf for a file already gone (a concurrent cleanup)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _port(parts: SplitResult) -> int | None:
    """The explicit or default port; None for a malformed one (such a URL is simply not ours)."""
    try:
        return parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None


def _clean_content_type(content_type: str | None) -> str:
    """The bare `type/subtype`, or octet-stream: it is echoed in a response header, so nothing else passes."""
    bare = (content_type or "").split(";", 1)[0].strip().lower()
    return bare if _CONTENT_TYPE.fullmatch(bare) else DEFAULT_CONTENT_TYPE


def _clean_file_name(file_name: str | None) -> str:
    """The last path component without control characters: shown to users and sent back in headers."""
    name = re.split(r"[/\\]", file_name or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable() and ch not in '"').strip()
    return "" if name in (".", "..") else name[:_MAX_FILE_NAME]


def _write_json_atomically(path: Path, value: dict) -> None:
    partial = path.with_name(f".{path.name}.part")
    try:
        partial.write_text(json.dumps(value))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # left only by a failed write (a full disk)

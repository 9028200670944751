"""Turning a request's input URLs (`image_url`, `first_audio_url`, …) into checked files on disk.

The URLs come from callers, and the server fetches them from inside its own network, so a plain
`GET` would let anyone read cloud metadata (169.254.169.254) or internal services (SSRF), fill the
disk, or feed the decoders something that is not media at all. This module therefore:

* accepts http(s) URLs, `data:` URIs (what `fal_client.encode_file` produces) and URLs of files
  uploaded to this server (read from disk, no round trip), and nothing else;
* resolves every host itself, refuses non-public addresses on the first request and on every
  redirect (redirects are followed by hand for exactly this), and then connects to the vetted
  address, not to the name, so DNS rebinding cannot swap it afterwards (all three through
  `server.files.safe_http`, which webhooks use too);
* caps the size (a too-large Content-Length is refused up front; a body is cut off as soon as it
  passes the cap), and bounds connecting, each read, and the whole download in time;
* decides what a file is from its first bytes, never from its name or Content-Type, refuses a
  mismatch before downloading the rest, and saves it with the matching extension.

Every failure is an `InputError` naming the field, in words a caller can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import base64
import binascii
import os
import re
import tempfile
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal
from urllib.parse import unquote_to_bytes

import httpx

from model.contract.errors import InputError
from server.files import safe_http
from server.files.store import FileStore, UnknownFile

MiB = 1024 * 1024
SNIFF_BYTES = 64  # enough for every signature below, including WebM's doctype and MP4's brands
LOCAL_READ_BYTES = MiB
DOWNLOAD_ERROR = "file_download_error"  # fal's error `type` for inputs that could not be fetched
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

Expect = Literal["image", "audio"]
Kind = Literal["image", "audio", "video", "unknown"]


@dataclass(frozen=True)
class FetchSettings:
    """Limits for fetching inputs.

    `allowed_hosts` lists host names or IP addresses exempt from the private-address refusal: an
    on-prem media server, or 127.0.0.1 in tests (the rule is `safe_http.is_allowed_host`). Everything
    else must resolve to public addresses. Webhooks take the same settings for their receivers.
    """

    max_image_bytes: int = 30 * MiB
    max_audio_bytes: int = 100 * MiB  # audio fields also take video files, which are larger
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float = 300.0  # bounds a server that drips a byte just inside each read timeout
    max_redirects: int = 5
    allowed_hosts: Set[str] = frozenset()
    user_agent: str = "multitalk-server (input fetch)"

    def max_bytes(self, expect: Expect) -> int:
        return self.max_image_bytes if expect == "image" else self.max_audio_bytes


@dataclass(frozen=True)
class FetchedFile:
    """An input on disk; `kind` and `content_type` come from its bytes, not from what the sender claimed."""

    path: Path
    kind: Kind
    content_type: str
    size: int


# -- content sniffing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaType:
    kind: Kind
    label: str
    extension: str
    content_type: str


PNG = MediaType("image", "PNG", ".png", "image/png")
JPEG = MediaType("image", "JPEG", ".jpg", "image/jpeg")
GIF = MediaType("image", "GIF", ".gif", "image/gif")
WEBP = MediaType("image", "WebP", ".webp", "image/webp")
BMP = MediaType("image", "BMP", ".bmp", "image/bmp")
TIFF = MediaType("image", "TIFF", ".tiff", "image/tiff")
AVIF = MediaType("image", "AVIF", ".avif", "image/avif")
WAV = MediaType("audio", "WAV", ".wav", "audio/wav")
MP3 = MediaType("audio", "MP3", ".mp3", "audio/mpeg")
AAC = MediaType("audio", "AAC", ".aac", "audio/aac")
FLAC = MediaType("audio", "FLAC", ".flac", "audio/flac")
OGG = MediaType("audio", "OGG", ".ogg", "audio/ogg")
M4A = MediaType("audio", "M4A", ".m4a", "audio/mp4")
MP4 = MediaType("video", "MP4", ".mp4", "video/mp4")
MOV = MediaType("video", "MOV", ".mov", "video/quicktime")
WEBM = MediaType("video", "WebM", ".webm", "video/webm")
MKV = MediaType("video", "Matroska", ".mkv", "video/x-matroska")
AVI = MediaType("video", "AVI", ".avi", "video/x-msvideo")
UNKNOWN = MediaType("unknown", "unknown", ".bin", "application/octet-stream")
KNOWN_TYPES = (PNG, JPEG, GIF, WEBP, BMP, TIFF, AVIF, WAV, MP3, AAC, FLAC, OGG, M4A, MP4, MOV, WEBM, MKV, AVI)

_PREFIXES = (
    (b"\x89PNG\r\n\x1a\n", PNG), (b"\xff\xd8\xff", JPEG), (b"GIF87a", GIF), (b"GIF89a", GIF),
    (b"II*\x00", TIFF), (b"MM\x00*", TIFF), (b"ID3", MP3), (b"fLaC", FLAC), (b"OggS", OGG),
)  # fmt: skip
_RIFF_FORMS = {b"WAVE": WAV, b"WEBP": WEBP, b"AVI ": AVI}
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P "}
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1"}  # HEIC: no decoder here
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip"}  # old .mov files start without `ftyp`
_EBML = b"\x1a\x45\xdf\xa3"


def sniff(head: bytes) -> MediaType:
    """The media type announced by a file's first bytes (`SNIFF_BYTES` of them suffice); UNKNOWN if none."""
    for prefix, media_type in _PREFIXES:
        if head.startswith(prefix):
            return media_type
    if head.startswith(b"RIFF"):
        return _RIFF_FORMS.get(head[8:12], UNKNOWN)
    if head[4:8] == b"ftyp":
        return _sniff_iso_media(head)
    if head[4:8] in _QUICKTIME_ATOMS:
        return MOV
    if head.startswith(_EBML):
        return WEBM if b"webm" in head[:SNIFF_BYTES] else MKV
    if _is_adts(head):
        return AAC
    if _is_mpeg_audio_frame(head):
        return MP3
    if head.startswith(b"BM") and head[6:10] == b"\x00\x00\x00\x00":  # BMP's reserved header words
        return BMP
    return UNKNOWN


def _sniff_iso_media(head: bytes) -> MediaType:
    """ISO base media (`ftyp` box): audio-only M4A, AVIF stills, HEIC (unsupported), else MP4/MOV video."""
    major = head[8:12]
    box_end = min(int.from_bytes(head[0:4], "big"), len(head))
    if b"avif" in head[8:box_end] or major == b"avis":
        return AVIF
    if major in _HEIF_BRANDS:
        return UNKNOWN
    if major in _AUDIO_BRANDS:
        return M4A
    return MOV if major == b"qt  " else MP4


def _is_adts(head: bytes) -> bool:
    """AAC ADTS frame header: 12 sync bits, layer 00, a valid sampling-frequency index."""
    return len(head) >= 3 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0 and (head[2] >> 2) & 0x0F < 13


def _is_mpeg_audio_frame(head: bytes) -> bool:
    """An MPEG audio frame header (MP3 without an ID3 tag): sync bits and no reserved field values."""
    if len(head) < 3 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer = (head[1] >> 3) & 3, (head[1] >> 1) & 3
    bitrate, sample_rate = head[2] >> 4, (head[2] >> 2) & 3
    return version != 1 and layer != 0 and bitrate != 15 and sample_rate != 3


# -- writing one input to disk ------------------------------------------------------------------

_ACCEPTED_KINDS = {"image": ("image",), "audio": ("audio", "video")}  # ffmpeg takes a video's audio track
_EXPECTED_NOUN = {"image": "an image", "audio": "audio"}


class _Download:
    """One input on its way to disk: size cap, type check from the first bytes, no leftovers on failure.

    Use as a context manager, `feed` the bytes, then `finish`; any exception in between deletes
    the partial file.
    """

    def __init__(self, field: str, expect: Expect, dest_dir: Path, max_bytes: int):
        self.field = field
        self.expect = expect
        self.dest_dir = dest_dir
        self.max_bytes = max_bytes
        self.size = 0
        self._head = bytearray()
        self._media_type: MediaType | None = None
        self._file: BinaryIO | None = None
        self._path: Path | None = None

    def __enter__(self) -> _Download:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()
        if exc_type is not None and self._path is not None:
            self._path.unlink(missing_ok=True)

    def too_large(self) -> InputError:
        limit = f"{self.max_bytes / MiB:.3g} MB, the limit for {_EXPECTED_NOUN[self.expect]}"
        return InputError(self.field, f"the file is larger than {limit}")

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise self.too_large()
        if self._file is not None:
            self._file.write(chunk)
            return
        self._head += chunk
        if len(self._head) >= SNIFF_BYTES:
            self._open()

    def finish(self) -> FetchedFile:
        if self._file is None:
            if not self._head:
                raise InputError(self.field, "the file is empty")
            self._open()
        self._file.close()
        return FetchedFile(self._path, self._media_type.kind, self._media_type.content_type, self.size)

    def _open(self) -> None:
        """Check the type from the bytes so far, then start the file with the matching extension."""
        head = bytes(self._head[:SNIFF_BYTES])
        media_type = sniff(head)
        self._check(media_type, head)
        self.dest_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{self.field}-", suffix=media_type.extension, dir=self.dest_dir)
        self._media_type, self._path, self._file = media_type, Path(name), os.fdopen(fd, "wb")
        self._file.write(self._head)
        self._head = bytearray()

    def _check(self, media_type: MediaType, head: bytes) -> None:
        accepted = _ACCEPTED_KINDS[self.expect]
        if media_type.kind == "unknown":
            formats = ", ".join(t.label for t in KNOWN_TYPES if t.kind in accepted)
            markup = head.lstrip()[:1] == b"<"
            hint = " — this looks like a web page or other markup, not a media file" if markup else ""
            raise InputError(self.field, f"not a supported {self.expect} format (accepted: {formats}){hint}")
        if media_type.kind not in accepted:
            raise InputError(
                self.field, f"expected {_EXPECTED_NOUN[self.expect]}, got {media_type.kind} data ({media_type.label})"
            )


# -- the entry point ----------------------------------------------------------------------------

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


async def fetch_input(
    url: str,
    field: str,
    dest_dir: Path,
    settings: FetchSettings,
    local_files: FileStore | None = None,
    *,
    expect: Expect,
) -> FetchedFile:
    """Fetch the input `field` from `url` into `dest_dir` as an `expect` file ("audio" also takes video).

    Raises `InputError(field, reason)` for anything that keeps the input from being used.
    """
    url = url.strip()
    scheme = _SCHEME.match(url)
    with _Download(field, expect, Path(dest_dir), settings.max_bytes(expect)) as download:
        if scheme and scheme.group(1).lower() == "data":
            download.feed(_decode_data_uri(url, field))
            return download.finish()
        stored_id = await asyncio.to_thread(_stored_file_id, url, field, local_files)  # a bucket may be asked
        if stored_id is not None:
            return await asyncio.to_thread(_copy_stored, local_files, stored_id, download)
        fetching = _fetch_http(_http_url(url, field), download, settings)
        try:
            return await asyncio.wait_for(fetching, settings.total_timeout)
        except asyncio.TimeoutError:
            reason = f"the download took longer than {settings.total_timeout:g} s"
            raise InputError(field, reason, DOWNLOAD_ERROR) from None


def _decode_data_uri(uri: str, field: str) -> bytes:
    """The bytes of `data:[<type>][;base64],<data>`, base64 (standard or URL-safe) or percent-encoded."""
    header, comma, payload = uri[len("data:"):].partition(",")
    if not comma:
        raise InputError(field, "malformed data URI: no ',' separates the header from the data")
    raw = unquote_to_bytes(payload)
    if header.split(";")[-1].strip().lower() != "base64":
        return raw
    compact = bytes(raw.translate(None, b" \t\r\n")).translate(bytes.maketrans(b"-_", b"+/"))
    try:
        return base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
    except binascii.Error as error:
        raise InputError(field, f"malformed data URI: the base64 data does not decode ({error})") from None


def _stored_file_id(url: str, field: str, local_files: FileStore | None) -> str | None:
    if local_files is None:
        return None
    try:
        return local_files.resolve_url(url)
    except UnknownFile:
        reason = "names an uploaded file that does not exist on this server (uploads may expire)"
        raise InputError(field, reason) from None


def _copy_stored(files: FileStore, file_id: str, download: _Download) -> FetchedFile:
    """Copy an uploaded file through the same checks as a download (runs in a worker thread)."""
    with contextlib.closing(files.open_read(file_id)) as source:
        for chunk in iter(lambda: source.read(LOCAL_READ_BYTES), b""):
            download.feed(chunk)
    return download.finish()


# -- http(s) ------------------------------------------------------------------------------------


def _http_url(text: str, field: str, base: httpx.URL | None = None) -> httpx.URL:
    """`text` (relative to `base` when following a redirect) as an absolute http(s) URL, or InputError."""
    where = "was redirected to" if base is not None else "is"
    try:
        url = base.join(text) if base is not None else httpx.URL(text)
    except httpx.InvalidURL as error:
        raise InputError(field, f"{where} not a valid URL ({error})") from None
    if url.scheme not in safe_http.HTTP_SCHEMES:
        shown = f"the unsupported URL scheme '{url.scheme}'" if url.scheme else "a URL without a scheme"
        raise InputError(field, f"{where} {shown}: use an http(s) URL or a data: URI")
    if not url.host:
        raise InputError(field, f"{where} not a valid URL (no host)")
    return url


async def _fetch_http(url: httpx.URL, download: _Download, settings: FetchSettings) -> FetchedFile:
    """Follow redirects by hand, vetting and pinning the address of every hop, then save the body."""
    field = download.field
    ssl_context = httpx.create_ssl_context()  # per fetch, so SSL_CERT_FILE changes apply
    headers = {
        "User-Agent": settings.user_agent,
        "Accept-Encoding": "identity",  # media gains nothing from compression, and a cap on decoded bytes is simpler
    }
    timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
    for _ in range(settings.max_redirects + 1):
        addresses = await _vet(url, field, settings)
        try:
            # A fresh transport per hop (pinned_request makes one), and no client: see safe_http.
            async with safe_http.pinned_request(
                "GET", url, addresses, headers=headers, timeout=timeout, verify=ssl_context
            ) as response:
                if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                    location = response.headers["location"]
                else:
                    return await _save_body(response, download)
        except httpx.TransportError as error:
            raise _transport_failure(error, url, field, settings) from None
        url = _http_url(location, field, base=url)
    raise InputError(field, f"too many redirects (more than {settings.max_redirects})", DOWNLOAD_ERROR)


async def _vet(url: httpx.URL, field: str, settings: FetchSettings) -> list[str]:
    """`safe_http.vetted_addresses`, its refusals as InputError: a host that does not resolve is a
    download error, a private address is the caller's mistake (the default kind)."""
    try:
        return await safe_http.vetted_addresses(
            url, allowed_hosts=settings.allowed_hosts, lookup_timeout=settings.connect_timeout
        )
    except safe_http.Unreachable as error:
        raise InputError(field, error.reason, DOWNLOAD_ERROR) from None
    except safe_http.Refused as error:
        raise InputError(field, error.reason) from None


async def _save_body(response: httpx.Response, download: _Download) -> FetchedFile:
    if not response.is_success:
        raise InputError(download.field, f"the server answered {response.status_code}", DOWNLOAD_ERROR)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > download.max_bytes:
        raise download.too_large()
    async for chunk in response.aiter_bytes():
        download.feed(chunk)
    return download.finish()


def _transport_failure(error: httpx.TransportError, url: httpx.URL, field: str, settings: FetchSettings) -> InputError:
    host = f"{url.host}:{url.port}" if url.port else url.host
    detail = str(error) or type(error).__name__
    if isinstance(error, httpx.ConnectTimeout):
        reason = f"could not reach {host}: no connection within {settings.connect_timeout:g} s"
    elif isinstance(error, httpx.ConnectError):
        reason = f"could not reach {host}: the connection failed ({detail})"
    elif isinstance(error, httpx.TimeoutException):
        reason = f"{host} sent no data for {settings.read_timeout:g} s"
    else:
        reason = f"the download from {host} broke off: {detail}"
    return InputError(field, reason, DOWNLOAD_ERROR)

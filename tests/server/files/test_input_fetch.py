"""Input fetching and the local file store, against a real HTTP server on 127.0.0.1.

Covers what a hostile or broken URL can do: private addresses (directly, by DNS, by redirect),
endless redirects, bodies too large with and without Content-Length, lying Content-Length,
stalled servers, disguised files, malformed data URIs and path traversal in store URLs.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote_from_bytes, urlsplit

import pytest

from model.contract.errors import InputError
from server.files import safe_http
from server.files.fetch import FetchSettings, MiB, fetch_input, sniff
from server.files.safe_http import is_public_address
from server.files.store import LocalFileStore, UnknownFile, UploadTooLarge

PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200)
WAV_BYTES = b"RIFF\x00\x01\x00\x00WAVEfmt " + bytes(200)
MP4_BYTES = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(200)
HTML_BYTES = b"<!DOCTYPE html><html><body>Sign in to view this file</body></html>" + bytes(10)

LOCAL = FetchSettings(allowed_hosts={"127.0.0.1"}, connect_timeout=2.0, read_timeout=2.0, total_timeout=10.0)
SMALL = FetchSettings(allowed_hosts={"127.0.0.1"}, max_image_bytes=MiB, max_audio_bytes=MiB, read_timeout=0.3)


# -- the test server ----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers["Host"]))
        parts = urlsplit(self.path)
        route = ROUTES.get(parts.path)
        if route is None and parts.path.startswith("/hop/"):
            route = _hop
        try:
            (route or _not_found)(self, parse_qs(parts.query))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose

    def reply(self, body: bytes, content_type: str = "application/octet-stream", status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _not_found(handler: _Handler, query: dict) -> None:
    handler.reply(b"not here", "text/plain", 404)


def _hop(handler: _Handler, query: dict) -> None:
    """/hop/N redirects N times (relative Locations) before landing on the WAV file."""
    left = int(handler.path.rsplit("/", 1)[1])
    handler.redirect(f"/hop/{left - 1}" if left > 1 else "/speech.wav")


def _endless(handler: _Handler, query: dict) -> None:
    """Streams PNG-looking bytes without Content-Length until the client hangs up."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(PNG_BYTES)
    for _ in range(64 * 16):  # stops at 64 MiB even if nobody hangs up
        handler.wfile.write(bytes(64 * 1024))
    handler.close_connection = True


def _declared_huge(handler: _Handler, query: dict) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(50 * 1024**3))
    handler.end_headers()
    handler.close_connection = True


def _short_body(handler: _Handler, query: dict) -> None:
    """Content-Length promises more than is sent."""
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    handler.wfile.write(PNG_BYTES)
    handler.close_connection = True


def _long_body(handler: _Handler, query: dict) -> None:
    """Content-Length claims a small file, then 3 MiB follow."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(PNG_BYTES)))
    handler.end_headers()
    handler.wfile.write(PNG_BYTES + bytes(3 * MiB))
    handler.close_connection = True


def _slow(handler: _Handler, query: dict) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(PNG_BYTES)))
    handler.end_headers()
    handler.wfile.flush()
    time.sleep(1.5)
    handler.wfile.write(PNG_BYTES)


ROUTES: dict[str, Callable[[_Handler, dict], None]] = {
    "/image.png": lambda h, q: h.reply(PNG_BYTES, "image/png"),
    "/speech.wav": lambda h, q: h.reply(WAV_BYTES, "audio/wav"),
    "/download": lambda h, q: h.reply(WAV_BYTES),  # no name, no useful type: sniffing must tell
    "/clip.mp4": lambda h, q: h.reply(MP4_BYTES, "video/mp4"),
    "/song.mp3": lambda h, q: h.reply(PNG_BYTES, "audio/mpeg"),  # a PNG in disguise
    "/share": lambda h, q: h.reply(HTML_BYTES, "text/html"),
    "/empty": lambda h, q: h.reply(b"", "image/png"),
    "/loop": lambda h, q: h.redirect("/loop"),
    "/to": lambda h, q: h.redirect(q["url"][0]),
    "/endless": _endless,
    "/declared-huge": _declared_huge,
    "/short-body": _short_body,
    "/long-body": _long_body,
    "/slow": _slow,
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, str]] = []

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _serving(server: _Server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def http_server():
    yield from _serving(_Server())


@pytest.fixture
def server(http_server: _Server) -> _Server:
    http_server.seen.clear()
    return http_server


# -- helpers ------------------------------------------------------------------------------------


def _fetch(url: str, dest: Path, expect: str = "image", settings: FetchSettings = LOCAL, local_files=None):
    field = "image_url" if expect == "image" else "first_audio_url"
    return asyncio.run(fetch_input(url, field, dest, settings, local_files, expect=expect))


def _refused(url: str, dest: Path, expect: str = "image", settings: FetchSettings = LOCAL, **store) -> InputError:
    with pytest.raises(InputError) as caught:
        _fetch(url, dest, expect, settings, **store)
    assert caught.value.field == ("image_url" if expect == "image" else "first_audio_url")
    assert not list(dest.glob("*")), "a failed fetch must leave no file behind"
    return caught.value


def _data_uri(data: bytes, media_type: str = "application/octet-stream") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


# -- http(s) ------------------------------------------------------------------------------------


def test_fetches_an_image_and_names_it_by_its_content(server, tmp_path):
    fetched = _fetch(server.url("/image.png"), tmp_path)
    assert (fetched.kind, fetched.content_type, fetched.size) == ("image", "image/png", len(PNG_BYTES))
    assert fetched.path.parent == tmp_path and fetched.path.suffix == ".png"
    assert fetched.path.read_bytes() == PNG_BYTES
    assert server.seen == [("/image.png", f"127.0.0.1:{server.port}")]


def test_sniffs_audio_without_a_name_or_content_type(server, tmp_path):
    fetched = _fetch(server.url("/download"), tmp_path, expect="audio")
    assert (fetched.kind, fetched.content_type, fetched.path.suffix) == ("audio", "audio/wav", ".wav")


def test_audio_fields_take_video_containers(server, tmp_path):
    fetched = _fetch(server.url("/clip.mp4"), tmp_path, expect="audio")
    assert (fetched.kind, fetched.path.suffix) == ("video", ".mp4")


def test_a_png_named_mp3_is_refused_for_an_audio_field(server, tmp_path):
    error = _refused(server.url("/song.mp3"), tmp_path, expect="audio")
    assert error.reason == "expected audio, got image data (PNG)"


def test_a_web_page_is_not_a_supported_format(server, tmp_path):
    error = _refused(server.url("/share"), tmp_path)
    assert error.reason.startswith("not a supported image format (accepted: PNG, JPEG")
    assert "web page" in error.reason


def test_empty_body(server, tmp_path):
    assert _refused(server.url("/empty"), tmp_path).reason == "the file is empty"


def test_http_error_status(server, tmp_path):
    error = _refused(server.url("/missing.png"), tmp_path)
    assert (error.reason, error.kind) == ("the server answered 404", "file_download_error")


def test_follows_a_redirect_chain(server, tmp_path):
    fetched = _fetch(server.url("/hop/5"), tmp_path, expect="audio")  # 5 redirects: exactly the default limit
    assert fetched.content_type == "audio/wav"
    assert [path for path, _ in server.seen] == ["/hop/5", "/hop/4", "/hop/3", "/hop/2", "/hop/1", "/speech.wav"]


@pytest.mark.parametrize("path", ["/hop/6", "/loop"])
def test_too_many_redirects(server, path, tmp_path):
    assert _refused(server.url(path), tmp_path, expect="audio").reason == "too many redirects (more than 5)"
    assert len(server.seen) == 6


def test_body_without_length_is_cut_off_at_the_cap(server, tmp_path):
    started = time.monotonic()
    assert _refused(server.url("/endless"), tmp_path, settings=SMALL).reason == (
        "the file is larger than 1 MB, the limit for an image"
    )
    assert time.monotonic() - started < 5


def test_declared_length_over_the_cap_is_refused_up_front(server, tmp_path):
    error = _refused(server.url("/declared-huge"), tmp_path, expect="audio", settings=SMALL)
    assert error.reason == "the file is larger than 1 MB, the limit for audio"


def test_lying_content_length(server, tmp_path):
    """Too short a promise: only the declared bytes are read. Too long: the download broke off."""
    fetched = _fetch(server.url("/long-body"), tmp_path, settings=SMALL)
    assert fetched.size == len(PNG_BYTES)
    fetched.path.unlink()
    error = _refused(server.url("/short-body"), tmp_path, settings=SMALL)
    assert error.reason.startswith(f"the download from 127.0.0.1:{server.port} broke off")


def test_stalled_server_times_out(server, tmp_path):
    started = time.monotonic()
    error = _refused(server.url("/slow"), tmp_path, settings=SMALL)
    assert error.reason == f"127.0.0.1:{server.port} sent no data for 0.3 s"
    assert time.monotonic() - started < 1.4


def test_total_time_is_bounded(server, tmp_path):
    settings = FetchSettings(allowed_hosts={"127.0.0.1"}, read_timeout=5, total_timeout=0.3)
    assert _refused(server.url("/slow"), tmp_path, settings=settings).reason == "the download took longer than 0.3 s"


def test_unreachable_hosts(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = _refused(f"http://127.0.0.1:{port}/x.png", tmp_path)
    assert error.reason.startswith(f"could not reach 127.0.0.1:{port}: the connection failed (")

    async def no_such_name(host: str, port: int) -> list[str]:  # as the resolver says it, without needing DNS
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(safe_http, "resolve", no_such_name)
    error = _refused("http://no-such-host.invalid/x.png", tmp_path)
    assert error.reason == "could not reach no-such-host.invalid: the host name does not resolve"


# -- refusing private addresses -----------------------------------------------------------------


@pytest.mark.parametrize(
    "url, address",
    [
        ("http://127.0.0.1:{port}/image.png", "127.0.0.1"),
        ("http://localhost:{port}/image.png", None),
        ("http://[::1]:{port}/image.png", "::1"),
        ("http://10.0.0.5/image.png", "10.0.0.5"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("https://100.64.1.2/a.png", "100.64.1.2"),
    ],
)
def test_private_addresses_are_refused_by_default(server, url, address, tmp_path):
    error = _refused(url.format(port=server.port), tmp_path, settings=FetchSettings())
    assert error.reason.startswith("points to a private or local network address (")
    assert error.reason.endswith("), which is not allowed")
    if address:
        assert f"({address})" in error.reason
    assert server.seen == []


@pytest.mark.parametrize("target", ["http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/"])
def test_redirect_to_a_private_address_is_refused_without_connecting(server, target, tmp_path, monkeypatch):
    contacted = []
    send = safe_http.pinned_request

    def spy(method, url, addresses, **options):
        contacted.append(addresses)
        return send(method, url, addresses, **options)

    monkeypatch.setattr(safe_http, "pinned_request", spy)
    error = _refused(server.url(f"/to?url={target}"), tmp_path)
    assert f"({urlsplit(target).hostname})" in error.reason
    assert contacted == [["127.0.0.1"]]


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://example.com/a.png", "data:image/png;base64,AAAA"])
def test_redirect_to_another_scheme_is_refused(server, target, tmp_path):
    error = _refused(server.url(f"/to?url={target}"), tmp_path)
    assert error.reason.startswith(f"was redirected to the unsupported URL scheme '{target.split(':')[0]}'")


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
        ("10.0.0.5", False), ("172.16.3.4", False), ("192.168.1.1", False), ("127.0.0.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.251", False),
        ("240.0.0.1", False), ("255.255.255.255", False), ("::1", False), ("::", False), ("fc00::1", False),
        ("fd12:3456::1", False), ("fe80::1", False), ("fe80::1%eth0", False), ("ff02::1", False),
        ("::ffff:10.0.0.1", False), ("2002:a00:1::", False), ("64:ff9b::a9fe:a9fe", False),
    ],
)  # fmt: skip
def test_public_address_classification(address, public):
    assert is_public_address(address) is public


def _fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """Replace the resolver; returns the list of names looked up."""
    lookups = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return answers[host]

    monkeypatch.setattr(safe_http, "resolve", resolve)
    return lookups


def test_a_name_with_any_private_record_is_refused(monkeypatch, tmp_path):
    _fake_dns(monkeypatch, {"media.example": ["93.184.216.34", "10.0.0.5"]})
    assert "(10.0.0.5)" in _refused("http://media.example/a.png", tmp_path, settings=FetchSettings()).reason


def test_connects_to_the_vetted_address_with_the_original_host_header(server, monkeypatch, tmp_path):
    lookups = _fake_dns(monkeypatch, {"media.example": ["127.0.0.1"]})
    settings = FetchSettings(allowed_hosts={"media.example"})
    fetched = _fetch(server.url("/image.png", host="media.example"), tmp_path, settings=settings)
    assert fetched.content_type == "image/png"
    assert server.seen == [("/image.png", f"media.example:{server.port}")]
    assert lookups == ["media.example"]  # resolved once, by us: nothing later can rebind it


def _tls_files(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for `name`, made with `cryptography`."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool, san: list | None = None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", ca_key, "test CA", ca_key, ca=True)
    leaf = certificate(name, server_key, "test CA", ca_key, ca=False, san=[x509.DNSName(name)])
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def test_https_keeps_sni_and_certificate_checks_on_the_name(monkeypatch, tmp_path):
    ca, cert, key = _tls_files(tmp_path, "media.example")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    tls_server = _Server()
    tls_server.socket = context.wrap_socket(tls_server.socket, server_side=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    _fake_dns(monkeypatch, {"media.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]})
    settings = FetchSettings(allowed_hosts={"127.0.0.1"}, connect_timeout=2.0)
    dest = tmp_path / "inputs"
    for running in _serving(tls_server):
        fetched = _fetch(f"https://media.example:{running.port}/image.png", dest, settings=settings)
        assert fetched.content_type == "image/png"
        assert running.seen == [("/image.png", f"media.example:{running.port}")]
        fetched.path.unlink()
        error = _refused(f"https://other.example:{running.port}/image.png", dest, settings=settings)
        assert error.reason.startswith(f"could not reach other.example:{running.port}: the connection failed (")
        assert "certificate" in error.reason.lower()


# -- other URL forms ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, shown",
    [
        ("ftp://example.com/a.png", "the unsupported URL scheme 'ftp'"),
        ("file:///etc/passwd", "the unsupported URL scheme 'file'"),
        ("javascript:alert(1)", "the unsupported URL scheme 'javascript'"),
        ("example.com/a.png", "a URL without a scheme"),
    ],
)
def test_unsupported_schemes(url, shown, tmp_path):
    assert _refused(url, tmp_path).reason == f"is {shown}: use an http(s) URL or a data: URI"


def test_data_uris(tmp_path):
    image = _fetch(_data_uri(PNG_BYTES, "image/png"), tmp_path)
    assert (image.content_type, image.path.read_bytes()) == ("image/png", PNG_BYTES)
    audio = _fetch("data:audio/wav," + quote_from_bytes(WAV_BYTES), tmp_path, expect="audio")  # percent-encoded
    assert audio.path.read_bytes() == WAV_BYTES
    unpadded = base64.urlsafe_b64encode(PNG_BYTES[:70]).decode().rstrip("=")
    assert _fetch(f"data:;base64,{unpadded}", tmp_path).size == 70


@pytest.mark.parametrize(
    "uri, expect, reason",
    [
        ("data:image/png;base64", "image", "malformed data URI: no ',' separates the header from the data"),
        ("data:image/png;base64,iVBOR*w0K", "image", "malformed data URI: the base64 data does not decode"),
        ("data:image/png;base64,", "image", "the file is empty"),
        (_data_uri(WAV_BYTES, "image/png"), "image", "expected an image, got audio data (WAV)"),
        (_data_uri(b"just some text, long enough to be sniffed as nothing in particular"), "audio",
         "not a supported audio format (accepted: WAV, MP3, AAC, FLAC, OGG, M4A, MP4, MOV, WebM, Matroska, AVI)"),
        (_data_uri(PNG_BYTES + bytes(MiB)), "image", "the file is larger than 1 MB, the limit for an image"),
    ],
)  # fmt: skip
def test_bad_data_uris(uri, expect, reason, tmp_path):
    assert _refused(uri, tmp_path, expect=expect, settings=SMALL).reason.startswith(reason)


@pytest.mark.parametrize(
    "head, label",
    [
        (PNG_BYTES, "PNG"), (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"), (b"GIF89a\x01\x00", "GIF"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WebP"), (b"BM\x36\x00\x0c\x00\x00\x00\x00\x00\x36\x00", "BMP"),
        (b"II*\x00\x08\x00", "TIFF"), (b"MM\x00*\x00\x00", "TIFF"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1", "AVIF"), (WAV_BYTES, "WAV"),
        (b"ID3\x04\x00\x00", "MP3"), (b"\xff\xfb\x90\x64\x00", "MP3"), (b"\xff\xf1\x50\x80\x02", "AAC"),
        (b"fLaC\x00\x00\x00\x22", "FLAC"), (b"OggS\x00\x02", "OGG"),
        (b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42", "M4A"), (MP4_BYTES, "MP4"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  ", "MOV"), (b"\x00\x00\x00\x08wide\x00\x00", "MOV"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "WebM"),
        (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska", "Matroska"),
        (b"RIFF\x10\x00\x00\x00AVI LIST", "AVI"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "unknown"), (b"hello world", "unknown"),
        (b"RIFF\x10\x00\x00\x00XXXX", "unknown"), (b"", "unknown"),
    ],
)  # fmt: skip
def test_sniff(head, label):
    assert sniff(head).label == label


# -- the file store -----------------------------------------------------------------------------

PUBLIC = "http://10.1.2.3:8000/mt"  # a private address: fetching it over the network would be refused


@pytest.fixture
def store(tmp_path) -> LocalFileStore:
    return LocalFileStore(tmp_path / "store", PUBLIC, max_upload_bytes=MiB)


def test_upload_url_resolves_locally_without_the_network(store, tmp_path):
    stored = asyncio.run(store.save_upload(_chunks(WAV_BYTES[:100], WAV_BYTES[100:]), "audio/wav", "me.WAV"))
    assert stored.url == f"{PUBLIC}/files/{stored.id}" and stored.id.endswith(".wav")
    assert (stored.content_type, stored.file_name, stored.size) == ("audio/wav", "me.WAV", len(WAV_BYTES))
    assert store.resolve_url(stored.url) == stored.id and store.local_path(stored.id) == store.path_for(stored.id)
    fetched = _fetch(stored.url, tmp_path / "job", expect="audio", settings=FetchSettings(), local_files=store)
    assert fetched.path.read_bytes() == WAV_BYTES and fetched.path.parent == tmp_path / "job"
    error = _refused(stored.url, tmp_path / "job2", expect="image", local_files=store)
    assert error.reason == "expected an image, got audio data (WAV)"


def test_initiate_and_put_upload(store, tmp_path):
    pending = store.initiate_upload("image/png", "face.png")
    token = pending.upload_url.rsplit("/", 1)[1]
    assert pending.upload_url.startswith(f"{PUBLIC}/storage/uploads/") and token not in pending.file_url
    with pytest.raises(UnknownFile):
        store.resolve_url(pending.file_url)  # nothing there until the PUT
    stored = asyncio.run(store.complete_upload(token, _chunks(PNG_BYTES)))
    assert stored.url == pending.file_url and store.get(stored.id).file_name == "face.png"
    fetched = _fetch(pending.file_url, tmp_path / "job", settings=FetchSettings(), local_files=store)
    assert fetched.size == len(PNG_BYTES)
    with pytest.raises(UnknownFile):
        asyncio.run(store.complete_upload(token, _chunks(b"overwrite")))  # each token works once
    assert store.path_for(stored.id).read_bytes() == PNG_BYTES


def test_upload_limit_keeps_nothing(store):
    with pytest.raises(UploadTooLarge):
        asyncio.run(store.save_upload(_chunks(bytes(MiB), b"x"), "image/png", "big.png"))
    assert not any((store.root / "data").iterdir())


def test_add_file_and_delete(store, tmp_path):
    video = tmp_path / "result.mp4"
    video.write_bytes(MP4_BYTES)
    stored = store.add_file(video, "video/mp4")
    assert not video.exists() and stored.file_name == "result.mp4" and stored.url.endswith(".mp4")
    assert store.delete(stored.id) and not store.delete(stored.id)
    with pytest.raises(UnknownFile):
        store.get(stored.id)


def test_store_urls_cannot_escape_the_store(store, tmp_path):
    (store.root / "secret.txt").write_text("no")
    for bad in ["../secret.txt", "..%2Fsecret.txt", "", "x" * 32 + "/../../secret.txt", "a.b.c", "/etc/passwd"]:
        with pytest.raises(UnknownFile):
            store.resolve_url(f"{PUBLIC}/files/{bad}")
        with pytest.raises(UnknownFile):
            store.path_for(bad)
        assert store.delete(bad) is False
    error = _refused(f"{PUBLIC}/files/../secret.txt", tmp_path / "job", local_files=store)
    assert error.reason.startswith("names an uploaded file that does not exist on this server")


def test_only_this_stores_urls_resolve(store):
    file_id = "A" * 32
    for other in [f"http://10.1.2.3:8001/mt/files/{file_id}", f"https://10.1.2.3:8000/mt/files/{file_id}",
                  f"http://10.1.2.3:8000/files/{file_id}", f"http://example.com/mt/files/{file_id}", "data:,x",
                  f"http://10.1.2.3:port/mt/files/{file_id}"]:
        assert store.resolve_url(other) is None
    same_host = LocalFileStore(store.root, "https://Media.Example/")
    with pytest.raises(UnknownFile):  # recognised as ours despite case and explicit default port; nothing stored
        same_host.resolve_url(f"https://media.example:443/files/{file_id}")


def test_upload_names_and_types_are_cleaned(store):
    stored = asyncio.run(store.save_upload(_chunks(b"x"), "text/html\r\nSet-Cookie: a=b", "../../evil\x00.sh"))
    assert (stored.content_type, stored.file_name) == ("application/octet-stream", "evil.sh")
    assert store.path_for(stored.id).parent == store.root / "data"

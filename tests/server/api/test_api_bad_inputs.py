"""A battery of bad requests against a running `multitalk serve`: each is refused with a 4xx whose
`detail` names the offending field and says why, and the server keeps serving afterwards.

Inputs are fetched and checked by the API at submit time (server/submission.py), so the server has
no worker (`--workers 0`): nothing here needs a video. It allows 127.0.0.1 for input URLs, so a
local HTTP server can serve web pages, media of the wrong kind and lying Content-Lengths, and it
limits JSON bodies to BODY_LIMIT bytes.

`http://localhost:PORT/` is deliberately not a case: whether it is refused depends on what
`localhost` resolves to (only 127.0.0.1, which is allowed, on some hosts; also ::1, which is not, on
others). `http://[::1]/` and the other address literals below test the refusal without that doubt.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from local_servers import free_port
from server_harness import Cluster

pytestmark = [pytest.mark.service]

RUN = "/fal-ai/ai-avatar/multi"
SUBMIT = "/queue/fal-ai/ai-avatar/multi"
BODY_LIMIT = 512 * 1024  # well above a valid body with inline example media (about 190 KB)
HUGE_CONTENT_LENGTH = 64 * 1024**3  # far past the 30 MB image cap (FetchSettings; no setting lowers it)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISSING = object()  # a change that removes the field


@dataclasses.dataclass(frozen=True)
class Bad:
    """One bad request: `changes` applied to a valid body (or `raw` sent instead), and what the
    error must say: `field` in its `loc` (under `where`) and at the start of its `msg`, `reason` in
    the `msg`. `field=None` means the body as a whole. Strings may use `{media}` (the local media
    server), `{closed}` (a port nobody listens on) and `{api}` (the server under test)."""

    id: str
    changes: dict = dataclasses.field(default_factory=dict)
    field: str | None = None
    reason: str = ""
    raw: bytes | None = None
    query: str = ""
    where: str = "body"
    status: int = 422
    streamed: bool = False  # send the body in chunks, without a Content-Length


def bad_field(id: str, name: str, value, reason: str) -> Bad:
    return Bad(id, {name: value}, name, reason)


CASES = [
    # wrong types and values, field by field
    bad_field("num_frames-text", "num_frames", "abc", "valid integer"),
    bad_field("num_frames-boolean", "num_frames", True, "not a boolean"),
    bad_field("num_frames-fraction", "num_frames", 12.5, "fractional part"),
    bad_field("num_frames-below-41", "num_frames", 40, "greater than or equal to 41"),
    bad_field("num_frames-above-241", "num_frames", 242, "less than or equal to 241"),
    bad_field("seed-negative", "seed", -1, "greater than or equal to 0"),
    bad_field("seed-above-32-bits", "seed", 2**32, "less than or equal to 4294967295"),
    bad_field("seed-text", "seed", "x", "valid integer"),
    bad_field("seed-boolean", "seed", True, "not a boolean"),
    bad_field("resolution-1080p", "resolution", "1080p", "'480p' or '720p'"),
    bad_field("resolution-number", "resolution", 480, "'480p' or '720p'"),
    bad_field("acceleration-turbo", "acceleration", "turbo", "'none', 'regular' or 'high'"),
    bad_field("use_only_first_audio-maybe", "use_only_first_audio", "maybe", "valid boolean"),
    bad_field("audio_mode-both", "audio_mode", "both", "'add' or 'para'"),
    bad_field("prompt-number", "prompt", 123, "valid string"),
    bad_field("prompt-missing", "prompt", MISSING, "Field required"),
    bad_field("image_url-missing", "image_url", MISSING, "Field required"),
    bad_field("image_url-number", "image_url", 42, "valid string"),
    bad_field("image_url-empty", "image_url", "", "at least 1 character"),
    bad_field("image_url-ftp", "image_url", "ftp://x", "http://, https:// or data:"),
    bad_field("image_url-no-scheme", "image_url", "no-scheme", "http://, https:// or data:"),
    bad_field("image_url-no-host", "image_url", "http://", "no host"),
    bad_field("first_audio_url-missing", "first_audio_url", MISSING, "Field required"),
    bad_field("second_audio_url-ftp", "second_audio_url", "ftp://x/b.wav", "http://, https:// or data:"),
    bad_field("speaker_boxes-not-a-list", "speaker_boxes", "abc", "valid list"),
    bad_field("speaker_boxes-three-numbers", "speaker_boxes", [[1, 2, 3]], "Field required"),
    bad_field("speaker_boxes-empty-box", "speaker_boxes", [[10, 10, 5, 20]], "is empty"),
    bad_field("speaker_boxes-two-for-one-speaker", "speaker_boxes", [[0, 0, 10, 10], [10, 0, 20, 10]],
              "one box per speaker"),
    # bodies that are not an input object
    Bad("body-not-json", raw=b"{not json", reason="JSON decode error"),
    Bad("body-json-list", raw=b"[1, 2]", reason="valid dictionary"),
    Bad("body-empty", raw=b"", reason="Field required"),
    Bad("body-over-the-limit", {"prompt": "x" * BODY_LIMIT}, status=413, reason="larger than"),
    Bad("body-over-the-limit-streamed", {"prompt": "x" * BODY_LIMIT}, status=413, reason="larger than", streamed=True),
    # URLs that cannot be fetched
    bad_field("image_url-closed-port", "image_url", "http://127.0.0.1:{closed}/x.png", "could not reach"),
    bad_field("first_audio_url-unresolvable", "first_audio_url", "http://no-such-host.invalid/a.wav",
              "could not reach no-such-host.invalid"),
    bad_field("image_url-http-404", "image_url", "{media}/missing.png", "answered 404"),
    bad_field("image_url-unknown-upload", "image_url", "{api}/files/" + "A" * 32 + ".png", "does not exist"),
    # private and local addresses
    bad_field("image_url-private-network", "image_url", "http://10.0.0.1/x.png", "private or local"),
    bad_field("image_url-cloud-metadata", "image_url", "http://169.254.169.254/latest/meta-data", "private or local"),
    bad_field("first_audio_url-ipv6-loopback", "first_audio_url", "http://[::1]/a.wav", "private or local"),
    # too large
    bad_field("image_url-declared-too-large", "image_url", "{media}/huge.png", "larger than 30 MB"),
    # broken data URIs
    bad_field("image_url-data-uri-without-comma", "image_url", "data:image/png;base64", "no ','"),
    bad_field("image_url-data-uri-bad-base64", "image_url", "data:image/png;base64,@@@@", "base64 data does not decode"),
    bad_field("image_url-data-uri-plain-text", "image_url", "data:text/plain;base64,aGVsbG8=",
              "not a supported image format"),
    # not the media the field wants
    bad_field("image_url-web-page", "image_url", "{media}/page.html", "looks like a web page"),
    bad_field("first_audio_url-png", "first_audio_url", "{media}/image.png", "expected audio, got image data (PNG)"),
    bad_field("image_url-wav", "image_url", "{media}/speech.wav", "expected an image, got audio data (WAV)"),
    # query parameters
    Bad("fal_webhook-ftp", query="?fal_webhook=ftp://x", where="query", field="fal_webhook", reason="http or https"),
    Bad("fal_webhook-private-network", query="?fal_webhook=http://10.0.0.1/hook", where="query", field="fal_webhook",
        reason="private or local"),
    Bad("fal_max_queue_length-negative", query="?fal_max_queue_length=-1", where="query", field="fal_max_queue_length",
        reason="greater than or equal to 0"),
]
# The synchronous route shares the validation and the fetching; a few of each kind show it.
SYNC_CASES = ["num_frames-text", "seed-negative", "resolution-1080p", "prompt-missing", "image_url-no-scheme",
              "speaker_boxes-empty-box", "body-not-json", "body-over-the-limit", "body-over-the-limit-streamed", "image_url-closed-port",
              "image_url-private-network", "image_url-data-uri-bad-base64", "image_url-web-page", "image_url-wav"]


def _by_id(ids: list[str]) -> list[Bad]:
    cases = {case.id: case for case in CASES}
    return [cases[i] for i in ids]


class _MediaHandler(BaseHTTPRequestHandler):
    files: dict[str, tuple[bytes, str]]

    def do_GET(self) -> None:
        if self.path == "/huge.png":  # announces far more than the cap; only the signature follows
            self._head(200, "image/png", HUGE_CONTENT_LENGTH)
            self.wfile.write(PNG_SIGNATURE)
            self.close_connection = True
        elif self.path in self.files:
            body, content_type = self.files[self.path]
            self._head(200, content_type, len(body))
            self.wfile.write(body)
        else:
            self._head(404, "text/plain", 0)

    def _head(self, status: int, content_type: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def media_url(example_inputs) -> Iterator[str]:
    """A local HTTP server with a web page and the example image and speech."""
    files = {"/page.html": (b"<!doctype html><html><body>not an image</body></html>", "text/html"),
             "/image.png": (example_inputs["image"].read_bytes(), "image/png"),
             "/speech.wav": (example_inputs["audio1"].read_bytes(), "audio/wav")}
    handler = type("MediaHandler", (_MediaHandler,), {"files": files})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("bad-inputs"), Path("tiny"),  # no worker: the weights are never read
                      env={"MULTITALK_FETCH_ALLOWED_HOSTS": "127.0.0.1", "MULTITALK_MAX_BODY_BYTES": str(BODY_LIMIT)})
    cluster.start_api(workers=0)
    yield cluster
    cluster.stop_all()


@pytest.fixture(scope="module")
def http(api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=60) as client:
        yield client


def _send(http: httpx.Client, path: str, case: Bad, speech_request: dict, places: dict[str, str]) -> httpx.Response:
    url = path + case.query
    if case.raw is not None:
        return http.post(url, content=case.raw, headers={"content-type": "application/json"})
    body = dict(speech_request)
    for name, value in case.changes.items():
        if value is MISSING:
            body.pop(name)
        else:
            body[name] = value.format(**places) if isinstance(value, str) else value
    if case.streamed:
        data = json.dumps(body).encode()
        chunks = (data[i:i + 64 * 1024] for i in range(0, len(data), 64 * 1024))
        return http.post(url, content=chunks, headers={"content-type": "application/json"})
    return http.post(url, json=body)


def _assert_refused_naming_the_problem(response: httpx.Response, case: Bad) -> None:
    assert response.status_code == case.status, response.text
    assert response.headers.get("x-fal-request-id")
    body = response.json()
    if case.status == 413:  # not about a field: fal's flat request error
        assert body["error_type"] == "payload_too_large" and case.reason in body["detail"]
        return
    [error] = body["detail"]
    if case.field is None:  # the body as a whole (not JSON, not an object, empty)
        assert error["loc"][0] == "body" and error["msg"].startswith("body: ")
    else:
        assert error["loc"][:2] == [case.where, case.field]  # nested fields add indices after it
        assert error["msg"].startswith(case.field)
    assert case.reason in error["msg"], error


@pytest.fixture(scope="module")
def places(api, media_url) -> dict[str, str]:
    return {"api": api.url, "media": media_url, "closed": str(free_port())}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_queue_submit_refuses_a_bad_request_naming_the_field(http, case, speech_request, places):
    _assert_refused_naming_the_problem(_send(http, SUBMIT, case, speech_request, places), case)


@pytest.mark.parametrize("case", _by_id(SYNC_CASES), ids=lambda case: case.id)
def test_sync_run_refuses_a_bad_request_naming_the_field(http, case, speech_request, places):
    _assert_refused_naming_the_problem(_send(http, RUN, case, speech_request, places), case)


def test_status_logs_flag_other_than_0_1_true_false_is_a_422(http, speech_request):
    submitted = http.post(SUBMIT, json=speech_request)
    assert submitted.status_code == 200, submitted.text
    response = http.get(submitted.json()["status_url"], params={"logs": "maybe"})
    _assert_refused_naming_the_problem(response, Bad("logs-maybe", field="logs", where="query", reason="match pattern"))


def test_server_still_serves_after_the_battery(http, speech_request):
    assert http.get("/healthz").status_code == 200
    response = http.post(SUBMIT, json=speech_request)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "IN_QUEUE"

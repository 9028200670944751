"""A `multitalk serve` killed with SIGKILL mid-submit leaves its scratch folder (holding the request's half
fetched input) behind; the next process to make its own on the host removes it. Workers make theirs the same
way (`server.files.scratch.process_scratch`); the API is what this test kills because it starts in a second,
without loading a model. Real processes sharing one temp dir (`TMPDIR`), as on one host.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from server.files.scratch import SCRATCH_PREFIX

from server_harness import Cluster

pytestmark = [pytest.mark.service]

SUBMIT = "/queue/fal-ai/ai-avatar/multi"


@pytest.fixture
def stalling_audio_url() -> Iterator[str]:
    """An audio URL that sends the first kilobyte of a WAV file, then nothing until the test ends."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"RIFF\xff\xff\xff\xffWAVEfmt " + bytes(1012))
            self.wfile.flush()
            release.wait(60)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/speech.wav"
    release.set()
    server.shutdown()
    server.server_close()


def _post_until_the_server_dies(url: str, body: dict) -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, json=body, timeout=30)


def test_a_process_killed_mid_request_leaves_a_folder_the_next_start_removes(tmp_path, speech_request,
                                                                              stalling_audio_url):
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    cluster = Cluster(tmp_path / "data", tmp_path / "no-weights",
                      env={"TMPDIR": str(temp_dir), "MULTITALK_FETCH_ALLOWED_HOSTS": "127.0.0.1"})
    try:
        first = cluster.start_api(workers=0)
        body = {**speech_request, "first_audio_url": stalling_audio_url}
        threading.Thread(target=_post_until_the_server_dies, args=(cluster.url + SUBMIT, body), daemon=True).start()
        cluster.wait_until(lambda: list(temp_dir.glob(f"{SCRATCH_PREFIX}*/submit-*/first_audio_url-*")), first,
                           "the submit to be fetching its audio")
        [partial_input] = temp_dir.glob(f"{SCRATCH_PREFIX}*/submit-*/first_audio_url-*")
        first.kill()
        assert partial_input.is_file()  # SIGKILL: the submit's own cleanup never ran

        cluster.start_api(workers=0)
        response = httpx.post(cluster.url + SUBMIT, json=speech_request, timeout=60)  # makes its scratch folder
        assert response.status_code == 200, response.text
        scratch = partial_input.parent.parent
        assert not scratch.exists()
        assert f"removed a dead process's scratch folder path={scratch}" in cluster.processes[-1].output()
    finally:
        cluster.stop_all()

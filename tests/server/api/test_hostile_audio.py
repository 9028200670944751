"""Issue 15 over HTTP: audio that passes the fetch's sniffing but that the worker could not use is refused at
submit with a 422 naming its field, in fal's format, and nothing of the request is kept; before, it was
queued to end as a failed job. The API applies the worker's own decode and limits
(`model.media.audio_decode`), counting the decoded output instead of holding it, and never loads librosa.

In-process (TestClient over `create_app`, no worker): the refusal must come from the submit itself, which the
sync route shares (test_hostile_images.py runs both routes). Only what the samples alone show (silence, NaN)
is left to the worker, so silent audio is still queued.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

from repo_paths import REPO_ROOT

SUBMIT = "/queue/fal-ai/ai-avatar/multi"
# 655350 Hz (FLAC's highest rate) × 8 channels × 12 s of silence: 63 M values, over the bound of 48 kHz stereo
# for 600 s (57.6 M), in a file of a few hundred kilobytes.
HUGE_RATE, HUGE_CHANNELS, HUGE_SECONDS = 655350, 8, 12
TOO_LARGE = "is too large to decode; at most 48000 Hz × 2 channels for 600 s is accepted"


def ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error", *args], check=True)


def _corrupt_wav(folder: Path) -> Path:
    """Starts as RIFF/WAVE (the fetch's sniffing takes it for WAV), then garbage."""
    path = folder / "corrupt.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEgarbage" * 20)
    return path


def _video_without_audio(folder: Path) -> Path:
    """A video (audio fields take videos, for their sound track) that has no sound track."""
    path = folder / "silent-film.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=s=32x32:d=0.5", "-c:v", "mpeg4", str(path))
    return path


def _truncated_m4a(folder: Path) -> Path:
    """The first half of an M4A: its index (`moov`, written last) is missing."""
    whole, path = folder / "whole.m4a", folder / "truncated.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=f=300:d=1", "-c:a", "aac", str(whole))
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _huge_flac(folder: Path) -> Path:
    """Its header tells the size: refused before decoding."""
    path = folder / "huge.flac"
    soundfile.write(path, np.zeros((HUGE_RATE * HUGE_SECONDS, HUGE_CHANNELS), np.int16), HUGE_RATE)
    return path


def _huge_flac_without_length(folder: Path) -> Path:
    """A FLAC written to a pipe: no length in its header, so the decode's counted output refuses it."""
    path = folder / "piped.flac"
    with path.open("wb") as out:
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"anullsrc=r={HUGE_RATE}:cl=7.1", "-t", str(HUGE_SECONDS), "-c:a", "flac", "-f", "flac", "-"],
                       stdout=out, check=True)
    return path


# name: (file maker, what the 422's message says)
REFUSED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "not-audio": (_corrupt_wav, "could not be decoded as audio: "),
    "video-without-sound": (_video_without_audio, "no audio stream found"),
    "truncated": (_truncated_m4a, "could not be decoded as audio: "),
    "huge-flac": (_huge_flac, f"audio of 655350 Hz × 8 channel(s) × 12.0 s {TOO_LARGE}"),
    "huge-flac-without-length": (_huge_flac_without_length, f"audio of 655350 Hz × 8 channel(s) × 11.0 s {TOO_LARGE}"),
}


def _data_uri(path: Path) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(path.read_bytes()).decode()


class Api:
    def __init__(self, client: TestClient, data_dir: Path):
        self.client, self.stored = client, data_dir / "files" / "data"

    def kept_files(self) -> set[str]:
        return {p.name for p in self.stored.iterdir()}


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp("hostile-audio")
    with TestClient(create_app(Settings(data_dir=data_dir, workers=0))) as client:
        yield Api(client, data_dir)


def _assert_refused_naming(response, field: str, reason: str) -> None:
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert error["msg"].startswith(f"{field}: {reason}"), error


@pytest.mark.parametrize("name", REFUSED)
def test_queue_submit_refuses_audio_the_worker_could_not_use(api, speech_request, tmp_path, name):
    make, reason = REFUSED[name]
    kept_before = api.kept_files()
    response = api.client.post(SUBMIT, json={**speech_request, "first_audio_url": _data_uri(make(tmp_path))})
    _assert_refused_naming(response, "first_audio_url", reason)
    assert api.kept_files() == kept_before  # not even the image, which was fine


def test_the_second_speaker_audio_is_checked_too(api, speech_request, tmp_path):
    kept_before = api.kept_files()
    response = api.client.post(SUBMIT, json={**speech_request, "second_audio_url": _data_uri(_corrupt_wav(tmp_path))})
    _assert_refused_naming(response, "second_audio_url", "could not be decoded as audio: ")
    assert api.kept_files() == kept_before


def test_silent_audio_is_still_queued(api, speech_request, silent_wav):
    """Silence shows only in the samples, which the API does not hold: the worker refuses it."""
    response = api.client.post(SUBMIT, json={**speech_request, "first_audio_url": _data_uri(silent_wav)})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "IN_QUEUE"


# Builds the app and submits once refused and once accepted, then names the heavy modules it has loaded.
SUBMITS_THEN_LISTS_MODULES = """
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from server.app import create_app
from server.settings import Settings

data_dir, bodies = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
with TestClient(create_app(Settings(data_dir=data_dir, workers=0))) as client:
    codes = [client.post("/queue/fal-ai/ai-avatar/multi", json=body).status_code for body in bodies]
print(json.dumps({"codes": codes, "loaded": [m for m in ("librosa", "torch", "numba") if m in sys.modules]}))
"""


def test_checking_audio_at_submit_loads_neither_librosa_nor_torch(speech_request, tmp_path):
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps([{**speech_request, "first_audio_url": _data_uri(_corrupt_wav(tmp_path))},
                                  speech_request]))
    done = subprocess.run([sys.executable, "-c", SUBMITS_THEN_LISTS_MODULES, str(tmp_path / "data"), str(bodies)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"codes": [422, 200], "loaded": []}

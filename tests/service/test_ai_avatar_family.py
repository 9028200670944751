"""The unmodified `fal-client` drives all four endpoints of fal's ai-avatar family on one server (issue 16).

Each request leaves `num_frames` and `seed` out, so the endpoint's hosted defaults apply: they show in the stored
request, in the returned seed and in the frames of the video. The text endpoints synthesise their speech on the
worker: a multi-text video's sound is both texts spoken in turn, which is checked against the same synthesis run
here (the speech is drawn from the request's seed, so it is reproducible). The server runs the tiny weights at the
harness's small frame size and one step, so the longest default video (191 frames) takes seconds.
"""

from __future__ import annotations

import fal_client
import httpx
import numpy as np
import pytest

from model.media.audio_input import SAMPLE_RATE, SAMPLES_PER_FRAME, fit_length, resample
from model.speech import synthesis
from server.jobs import open_job_store

from media_probe import decode_audio, probe
from server_harness import Cluster, point_fal_client_at

pytestmark = [pytest.mark.service, pytest.mark.slow]

FIRST_TEXT = "Do you know what we are eating today?"
SECOND_TEXT = "I think it is something called milky pie."


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_weights):
    cluster = Cluster(tmp_path_factory.mktemp("family"), tiny_weights["multitalk"])
    cluster.wait_ready(process=cluster.start_api())
    yield cluster
    cluster.stop_all()


@pytest.fixture
def client(cluster, monkeypatch):
    point_fal_client_at(cluster, monkeypatch)
    return fal_client.SyncClient(key="any-key")


@pytest.fixture(scope="module")
def media(example_inputs) -> dict[str, str]:
    return {"image_url": fal_client.encode_file(example_inputs["image"]),
            "audio": fal_client.encode_file(example_inputs["audio1"])}


def _arguments(app: str, media: dict[str, str]) -> dict:
    image, audio = {"image_url": media["image_url"]}, media["audio"]
    return {
        "fal-ai/ai-avatar": {**image, "audio_url": audio, "prompt": "a person talks"},
        "fal-ai/ai-avatar/single-text": {**image, "text_input": FIRST_TEXT, "voice": "Bill", "prompt": "a man talks"},
        "fal-ai/ai-avatar/multi": {**image, "first_audio_url": audio, "prompt": "two people talk"},
        "fal-ai/ai-avatar/multi-text": {**image, "first_text_input": FIRST_TEXT, "second_text_input": SECOND_TEXT,
                                        "prompt": "two people talk in turn"},
    }[app]


def _run(client: fal_client.SyncClient, app: str, arguments: dict) -> tuple[str, dict, list[str]]:
    """Submit, follow the status with logs until done, fetch the result: (request id, result, log messages)."""
    handle = client.submit(app, arguments=arguments)
    logs: list[str] = []
    for event in handle.iter_events(with_logs=True, interval=0.2):
        logs += [line["message"] for line in getattr(event, "logs", None) or []]
    return handle.request_id, handle.get(), logs


def _download(url: str, path):
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    path.write_bytes(response.content)
    return path


@pytest.mark.parametrize("app, frames, seed", [
    ("fal-ai/ai-avatar", 145, 42), ("fal-ai/ai-avatar/single-text", 136, 42),
    ("fal-ai/ai-avatar/multi", 181, 81), ("fal-ai/ai-avatar/multi-text", 191, 81),
])
def test_each_endpoint_runs_end_to_end_with_its_hosted_defaults(client, cluster, media, tmp_path, app, frames, seed):
    request_id, result, logs = _run(client, app, _arguments(app, media))
    assert result["seed"] == seed
    assert probe(_download(result["video"]["url"], tmp_path / "video.mp4"))["frames"] == frames
    job = open_job_store(None, cluster.data_dir).get(request_id)
    assert job.app == app and (job.input["options"]["num_frames"], job.input["options"]["seed"]) == (frames, seed)
    assert ("synthesising speech" in logs) == app.endswith("-text")
    assert ("(speech synthesis " in logs[-1]) == app.endswith("-text")


def test_a_multi_text_video_sounds_like_both_texts_spoken_in_turn(client, media, tiny_weights, tmp_path):
    request_id, result, _ = _run(client, "fal-ai/ai-avatar/multi-text",
                                 {**_arguments("fal-ai/ai-avatar/multi-text", media), "num_frames": 181, "seed": 5})
    video = _download(result["video"]["url"], tmp_path / "video.mp4")
    assert probe(video)["frames"] == 181
    heard = decode_audio(video, SAMPLE_RATE)
    speaker = synthesis.SpeechSynthesizer(tiny_weights["multitalk"] / synthesis.KOKORO_DIR)
    first, second = (resample(speaker.synthesize(text, voice, field, seed=5), synthesis.SAMPLE_RATE)
                     for text, voice, field in ((FIRST_TEXT, "Sarah", "first_text_input"),
                                                (SECOND_TEXT, "Roger", "second_text_input")))
    expected = fit_length(np.concatenate([first, second]), 181 * SAMPLES_PER_FRAME)
    assert len(first) + len(second) < len(expected), "the test's texts must leave silence at the end"
    heard = fit_length(heard, len(expected))
    assert np.corrcoef(heard, expected)[0, 1] > 0.9  # AAC keeps the waveform
    boundary = len(first)
    for part in (slice(0, boundary), slice(boundary, len(first) + len(second))):  # each text where it belongs
        assert np.corrcoef(heard[part], expected[part])[0, 1] > 0.9
    tail = heard[len(first) + len(second) + SAMPLES_PER_FRAME:]
    assert np.sqrt(np.mean(tail**2)) < 0.01 * np.sqrt(np.mean(expected**2))  # silence after both have spoken

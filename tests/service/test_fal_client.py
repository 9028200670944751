"""The unmodified `fal-client` package drives a running `multitalk serve` (PEERS_AND_PROTOCOL.md §B.3).

The client's four module-level URL constants are pointed at the server (plain http on 127.0.0.1);
nothing else about it changes. Every test runs against both job stores: the SQLite file, and a real
redis-server. The server runs the tiny weights at a small frame size, with a webhook secret, and
allows 127.0.0.1 for the webhook receiver.
"""

from __future__ import annotations

import json
import time

import fal_client
import httpx
import pytest
from fal_client.client import FalClientHTTPError

from server.jobs.webhooks import verify_signature

from local_servers import receiving_webhooks
from media_probe import ffprobe_or_skip, probe
from server_harness import Cluster, point_fal_client_at

pytestmark = [pytest.mark.service, pytest.mark.slow]

APP = "fal-ai/ai-avatar/multi"
WEBHOOK_SECRET = "test-webhook-secret"


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def cluster(request, tmp_path_factory, tiny_weights):
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    if redis_url:
        import redis

        redis.Redis.from_url(redis_url).flushdb()
    cluster = Cluster(tmp_path_factory.mktemp(f"server-{request.param}"), tiny_weights["multitalk"], redis_url,
                      env={"MULTITALK_WEBHOOK_SECRET": WEBHOOK_SECRET, "MULTITALK_FETCH_ALLOWED_HOSTS": "127.0.0.1"})
    api = cluster.start_api()
    cluster.wait_ready(process=api)
    yield cluster
    cluster.stop_all()


@pytest.fixture
def client(cluster, monkeypatch):
    """A stock SyncClient whose hosts are the local server, as §B.3 option 2 describes."""
    point_fal_client_at(cluster, monkeypatch)
    return fal_client.SyncClient(key="any-key")


@pytest.fixture(scope="module")
def inputs(example_inputs):
    """Arguments with inline data URIs, as `fal_client.encode_file` makes them."""
    return {"image_url": fal_client.encode_file(example_inputs["image"]),
            "first_audio_url": fal_client.encode_file(example_inputs["audio1"]),
            "second_audio_url": fal_client.encode_file(example_inputs["audio2"]),
            "prompt": "two people talking in turn", "num_frames": 41}


def _video_frames(url: str, tmp_path) -> int:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    path = tmp_path / "video.mp4"
    path.write_bytes(response.content)
    ffprobe_or_skip()
    return probe(path)["frames"]


def test_run_returns_a_downloadable_video_with_the_requested_frames(client, inputs, tmp_path):
    result = client.run(APP, arguments={**inputs, "num_frames": 45, "seed": 7})
    assert result["seed"] == 7
    assert result["video"]["content_type"] == "video/mp4" and result["video"]["file_size"] > 0
    assert _video_frames(result["video"]["url"], tmp_path) == 45


def test_subscribe_with_uploaded_files_reports_queue_updates_and_logs(client, example_inputs, tmp_path):
    image_url = client.upload_file(example_inputs["image"])  # fal_v3: /storage/auth/token + /files/upload
    audio_url = client.upload_file(example_inputs["audio1"], repository="fal")  # /storage/upload/initiate + PUT
    updates = []
    result = client.subscribe(APP, arguments={"image_url": image_url, "first_audio_url": audio_url,
                                              "prompt": "one person speaking", "num_frames": 41, "seed": None},
                              with_logs=True, on_queue_update=updates.append)
    assert isinstance(result["seed"], int)  # an explicit null seed is drawn and returned
    assert _video_frames(result["video"]["url"], tmp_path) == 41
    kinds = {type(update).__name__ for update in updates}
    assert "InProgress" in kinds or "Completed" in kinds
    messages = [log["message"] for update in updates if hasattr(update, "logs") for log in (update.logs or [])]
    assert any(message.startswith("clip 1/1 step 1/1") for message in messages)


def test_submit_status_result(client, inputs):
    handle = client.submit(APP, arguments=inputs)
    assert handle.request_id
    status = client.status(APP, handle.request_id, with_logs=True)
    assert type(status).__name__ in ("Queued", "InProgress", "Completed")
    result = handle.get()
    assert result["seed"] == 81  # the schema default when seed is absent
    completed = client.status(APP, handle.request_id, with_logs=True)
    assert type(completed).__name__ == "Completed" and completed.logs and completed.metrics["inference_time"] > 0
    assert client.result(APP, handle.request_id) == result


def _wait_status(client, request_id: str, name: str, timeout_s: float = 120) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.status(APP, request_id, with_logs=False)
        if type(status).__name__ == name:
            return status
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never reached {name}")


def test_cancel_a_running_and_a_queued_request(client, inputs):
    running = client.submit(APP, arguments={**inputs, "num_frames": 241})  # 4 clips: cancel lands between them
    queued = client.submit(APP, arguments=inputs)
    _wait_status(client, running.request_id, "InProgress")
    client.cancel(APP, queued.request_id)
    client.cancel(APP, running.request_id)
    for handle in (queued, running):
        done = _wait_status(client, handle.request_id, "Completed")
        assert done.error_type == "client_cancelled", done
        with pytest.raises(FalClientHTTPError) as raised:
            handle.get()
        assert raised.value.status_code == 499


@pytest.fixture
def webhook_receiver():
    with receiving_webhooks() as receiver:
        yield receiver


def test_webhook_is_delivered_and_verifies(client, inputs, webhook_receiver):
    url, deliveries = webhook_receiver
    handle = client.submit(APP, arguments=inputs, webhook_url=url)
    headers, body = deliveries.get(timeout=120)
    assert verify_signature(WEBHOOK_SECRET, body, headers)
    assert not verify_signature("another-secret", body, headers)
    message = json.loads(body)
    assert (message["request_id"], message["status"], message["error"]) == (handle.request_id, "OK", None)
    assert message["payload"] == handle.get()


def test_bad_field_is_a_422_naming_it(client, inputs):
    with pytest.raises(FalClientHTTPError) as raised:
        client.run(APP, arguments={**inputs, "num_frames": 5})
    assert raised.value.status_code == 422
    assert raised.value.message[0]["loc"] == ["body", "num_frames"]
    assert "num_frames" in raised.value.message[0]["msg"]


def test_failing_job_is_reported_as_completed_with_an_error(client, inputs, silent_wav):
    silent = fal_client.encode(silent_wav.read_bytes(), "audio/wav")  # accepted at submit; the worker refuses it
    handle = client.submit(APP, arguments={**inputs, "second_audio_url": silent})
    done = _wait_status(client, handle.request_id, "Completed")
    assert done.error and done.error_type
    with pytest.raises(FalClientHTTPError) as raised:
        handle.get()
    assert raised.value.status_code == 422
    assert raised.value.message[0]["loc"] == ["body", "second_audio_url"]

"""The unmodified JS client, `@fal-ai/client` 1.10.1 (pinned in tests/service/js/), drives a running `multitalk serve`.

One server per job store (SQLite, Redis) and one node process per server: tests/service/js/fal_js_client.mjs runs
every scenario once (upload, streaming subscribe with logs, submit/status/streamStatus/result, cancel, run, a 422,
fal.stream) and prints its results as JSON, which the tests below check. The client reaches the server through the
request middleware that docs/api.md ("Clients") gives, nothing else changed. Against the SQLite server only (to
spare CI a second run), the driver also subscribes once to each ai-avatar endpoint with its defaults (no num_frames,
no seed), so that the seed, the frame count and the stored job show the endpoint's hosted defaults. Skipped without
node or without the installed packages (`npm ci` in tests/service/js), a failure under MULTITALK_REQUIRE_NODE=1 (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.jobs import open_job_store

from media_probe import probe
from server_harness import Cluster

pytestmark = [pytest.mark.service, pytest.mark.slow]

JS_DIR = Path(__file__).parent / "js"
DRIVER = JS_DIR / "fal_js_client.mjs"
DRIVER_TIMEOUT_S = 600


def _node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        reason = "node is not on PATH (install Node.js 18+) to test the JS client"
    elif not (JS_DIR / "node_modules" / "@fal-ai" / "client" / "package.json").is_file():
        reason = f"@fal-ai/client is not installed: run `npm ci` in {JS_DIR}"
    else:
        return node
    if os.environ.get("MULTITALK_REQUIRE_NODE") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass(frozen=True)
class DriverRun:
    """The driver's results against one server, and that server's data dir (its SQLite job store stays there)."""

    results: dict
    data_dir: Path


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def driver_run(request, tmp_path_factory, tiny_weights, example_inputs) -> DriverRun:
    """The driver's results against a fresh server on one job store; the family scenario on SQLite only."""
    node = _node_or_skip()
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    if redis_url:
        import redis

        redis.Redis.from_url(redis_url).flushdb()
    data_dir = tmp_path_factory.mktemp(f"js-server-{request.param}")
    cluster = Cluster(data_dir, tiny_weights["multitalk"], redis_url)
    try:
        cluster.wait_ready(process=cluster.start_api())
        config = {"base": cluster.url, "image": str(example_inputs["image"]), "audio": str(example_inputs["audio1"]),
                  "family": request.param == "sqlite", "videoDir": str(tmp_path_factory.mktemp("js-family-videos"))}
        done = subprocess.run([node, str(DRIVER), json.dumps(config)], cwd=JS_DIR, capture_output=True, text=True,
                              timeout=DRIVER_TIMEOUT_S)
        assert done.returncode == 0, f"node failed:\n{done.stderr[-4000:]}\n{cluster.processes[0].output()[-3000:]}"
        return DriverRun(json.loads(done.stdout), data_dir)
    finally:
        cluster.stop_all()


@pytest.fixture
def results(driver_run) -> dict:
    """The driver's results alone, for the tests that check what the client saw."""
    return driver_run.results


def _ok(results: dict, scenario: str) -> dict:
    outcome = results[scenario]
    assert "error" not in outcome, outcome
    return outcome


def test_storage_upload_returns_a_url_serving_the_bytes(results):
    upload = _ok(results, "upload")
    assert upload["downloadStatus"] == 200 and upload["sameBytes"]


def test_streaming_subscribe_shows_each_log_line_once(results):
    """The client appends each status event's logs: events listing every line each time showed them again and again."""
    subscribe = _ok(results, "subscribe")
    assert subscribe["videoUrl"] and subscribe["seed"] == 81
    assert subscribe["updates"][-1]["status"] == "COMPLETED"
    shown = subscribe["updates"][-1]["logs"]
    assert any(" clip 1/1 step 1/1" in line for line in shown)
    assert shown == subscribe["serverLogs"]  # every line, each once, in order


def test_submit_status_stream_status_and_result(results):
    queue = _ok(results, "queue")
    assert queue["firstStatus"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert queue["events"][-1]["status"] == queue["lastStatus"] == "COMPLETED"
    streamed = [line for event in queue["events"] for line in event["logs"]]
    assert len(streamed) == len(set(streamed)) > 0
    assert queue["resultRequestId"] == queue["requestId"] and queue["seed"] == 81


def test_cancelled_request_completes_as_client_cancelled(results):
    queue = _ok(results, "queue")
    assert queue["cancelled"] == {"status": "COMPLETED", "errorType": "client_cancelled"}
    assert queue["cancelledResult"]["status"] == 499 and "cancelled" in queue["cancelledResult"]["message"]


def test_run_returns_the_video(results):
    run = _ok(results, "run")
    assert run["requestId"] and run["seed"] == 7 and run["contentType"] == "video/mp4"


def test_invalid_field_is_a_validation_error_whose_message_names_it(results):
    invalid = results["invalid"]
    assert (invalid["name"], invalid["status"]) == ("ValidationError", 422)
    assert invalid["message"].startswith("num_frames: ")
    assert invalid["body"]["detail"][0]["loc"] == ["body", "num_frames"]


def test_fal_stream_is_told_the_endpoint_does_not_stream(results):
    stream = results["stream"]
    assert (stream["name"], stream["status"]) == ("ApiError", 404)
    assert "does not stream" in stream["message"] and stream["body"]["error_type"] == "not_found"


# -- the family, each endpoint with its defaults (SQLite server only) -----------------------------------


@dataclass(frozen=True)
class HostedDefaults:
    """What an endpoint does with no num_frames and no seed, as fal hosts it; `speakers` are the (text field,
    voice field, voice) of each text it speaks, the voice being the one the driver sent or the field's default."""

    seed: int
    num_frames: int
    speakers: tuple[tuple[str, str, str], ...] = ()


FAMILY = {
    "fal-ai/ai-avatar": HostedDefaults(seed=42, num_frames=145),
    "fal-ai/ai-avatar/single-text": HostedDefaults(seed=42, num_frames=136,
                                                   speakers=(("text_input", "voice", "Bill"),)),
    "fal-ai/ai-avatar/multi": HostedDefaults(seed=81, num_frames=181),
    "fal-ai/ai-avatar/multi-text": HostedDefaults(seed=81, num_frames=191, speakers=(
        ("first_text_input", "voice1", "Sarah"), ("second_text_input", "voice2", "Roger"))),
}
on_sqlite = pytest.mark.parametrize("driver_run", ["sqlite"], indirect=True)


@on_sqlite
@pytest.mark.parametrize("app", FAMILY)
def test_subscribe_with_the_defaults_returns_the_hosted_seed_and_frame_count(driver_run, app):
    outcome = _ok(driver_run.results["family"], app)
    assert outcome["requestId"] and outcome["seed"] == FAMILY[app].seed
    assert outcome["downloadStatus"] == 200 and outcome["fileSize"] == Path(outcome["videoPath"]).stat().st_size
    assert probe(Path(outcome["videoPath"]))["frames"] == FAMILY[app].num_frames


@on_sqlite
@pytest.mark.parametrize("app", [app for app, defaults in FAMILY.items() if defaults.speakers])
def test_text_endpoints_log_the_speech_synthesis(driver_run, app):
    logs = _ok(driver_run.results["family"], app)["logs"]
    assert any("synthesising speech" in message for message in logs), logs


@on_sqlite
@pytest.mark.parametrize("app", FAMILY)
def test_the_stored_job_has_the_app_and_the_texts_with_their_voices(driver_run, app):
    outcome = _ok(driver_run.results["family"], app)
    store = open_job_store(None, driver_run.data_dir)
    try:
        job = store.get(outcome["requestId"])
    finally:
        store.close()
    assert job is not None and job.app == app
    speech = [{"text": outcome["sent"][text], "voice": voice, "text_field": text, "voice_field": voice_field}
              for text, voice_field, voice in FAMILY[app].speakers]
    assert job.input.get("speech", []) == speech

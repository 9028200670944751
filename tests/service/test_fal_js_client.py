"""The unmodified JS client, `@fal-ai/client` 1.10.1 (pinned in tests/service/js/), drives a running `multitalk serve`.

One server per job store (SQLite, Redis) and one node process per server: tests/service/js/fal_js_client.mjs runs
every scenario once (upload, streaming subscribe with logs, submit/status/streamStatus/result, cancel, run, a 422,
fal.stream) and prints its results as JSON, which the tests below check. The client reaches the server through the
request middleware that docs/api.md ("Clients") gives, nothing else changed. Skipped without node or without the
installed packages (`npm ci` in tests/service/js), a failure under MULTITALK_REQUIRE_NODE=1 (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def results(request, tmp_path_factory, tiny_weights, example_inputs) -> dict:
    """The driver's results against a fresh server on one job store."""
    node = _node_or_skip()
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    if redis_url:
        import redis

        redis.Redis.from_url(redis_url).flushdb()
    cluster = Cluster(tmp_path_factory.mktemp(f"js-server-{request.param}"), tiny_weights["multitalk"], redis_url)
    try:
        cluster.wait_ready(process=cluster.start_api())
        config = {"base": cluster.url, "image": str(example_inputs["image"]), "audio": str(example_inputs["audio1"])}
        done = subprocess.run([node, str(DRIVER), json.dumps(config)], cwd=JS_DIR, capture_output=True, text=True,
                              timeout=DRIVER_TIMEOUT_S)
        assert done.returncode == 0, f"node failed:\n{done.stderr[-4000:]}\n{cluster.processes[0].output()[-3000:]}"
        return json.loads(done.stdout)
    finally:
        cluster.stop_all()


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

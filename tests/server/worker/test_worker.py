"""A worker runs queued jobs end to end on the tiny pipeline: result, logs, input errors, cancel."""

import asyncio
import logging
import sqlite3
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import redis
from fal_client import encode_file

from model.contract.request import GenerationResult, Progress
from server.api.schemas import AvatarMultiInput
from server.api.submission import stage_inputs
from server.files.fetch import FetchSettings
from server.files.store import LocalFileStore
from server.jobs import SqliteJobStore
from server.worker import runtime
from server.worker.runner import LeaseKeeper, Worker, WorkerSettings

from media_probe import ffprobe_or_skip, probe
from server_harness import failing_first, no_space_error

APP = "fal-ai/ai-avatar/multi"


class SmallPipeline:
    """The real tiny pipeline at 64 × 128 pixels and 1 step, so a job takes seconds on a CPU."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def generate(self, request, progress=None, should_cancel=None):
        return self.pipeline.generate(replace(request, frame_size=(64, 128), steps=1), progress, should_cancel)


@pytest.fixture
def worker(tmp_path, tiny_pipeline):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    files = LocalFileStore(tmp_path / "files", "http://127.0.0.1:8000")
    yield Worker(store, SmallPipeline(tiny_pipeline), files, WorkerSettings(lease_s=30, poll_s=0.05))
    store.close()


def _input(example_inputs, **extra):
    body = {"image_url": encode_file(example_inputs["image"]),
            "first_audio_url": encode_file(example_inputs["audio1"]),
            "second_audio_url": encode_file(example_inputs["audio2"]),
            "prompt": "two people talking", "num_frames": 41, "unknown_field": 1}
    body.update(extra)
    return body


def _submit(worker, body):
    """Queue `body` as the API does: validated, its inputs kept in the file store, its seed fixed."""
    staged = asyncio.run(stage_inputs(AvatarMultiInput.model_validate(body), worker.files, FetchSettings(),
                                      "http://127.0.0.1:8000"))
    return worker.store.submit(APP, staged)


def test_worker_runs_a_job_to_a_video_url(worker, example_inputs):
    job = _submit(worker, _input(example_inputs))
    assert worker.run_once()
    done = worker.store.get(job.id)
    assert (done.status, done.outcome) == ("COMPLETED", "OK")
    body = done.result["body"]
    assert done.result["status_code"] == 200 and body["seed"] == 81  # absent seed → the schema default
    assert body["video"]["url"].startswith("http://127.0.0.1:8000/") and body["video"]["content_type"] == "video/mp4"
    path = worker.files.path_for(worker.files.resolve_url(body["video"]["url"]))
    ffprobe_or_skip()
    assert probe(path)["frames"] == 41
    messages = [entry["message"] for entry in worker.store.logs(job.id)]
    assert messages[0] == f"started on worker {worker.worker_id} (attempt 1)"
    assert "reading image and audio" in messages and any(m.startswith("clip 1/1 step 1/1") for m in messages)
    assert not worker.run_once()  # queue empty


def test_unusable_input_fails_the_job_with_a_422_body(worker, example_inputs, silent_wav):
    job = _submit(worker, _input(example_inputs, second_audio_url=encode_file(silent_wav)))
    worker.run_once()
    done = worker.store.get(job.id)
    assert (done.outcome, done.result["status_code"]) == ("ERROR", 422)
    assert done.result["body"]["detail"][0]["loc"] == ["body", "second_audio_url"]


def test_cancel_reaches_a_running_job(worker, example_inputs):
    job = _submit(worker, _input(example_inputs, num_frames=181))
    original = worker.pipeline.generate

    def cancel_then_generate(request, progress=None, should_cancel=None):
        worker.store.request_cancel(job.id)
        return original(request, progress, should_cancel)

    worker.pipeline.generate = cancel_then_generate
    worker.run_once()
    done = worker.store.get(job.id)
    assert (done.status, done.outcome, done.error_type) == ("COMPLETED", "CANCELLED", "client_cancelled")


@pytest.mark.slow
def test_serve_forever_drains_the_queue_and_stops(worker, example_inputs):
    jobs = [_submit(worker, _input(example_inputs, seed=s)) for s in (1, 2)]
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve_forever, args=(stop,))
    thread.start()
    try:
        for _ in range(600):
            if all(worker.store.get(j.id).status == "COMPLETED" for j in jobs):
                break
            stop.wait(0.1)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert [worker.store.get(j.id).result["body"]["seed"] for j in jobs] == [1, 2]


def test_a_job_in_the_stored_form_of_an_earlier_version_fails_with_a_clear_error(worker, example_inputs):
    job = worker.store.submit(APP, _input(example_inputs))  # the wire body as such, not options + stored files
    worker.run_once()
    done = worker.store.get(job.id)
    assert (done.outcome, done.result["status_code"]) == ("ERROR", 500)
    assert "queued by an earlier server version" in done.error and "submit the request again" in done.error


# --- Store outages and a full disk. The pipeline is a stand-in: these are about the store, not the video. ---

OUTAGE = redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
LOCKED = sqlite3.OperationalError("database is locked")


class InstantPipeline:
    """Writes a few bytes as the MP4 at once, with one progress line."""

    def generate(self, request, progress=None, should_cancel=None):
        progress(Progress("sampling", "clip 1/1 step 1/1"))
        should_cancel()
        request.output.write_bytes(b"not really an mp4")
        return GenerationResult(video=request.output, seed=request.seed, num_frames=41, width=64, height=32,
                                settings="instant", timings={"total_s": 0.0})


@pytest.fixture
def quick_worker(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    files = LocalFileStore(tmp_path / "files", "http://127.0.0.1:8000")
    yield Worker(store, InstantPipeline(), files, WorkerSettings(lease_s=30, poll_s=0.05))
    store.close()


def _wait_for(condition, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_serve_forever_rides_out_a_store_outage_and_carries_on(quick_worker, example_inputs, monkeypatch, caplog):
    worker = quick_worker
    monkeypatch.setattr(worker.store, "claim", failing_first(worker.store.claim, 4, OUTAGE))
    job = _submit(worker, _input(example_inputs))
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve_forever, args=(stop,))
    with caplog.at_level(logging.INFO, logger="multitalk.worker"):
        thread.start()
        try:
            completed = _wait_for(lambda: worker.store.get(job.id).status == "COMPLETED")
            alive = thread.is_alive()
        finally:
            stop.set()
            thread.join(timeout=30)
    assert completed and alive and worker.store.get(job.id).outcome == "OK"
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("store ")]
    assert [m.split(" worker_id")[0] for m in changes] == ["store unusable", "store usable again"]  # not per retry


def test_a_finished_job_is_recorded_once_the_store_takes_it(quick_worker, example_inputs, monkeypatch):
    worker = quick_worker
    monkeypatch.setattr(worker.store, "finish", failing_first(worker.store.finish, 3, LOCKED))
    job = _submit(worker, _input(example_inputs))
    assert worker.run_once()
    done = worker.store.get(job.id)
    assert (done.status, done.outcome, done.result["status_code"]) == ("COMPLETED", "OK", 200)
    assert worker.store.finish.calls == 4


def test_progress_lines_and_cancel_checks_lost_to_an_outage_do_not_fail_the_job(quick_worker, example_inputs,
                                                                                monkeypatch):
    worker = quick_worker
    job = _submit(worker, _input(example_inputs))
    monkeypatch.setattr(worker.store, "append_log", failing_first(worker.store.append_log, 100, OUTAGE))
    monkeypatch.setattr(worker.store, "is_cancel_requested", failing_first(worker.store.is_cancel_requested, 100,
                                                                           OUTAGE))
    worker.run_once()
    assert worker.store.get(job.id).outcome == "OK"


def test_a_lease_renewal_the_store_cannot_take_is_retried(tmp_path, monkeypatch):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.submit("app", {})
    job = store.claim("w", 30)
    monkeypatch.setattr(store, "renew", failing_first(store.renew, 2, OUTAGE))
    with LeaseKeeper(store, job.id, "w", lease_s=0.3) as lease:
        renewed = _wait_for(lambda: store.renew.calls >= 4, timeout_s=10)
        assert renewed and not lease.lost.is_set()
    store.close()


def test_a_full_disk_fails_the_job_with_a_507_and_the_worker_carries_on(quick_worker, example_inputs, monkeypatch):
    worker = quick_worker
    first, second = (_submit(worker, _input(example_inputs, seed=seed)) for seed in (1, 2))
    monkeypatch.setattr(worker.files, "add_file", failing_first(worker.files.add_file, 1, no_space_error()))
    assert worker.run_once() and worker.run_once()
    failed = worker.store.get(first.id)
    assert (failed.status, failed.outcome, failed.error_type) == ("COMPLETED", "ERROR", "insufficient_storage")
    assert failed.result["status_code"] == 507
    assert failed.result["body"]["error_type"] == "insufficient_storage"
    assert "no space left on device" in failed.error and "free space in the data dir" in failed.error
    assert worker.store.get(second.id).outcome == "OK"


def test_the_heartbeat_announces_the_worker_again_as_soon_as_the_store_is_back(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "HEARTBEAT_EVERY_S", 600.0)  # so only a retry, not the next regular beat, can do it
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    monkeypatch.setattr(store, "record_worker", failing_first(store.record_worker, 3, OUTAGE))
    with runtime.Heartbeat(SimpleNamespace(store=store), "w1", {"state": "ready"}):
        announced = _wait_for(lambda: [w.id for w in store.live_workers()] == ["w1"], timeout_s=60)
    assert announced
    store.close()


def test_a_bucket_outage_while_keeping_the_inputs_or_the_video_is_waited_out(quick_worker, example_inputs, monkeypatch):
    """Minutes of generation are not thrown away for an outage of the file store that passes."""
    from botocore.exceptions import EndpointConnectionError

    worker = quick_worker
    job = _submit(worker, _input(example_inputs))
    unreachable = EndpointConnectionError(endpoint_url="http://bucket.example")
    monkeypatch.setattr("server.jobs.failures.StoreOutage.failed", lambda self, failure: 0.01)
    monkeypatch.setattr(worker.files, "local_copy", failing_first(worker.files.local_copy, 2, unreachable))
    monkeypatch.setattr(worker.files, "add_file", failing_first(worker.files.add_file, 3, unreachable))
    assert worker.run_once()
    assert worker.store.get(job.id).outcome == "OK" and worker.files.add_file.calls == 4

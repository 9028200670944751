"""A worker runs queued jobs end to end on the tiny pipeline: result, logs, input errors, cancel."""

import asyncio
import threading
from dataclasses import replace

import pytest
from fal_client import encode_file

from server.api.schemas import AvatarMultiInput
from server.api.submission import stage_inputs
from server.files.fetch import FetchSettings
from server.files.store import FileStore
from server.jobs import SqliteJobStore
from server.worker.runner import Worker, WorkerSettings

from media_probe import ffprobe_or_skip, probe

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
    files = FileStore(tmp_path / "files", "http://127.0.0.1:8000")
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
    path = worker.files.resolve_url(body["video"]["url"])
    ffprobe_or_skip()
    assert probe(path)["frames"] == 41
    messages = [entry["message"] for entry in worker.store.logs(job.id)]
    assert messages[0] == f"started on worker {worker.worker_id} (attempt 1)"
    assert "reading image and audio" in messages and any(m.startswith("clip 1/1 step 1/1") for m in messages)
    assert not worker.run_once()  # queue empty


def test_unusable_input_fails_the_job_with_a_422_body(worker, example_inputs, tmp_path):
    silent = tmp_path / "silent.wav"
    silent.write_bytes(b"RIFF" + b"\0" * 4 + b"WAVE" + b"\0" * 60)  # passes the sniffing at submit, not decoding
    job = _submit(worker, _input(example_inputs, second_audio_url=encode_file(silent)))
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

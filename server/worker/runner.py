"""A worker: owns one GPU's pipeline, takes jobs from the shared store one at a time, runs them.

Per job: build the `GenerationRequest` from the options and stored input files the API recorded
(`server.api.submission`; the worker never fetches a URL), run the pipeline with progress written to the job's logs and the store's cancel flag checked between
steps, keep the lease alive from a side thread, then record the response the result URL returns:
`{"status_code": 200, "body": {"video": File, "seed": n}}`, or the fal-format error body (422 for an
input that turned out unusable, 500 for a failure), or a cancellation. Nothing here imports torch at
import time; the pipeline object is handed in.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from model.contract.errors import GenerationCancelled, InputError
from model.contract.request import GenerationRequest
from server.api.errors import input_error_body
from server.files.store import FileStore, UnknownFile
from server.jobs import Job, JobStore
from server.jobs.maintenance import sweep_expired_leases

logger = logging.getLogger("multitalk.worker")


@dataclass
class WorkerSettings:
    lease_s: float = 60.0  # a worker that stops renewing for this long is presumed dead
    poll_s: float = 1.0  # wait between claims when the queue is empty
    max_attempts: int = 2  # runs a job gets when its workers keep dying
    # GenerationRequest fields forced on every job (frame_size, steps): previews and CPU demos.
    request_overrides: dict[str, Any] = field(default_factory=dict)


class LeaseKeeper:
    """Renews a job's lease every lease/3 seconds; notices when the job stopped being ours."""

    def __init__(self, store: JobStore, job_id: str, worker_id: str, lease_s: float):
        self.store, self.job_id, self.worker_id, self.lease_s = store, job_id, worker_id, lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            if not self.store.renew(self.job_id, self.worker_id, self.lease_s):
                self.lost.set()
                return


def new_worker_id() -> str:
    """Unique per worker process: host, pid and a random tail (pids repeat across restarts)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """`on_completed` is called with each job this worker completes (for its webhook)."""

    def __init__(self, store: JobStore, pipeline, files: FileStore, settings: WorkerSettings | None = None,
                 worker_id: str | None = None, on_completed: Callable[[Job], None] | None = None):
        self.store = store
        self.pipeline = pipeline
        self.files = files
        self.settings = settings or WorkerSettings()
        self.worker_id = worker_id or new_worker_id()
        self.on_completed = on_completed or (lambda job: None)
        self.current_job_id: str | None = None  # shown in the worker's heartbeat

    def serve_forever(self, stop: threading.Event) -> None:
        logger.info("worker serving worker_id=%s", self.worker_id)
        while not stop.is_set():
            sweep_expired_leases(self.store, self.settings.max_attempts, self.on_completed)
            if not self.run_once():
                stop.wait(self.settings.poll_s)

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue was empty."""
        job = self.store.claim(self.worker_id, self.settings.lease_s)
        if job is None:
            return False
        logger.info("job started id=%s attempt=%d", job.id, job.attempts)
        self._log(job, f"started on worker {self.worker_id} (attempt {job.attempts})")
        self.current_job_id = job.id
        try:
            with LeaseKeeper(self.store, job.id, self.worker_id, self.settings.lease_s) as lease:
                outcome, result, error, error_type = self._run(job, lease)
        finally:
            self.current_job_id = None
        if self.store.finish(job.id, self.worker_id, outcome, result, error, error_type):
            logger.info("job finished id=%s outcome=%s", job.id, outcome)
            self.on_completed(self.store.get(job.id))
        else:
            logger.warning("job lost its lease before finishing id=%s; its next attempt decides", job.id)
        return True

    def _log(self, job: Job, message: str, level: str = "INFO") -> None:
        self.store.append_log(job.id, message, level)

    def _run(self, job: Job, lease: LeaseKeeper) -> tuple[str, dict | None, str | None, str | None]:
        workdir = Path(tempfile.mkdtemp(prefix=f"multitalk-job-{job.id[:8]}-"))
        try:
            request = GenerationRequest.from_inputs(self._stored_inputs(job), workdir / "output.mp4",
                                                    {**job.input["options"], **self.settings.request_overrides})

            def progress(event) -> None:
                self._log(job, event.message)

            def should_cancel() -> bool:
                return lease.lost.is_set() or self.store.is_cancel_requested(job.id)

            generated = self.pipeline.generate(request, progress, should_cancel)
            stored = self.files.add_file(generated.video, "video/mp4", f"multitalk-{job.id[:8]}.mp4")
            self._log(job, f"done: {generated.num_frames} frames at {generated.width}x{generated.height} in "
                           f"{generated.timings['total_s']:.1f} s; settings: {generated.settings}")
            body = {"video": {"url": stored.url, "content_type": stored.content_type, "file_name": stored.file_name,
                              "file_size": stored.size}, "seed": generated.seed}
            return "OK", {"status_code": 200, "body": body}, None, None
        except InputError as exc:
            self._log(job, str(exc), "ERROR")
            return "ERROR", {"status_code": 422, "body": input_error_body(exc)}, str(exc), exc.kind
        except GenerationCancelled as exc:
            self._log(job, str(exc), "WARN")
            return "CANCELLED", None, "the request was cancelled", "client_cancelled"
        except Exception as exc:  # noqa: BLE001 - any failure becomes the job's error, the worker lives on
            logger.exception("job failed id=%s", job.id)
            message = f"generation failed: {type(exc).__name__}: {exc}"
            self._log(job, message, "ERROR")
            body: dict[str, Any] = {"detail": message, "error_type": "internal_error"}
            return "ERROR", {"status_code": 500, "body": body}, message, "internal_error"
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _stored_inputs(self, job: Job) -> dict[str, Path]:
        """The job's input files as the API stored them, by request field."""
        if "files" not in job.input:  # the stored form before the request contract; no release had it
            raise RuntimeError("this job was queued by an earlier server version whose stored input this worker "
                               "cannot read; submit the request again")
        paths = {}
        for name, file_id in job.input["files"].items():
            try:
                paths[name] = self.files.path_for(file_id)
            except UnknownFile:
                raise InputError(name, "the stored input file is gone (deleted, or kept past its retention time)") \
                    from None
        return paths

"""A worker: owns one GPU's pipeline, takes jobs from the shared store one at a time, runs them.

Per job: build the `GenerationRequest` from the options, stored input files and texts the API recorded
(`server.api.submission`; the worker never fetches a URL), run the pipeline with progress written to the job's logs and the store's cancel flag checked between
steps, keep the lease alive from a side thread, then record the response the result URL returns:
`{"status_code": 200, "body": {"video": File, "seed": n}}`, or the fal-format error body (422 for an
input that turned out unusable, 507 when the disk filled up, 500 for a failure), or a cancellation.
A job-store outage never ends the worker: its loop backs off and carries on, and a finished job's
end is retried until the store takes it (`server.jobs.failures`). Nothing here imports torch at
import time; the pipeline object is handed in.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, TypeVar

from model.contract.errors import GenerationCancelled, InputError
from model.contract.request import GenerationRequest
from server.api.errors import input_error_body, request_error_body
from server.files.scratch import process_scratch
from server.files.store import FileStore, UnknownFile
from server.jobs import Job, JobStore
from server.jobs.failures import StoreOutage, storage_failure, storage_failure_or_raise
from server.jobs.maintenance import sweep_expired_leases

logger = logging.getLogger("multitalk.worker")

T = TypeVar("T")
# How a job ended: (outcome, result, error, error_type), the arguments of JobStore.finish.
JobEnd = tuple[str, dict | None, str | None, str | None]


@dataclass
class WorkerSettings:
    lease_s: float = 60.0  # a worker that stops renewing for this long is presumed dead
    poll_s: float = 1.0  # wait between claims when the queue is empty
    max_attempts: int = 2  # runs a job gets when its workers keep dying
    # GenerationRequest fields forced on every job (frame_size, steps): previews and CPU demos.
    request_overrides: dict[str, Any] = field(default_factory=dict)


class LeaseKeeper:
    """Renews a job's lease every lease/3 seconds; notices when the job stopped being ours.

    A renewal the store cannot take (an outage) is retried with backoff, never fatal: the lease is
    only known lost when the store, reachable, says the job is no longer ours."""

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
        every_s = self.lease_s / 3
        outage = StoreOutage(logger, f"while renewing the lease job_id={self.job_id}", max_wait_s=every_s)
        wait_s = every_s
        while not self._stop.wait(wait_s):
            try:
                held = self.store.renew(self.job_id, self.worker_id, self.lease_s)
            except Exception as exc:
                wait_s = outage.failed(storage_failure_or_raise(exc))
                continue
            outage.recovered()
            if not held:
                self.lost.set()
                return
            wait_s = every_s


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
        self.scratch = process_scratch()  # job folders inside; a killed worker's are removed by the next start

    @cached_property
    def store_outage(self) -> StoreOutage:
        """The worker thread's view of the store while it retries: backoff, one log line per change."""
        return StoreOutage(logger, f"worker_id={self.worker_id}")

    def serve_forever(self, stop: threading.Event) -> None:
        """Claim and run jobs until `stop`. A store outage (or a full store) never ends the loop: it backs
        off, capped, and carries on when the store is back."""
        logger.info("worker serving worker_id=%s", self.worker_id)
        while not stop.is_set():
            try:
                sweep_expired_leases(self.store, self.settings.max_attempts, self.on_completed)
                ran = self.run_once(stop)
            except Exception as exc:
                stop.wait(self.store_outage.failed(storage_failure_or_raise(exc)))
                continue
            self.store_outage.recovered()
            if not ran:
                stop.wait(self.settings.poll_s)

    def run_once(self, stop: threading.Event | None = None) -> bool:
        """Claim and run one job; False when the queue was empty.

        Once the job has run, its end is recorded whatever the store does meanwhile: `finish` is retried
        through an outage until it is written, the lease is known lost (the job's next attempt decides), or
        `stop` is set while the store is down (the same, after the lease runs out)."""
        stop = stop or threading.Event()
        job = self.store.claim(self.worker_id, self.settings.lease_s)
        if job is None:
            return False
        logger.info("job started id=%s attempt=%d", job.id, job.attempts)
        self._log(job, f"started on worker {self.worker_id} (attempt {job.attempts})")
        self.current_job_id = job.id
        try:
            with LeaseKeeper(self.store, job.id, self.worker_id, self.settings.lease_s) as lease:
                try:
                    outcome, result, error, error_type = self._run(job, lease)
                except Exception as exc:  # before its generation began: its folder could not be made
                    outcome, result, error, error_type = self._failed(job, exc)
                finished = self._until_stored(
                    lambda: self.store.finish(job.id, self.worker_id, outcome, result, error, error_type),
                    give_up=lambda: lease.lost.is_set() or stop.is_set(), stop=stop)
        finally:
            self.current_job_id = None
        if finished:
            logger.info("job finished id=%s outcome=%s", job.id, outcome)
            completed = self._until_stored(lambda: self.store.get(job.id), give_up=stop.is_set, stop=stop)
            if completed is not None:
                self.on_completed(completed)
        else:
            logger.warning("job lost its lease before finishing id=%s; its next attempt decides", job.id)
        return True

    def _until_stored(self, call: Callable[[], T], give_up: Callable[[], bool], stop: threading.Event) -> T | None:
        """`call()`, retried with backoff while the store is unusable, until it succeeds; None once `give_up()`."""
        while True:
            try:
                result = call()
            except Exception as exc:
                wait_s = self.store_outage.failed(storage_failure_or_raise(exc))
                if give_up():
                    return None
                stop.wait(wait_s)
                continue
            self.store_outage.recovered()
            return result

    def _unless_store_down(self, call: Callable[[], T], default: T) -> T:
        """`call()`, or `default` while the store is unusable: a lost progress line or a cancel check
        missed for one step must not fail the job it is about."""
        try:
            result = call()
        except Exception as exc:
            self.store_outage.failed(storage_failure_or_raise(exc))
            return default
        self.store_outage.recovered()
        return result

    def _through_file_store_outage(self, call: Callable[[], T], lease: LeaseKeeper) -> T:
        """`call()`, retried with backoff while the file store (a bucket) is unreachable and the job still ours: minutes
        of generation are not thrown away, nor a job failed, for an outage that passes. A full store, or any other
        error, is raised at once."""
        outage = StoreOutage(logger, "while reading or writing the file store")
        while True:
            try:
                result = call()
            except Exception as exc:
                failure = storage_failure(exc)
                if failure is None or failure.kind != "unavailable" or lease.lost.is_set():
                    raise
                lease.lost.wait(outage.failed(failure))
                continue
            outage.recovered()
            return result

    def _log(self, job: Job, message: str, level: str = "INFO") -> None:
        self._unless_store_down(lambda: self.store.append_log(job.id, message, level), None)

    def _run(self, job: Job, lease: LeaseKeeper) -> JobEnd:
        workdir = self.scratch.make_dir(f"job-{job.id[:8]}-")
        try:
            inputs = self._through_file_store_outage(lambda: self._stored_inputs(job, workdir), lease)
            request = GenerationRequest.from_inputs(inputs, workdir / "output.mp4",
                                                    {**job.input["options"], **self.settings.request_overrides},
                                                    job.input.get("speech", ()))

            def progress(event) -> None:
                self._log(job, event.message)

            def should_cancel() -> bool:
                return lease.lost.is_set() or self._unless_store_down(lambda: self.store.is_cancel_requested(job.id),
                                                                      False)

            generated = self.pipeline.generate(request, progress, should_cancel)
            stored = self._through_file_store_outage(
                lambda: self.files.add_file(generated.video, "video/mp4", f"multitalk-{job.id[:8]}.mp4"), lease)
            speech_s = generated.timings.get("speech_s")
            speech = f" (speech synthesis {speech_s:.1f} s)" if speech_s is not None else ""
            self._log(job, f"done: {generated.num_frames} frames at {generated.width}x{generated.height} in "
                           f"{generated.timings['total_s']:.1f} s{speech}; settings: {generated.settings}")
            body = {"video": {"url": self.files.result_url(stored.id), "content_type": stored.content_type,
                              "file_name": stored.file_name,
                              "file_size": stored.size}, "seed": generated.seed}
            return "OK", {"status_code": 200, "body": body}, None, None
        except InputError as exc:
            self._log(job, str(exc), "ERROR")
            return "ERROR", {"status_code": 422, "body": input_error_body(exc)}, str(exc), exc.kind
        except GenerationCancelled as exc:
            self._log(job, str(exc), "WARN")
            return "CANCELLED", None, "the request was cancelled", "client_cancelled"
        except Exception as exc:  # any failure becomes the job's error, the worker lives on
            return self._failed(job, exc)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _failed(self, job: Job, exc: Exception) -> JobEnd:
        """The end of a job that failed with `exc`: a full disk (or store) is a 507 saying what to do about it,
        anything else a 500 with the error."""
        failure = storage_failure(exc)
        if failure is not None and failure.kind == "full":
            logger.warning("job failed id=%s storage full detail=%r", job.id, failure.detail)
            message = f"storage full while writing the video: {failure.detail}"
            status_code, error_type = failure.status_code, failure.error_type
        else:
            logger.exception("job failed id=%s", job.id, exc_info=exc)
            message = f"generation failed: {type(exc).__name__}: {exc}"
            status_code, error_type = 500, "internal_error"
        self._log(job, message, "ERROR")
        return "ERROR", {"status_code": status_code, "body": request_error_body(message, error_type)}, message, error_type

    def _stored_inputs(self, job: Job, workdir: Path) -> dict[str, Path]:
        """The job's input files as the API stored them, by request field: in place on a local store, copied into
        `workdir` from a bucket."""
        if "files" not in job.input:  # the stored form before the request contract; no release had it
            raise RuntimeError("this job was queued by an earlier server version whose stored input this worker "
                               "cannot read; submit the request again")
        paths = {}
        for name, file_id in job.input["files"].items():
            try:
                paths[name] = self.files.local_copy(file_id, workdir)
            except UnknownFile:
                raise InputError(name, "the stored input file is gone (deleted, or kept past its retention time)") \
                    from None
        return paths

"""The job store's interface, the Job record, and the rules for how a job moves between states.

The API process (submit, status, cancel, result) and the worker processes (claim, progress logs,
lease renewal, finish) share one queue, kept either in an embedded SQLite file (one host) or in a
Redis that many hosts share. Both backends obey the same rules, so the rules live here once, as pure
functions from a Job to its next Job; a backend only supplies storage and three atomic primitives
(insert with a queue bound, claim the oldest queued job, read-modify-write one job).

States follow fal's queue API: IN_QUEUE -> IN_PROGRESS -> COMPLETED. A failed or cancelled job is
COMPLETED with an `outcome` of ERROR or CANCELLED (fal has no FAILED/CANCELLED status on the wire).
A worker holds a running job through a lease that it renews; a job whose lease runs out (its worker
died) is put back in the queue at its original place, or failed with a clear error once it has used
its attempts, so it is never silently lost.

A job submitted with a webhook_url carries its webhook's delivery state with it (a durable outbox):
the write that completes the job, whichever way it completes, also marks its webhook pending and due
now, so a crash right after completion cannot lose it. Any process's webhook sender lists the due
webhooks, takes one for an attempt (atomically, for a hold: no two senders make the same attempt, and
one whose sender died becomes due again when the hold ends), and records how the attempt went
(delivered, retry at a later time, or given up). See server/jobs/webhooks.py.

The store also keeps what /metrics reports beyond the jobs stored now: totals of completed jobs and
histograms of their run and queue-wait times, counted atomically with the transition that ends (or
starts) a job, so they survive expire_finished(); and the heartbeats of live workers, each valid for
a time-to-live the worker chooses, so a crashed worker drops out on its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from abc import ABC, abstractmethod
from typing import Any, Callable, Literal, Mapping

Status = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
Outcome = Literal["OK", "ERROR", "CANCELLED"]
WebhookState = Literal["pending", "delivered", "failed"]
# What a cancel did, in the words of fal's cancel endpoint, so the API can send it as is.
CancelResult = Literal["OK", "CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]

IN_QUEUE: Status = "IN_QUEUE"
IN_PROGRESS: Status = "IN_PROGRESS"
COMPLETED: Status = "COMPLETED"
OUTCOMES: tuple[Outcome, ...] = ("OK", "ERROR", "CANCELLED")
WEBHOOK_PENDING: WebhookState = "pending"
WEBHOOK_DELIVERED: WebhookState = "delivered"
WEBHOOK_FAILED: WebhookState = "failed"
# fal's log levels (status endpoint, `logs=1`).
LOG_LEVELS = ("STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG")
# error_type of a job failed because its worker kept dying (crash, OOM kill, lost host).
WORKER_LOST = "WorkerLost"
# Upper bounds of the run-time and queue-wait histogram buckets, from a quick tiny-model job to an hour-long video.
DURATION_BUCKETS_S: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, math.inf)


class QueueFull(Exception):
    """submit() found max_queue jobs already waiting; the API answers 429 and the client retries later."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One request. Times are float epoch seconds on the store's clock (Redis: the server's clock,
    so leases mean the same on every host)."""

    id: str
    app: str
    input: dict[str, Any]
    created_at: float
    status: Status = IN_QUEUE
    outcome: Outcome | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    webhook_url: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    cancel_requested: bool = False
    worker_id: str | None = None
    lease_expires_at: float | None = None
    owner: str | None = None  # who may read and cancel it: a digest of the submitting API key (none without keys)
    # The webhook's outbox entry, set when a job with a webhook_url completes: pending until delivered
    # or given up; attempts taken so far; when the next attempt may be taken (None: nothing to send).
    webhook_state: WebhookState | None = None
    webhook_attempts: int = 0
    webhook_due_at: float | None = None

    def to_record(self) -> dict[str, str | int | float | None]:
        """Flat scalars for a SQLite row or a Redis hash: dicts as JSON text, booleans as 0/1."""
        record: dict[str, str | int | float | None] = {}
        for name in JOB_FIELDS:
            value = getattr(self, name)
            if value is not None and name in _JSON_FIELDS:
                value = json.dumps(value)
            elif isinstance(value, bool):
                value = int(value)
            record[name] = value
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Job:
        """The inverse of to_record; a missing or null field is None (Redis stores no nulls, and
        hands every value back as a string)."""
        values = {}
        for name in JOB_FIELDS:
            raw = record.get(name)
            values[name] = None if raw is None else _DECODERS.get(name, str)(raw)
        return cls(**values)


JOB_FIELDS = tuple(field.name for field in dataclasses.fields(Job))
_JSON_FIELDS = frozenset({"input", "result"})
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "input": json.loads,
    "result": json.loads,
    "created_at": float,
    "started_at": float,
    "finished_at": float,
    "lease_expires_at": float,
    "attempts": int,
    "webhook_attempts": int,
    "webhook_due_at": float,
    "cancel_requested": lambda raw: bool(int(raw)),
}


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A worker's last heartbeat: `seen_at` on the store's clock, `info` the JSON-able dict it sent
    (state, weights, device, job_id, gpu_memory...)."""

    id: str
    seen_at: float
    info: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Durations counted per bucket. Not cumulative: counts[i] is how many fell in
    (bounds_s[i-1], bounds_s[i]], so recording one touches one bucket; Prometheus' cumulative `le`
    buckets are running sums of these."""

    bounds_s: tuple[float, ...]
    counts: tuple[int, ...]
    sum_s: float

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclasses.dataclass(frozen=True)
class JobStats:
    """Totals since the store was created, unlike counts(), which sees only the jobs stored now:
    completed jobs per outcome, the run time of those that started (finished_at - started_at), and
    the queue wait of each claim (started_at - created_at; for a re-queued job, this includes its lost
    attempt)."""

    completed: dict[str, int]
    run_seconds: Histogram
    wait_seconds: Histogram

    @classmethod
    def from_counters(cls, counters: Mapping[str, float]) -> JobStats:
        """Read back the named counters that stat_increments adds to (missing ones are zero)."""
        return cls(completed={outcome: int(counters.get(_completed_key(outcome), 0)) for outcome in OUTCOMES},
                   run_seconds=_histogram(counters, _RUN_SECONDS), wait_seconds=_histogram(counters, _WAIT_SECONDS))


# Statistics are flat named counters, so a backend stores them as one table or hash and adds to
# them in the transaction that changes the job.
_RUN_SECONDS = "run_seconds"
_WAIT_SECONDS = "wait_seconds"


def _completed_key(outcome: str) -> str:
    return f"completed:{outcome}"


def _bucket_key(histogram: str, bound_s: float) -> str:
    return f"{histogram}:le={bound_s:g}"


def _sum_key(histogram: str) -> str:
    return f"{histogram}:sum"


def _histogram(counters: Mapping[str, float], name: str) -> Histogram:
    return Histogram(bounds_s=DURATION_BUCKETS_S,
                     counts=tuple(int(counters.get(_bucket_key(name, bound), 0)) for bound in DURATION_BUCKETS_S),
                     sum_s=float(counters.get(_sum_key(name), 0.0)))


def _observed(histogram: str, seconds: float) -> dict[str, int | float]:
    # Clamped: a clock stepped back between two events must not make a negative duration.
    seconds = max(0.0, seconds)
    bound = next(bound for bound in DURATION_BUCKETS_S if seconds <= bound)
    return {_bucket_key(histogram, bound): 1, _sum_key(histogram): seconds}


def stat_increments(before: Job, after: Job) -> dict[str, int | float]:
    """What the change from `before` to `after` adds to the named statistics counters (integers
    for counts, floats for sums of seconds). Backends add these atomically with storing `after`."""
    if before.status == IN_QUEUE and after.status == IN_PROGRESS:
        return _observed(_WAIT_SECONDS, after.started_at - after.created_at)
    if before.status != COMPLETED and after.status == COMPLETED:
        increments: dict[str, int | float] = {_completed_key(after.outcome): 1}
        if after.started_at is not None:
            increments |= _observed(_RUN_SECONDS, after.finished_at - after.started_at)
        return increments
    return {}


def check_room(queued: int, max_queue: int | None) -> None:
    """Raise QueueFull when `queued` waiting jobs leave no room under max_queue. Backends call it
    inside their atomic insert, so the count cannot change between the check and the insert."""
    if max_queue is not None and queued >= max_queue:
        raise QueueFull(f"the queue already holds {queued} jobs (limit {max_queue}); try again later")


# --- Transitions: pure functions from a job to its next state, None meaning "leave it as it is". ---


def _held_by(job: Job, worker_id: str) -> bool:
    return job.status == IN_PROGRESS and job.worker_id == worker_id


def _started(job: Job, worker_id: str, now: float, lease_s: float) -> Job:
    return dataclasses.replace(job, status=IN_PROGRESS, attempts=job.attempts + 1, worker_id=worker_id,
                               started_at=now, lease_expires_at=now + lease_s)


def _renewed(job: Job, worker_id: str, now: float, lease_s: float) -> Job | None:
    return dataclasses.replace(job, lease_expires_at=now + lease_s) if _held_by(job, worker_id) else None


def _completed(job: Job, now: float, outcome: Outcome, result: dict[str, Any] | None = None,
               error: str | None = None, error_type: str | None = None) -> Job:
    """Every way a job completes ends here, so its webhook enters the outbox in the same write."""
    webhook = {"webhook_state": WEBHOOK_PENDING, "webhook_due_at": now} if job.webhook_url is not None else {}
    return dataclasses.replace(job, status=COMPLETED, outcome=outcome, result=result, error=error,
                               error_type=error_type, finished_at=now, lease_expires_at=None, **webhook)


def _finished(job: Job, worker_id: str, now: float, outcome: Outcome, result: dict[str, Any] | None,
              error: str | None, error_type: str | None) -> Job | None:
    return _completed(job, now, outcome, result, error, error_type) if _held_by(job, worker_id) else None


def _cancelled(job: Job, now: float) -> Job | None:
    """A queued job never runs; a running one is flagged and its worker stops between steps."""
    if job.status == IN_QUEUE:
        return _completed(job, now, "CANCELLED")
    if job.status == IN_PROGRESS and not job.cancel_requested:
        return dataclasses.replace(job, cancel_requested=True)
    return None


def _after_lost_worker(job: Job, now: float, max_attempts: int) -> Job | None:
    """A job whose lease ran out: back to its place in the queue, or failed once out of attempts.
    Re-checks the lease, since the worker may have renewed it after the expired jobs were listed."""
    if job.status != IN_PROGRESS or job.lease_expires_at is None or job.lease_expires_at >= now:
        return None
    if job.cancel_requested:
        return _completed(job, now, "CANCELLED")
    if job.attempts < max_attempts:
        return dataclasses.replace(job, status=IN_QUEUE, worker_id=None, started_at=None, lease_expires_at=None)
    return _completed(job, now, "ERROR", error_type=WORKER_LOST,
                      error=f"the worker running this job stopped responding on each of its {job.attempts} "
                            "attempts (it crashed or was killed); not retrying")


def _webhook_taken(job: Job, now: float, hold_s: float) -> Job | None:
    """A due webhook taken for its next attempt, not due again until the hold ends."""
    if job.webhook_state != WEBHOOK_PENDING or job.webhook_due_at is None or job.webhook_due_at > now:
        return None
    return dataclasses.replace(job, webhook_attempts=job.webhook_attempts + 1, webhook_due_at=now + hold_s)


def _webhook_attempted(job: Job, attempt: int, now: float, state: WebhookState, retry_in_s: float) -> Job | None:
    """How attempt number `attempt` went: delivered, failed for good, or pending again from now + retry_in_s.
    Ignored when that attempt is no longer the latest (its hold ran out and another sender took the next)."""
    if job.webhook_state != WEBHOOK_PENDING or job.webhook_attempts != attempt:
        return None
    due_at = now + retry_in_s if state == WEBHOOK_PENDING else None
    return dataclasses.replace(job, webhook_state=state, webhook_due_at=due_at)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


class JobStore(ABC):
    """The queue API both processes use. Public methods check arguments and apply the transitions
    above; subclasses implement the storage primitives (the abstract methods)."""

    def submit(self, app: str, input: dict[str, Any], webhook_url: str | None = None,
               max_queue: int | None = None, owner: str | None = None) -> Job:
        """Queue a job; QueueFull when max_queue jobs are already waiting (checked atomically)."""
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        job = Job(id=str(uuid.uuid4()), app=app, input=input, created_at=self._now(), webhook_url=webhook_url,
                  owner=owner)
        self._insert(job, max_queue)
        return job

    def claim(self, worker_id: str, lease_s: float) -> Job | None:
        """Take the oldest queued job for `worker_id` (unique per worker process) for lease_s seconds;
        None when the queue is empty. No two callers ever get the same job."""
        _check_positive("lease_s", lease_s)
        now = self._now()
        return self._claim(lambda job: _started(job, worker_id, now, lease_s))

    def renew(self, id: str, worker_id: str, lease_s: float) -> bool:
        """Extend the lease by lease_s from now; False when the job is no longer this worker's
        (finished, or re-queued after the lease ran out): the worker should drop it."""
        _check_positive("lease_s", lease_s)
        now = self._now()
        return self._update(id, lambda job: _renewed(job, worker_id, now, lease_s))[1] is not None

    def request_cancel(self, id: str) -> CancelResult:
        """Cancel a queued job now, or ask the worker of a running one to stop; says which happened."""
        now = self._now()
        before, _ = self._update(id, lambda job: _cancelled(job, now))
        if before is None:
            return "NOT_FOUND"
        return {IN_QUEUE: "OK", IN_PROGRESS: "CANCELLATION_REQUESTED", COMPLETED: "ALREADY_COMPLETED"}[before.status]

    def is_cancel_requested(self, id: str) -> bool:
        job = self.get(id)
        return job is not None and job.cancel_requested

    def finish(self, id: str, worker_id: str, outcome: Outcome, result: dict[str, Any] | None = None,
               error: str | None = None, error_type: str | None = None) -> bool:
        """Record the end of a job; False (and nothing written) when the job is no longer this
        worker's, so a worker that lost its lease cannot overwrite the job's next attempt."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        now = self._now()
        _, after = self._update(id, lambda job: _finished(job, worker_id, now, outcome, result, error, error_type))
        return after is not None

    def requeue_expired(self, max_attempts: int = 2) -> list[Job]:
        """Handle running jobs whose lease ran out (their worker died): re-queued at their original
        place while attempts < max_attempts, else COMPLETED with outcome ERROR and error_type
        WorkerLost (CANCELLED if a cancel was pending). Returns the jobs changed, in their new state,
        so the caller can send the webhooks of those that completed. Safe to call from any process."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        now = self._now()
        changed = []
        for id in self._expired_ids(now):
            _, after = self._update(id, lambda job: _after_lost_worker(job, now, max_attempts))
            if after is not None:
                changed.append(after)
                if after.status == IN_QUEUE:
                    self.append_log(id, f"the worker stopped responding; job re-queued (attempt {after.attempts} "
                                        f"of {max_attempts} used)", level="WARN", source="server")
        return changed

    def due_webhooks(self) -> list[tuple[str, str]]:
        """(job id, webhook URL) of each pending webhook due now, the longest due first."""
        return self._webhooks_due_at(self._now())

    def take_webhook(self, id: str, hold_s: float) -> Job | None:
        """Take job `id`'s due webhook for one attempt, numbered by the returned job's webhook_attempts;
        it is not due again for hold_s (longer than an attempt can take), so no other sender takes it
        meanwhile, and it comes back by itself if this sender dies. None when it is not due (another
        sender holds it, or it is no longer pending)."""
        _check_positive("hold_s", hold_s)
        now = self._now()
        return self._update(id, lambda job: _webhook_taken(job, now, hold_s))[1]

    def record_webhook_attempt(self, id: str, attempt: int, state: WebhookState, retry_in_s: float = 0.0) -> bool:
        """Record how attempt number `attempt` (from take_webhook) went: `delivered`, `failed` (given
        up), or `pending` to retry retry_in_s from now. False (nothing written) when a later attempt
        has been taken since, because this one outlived its hold."""
        if state not in (WEBHOOK_PENDING, WEBHOOK_DELIVERED, WEBHOOK_FAILED):
            raise ValueError(f"state must be pending, delivered or failed, got {state!r}")
        if retry_in_s < 0:
            raise ValueError(f"retry_in_s must be >= 0, got {retry_in_s}")
        now = self._now()
        return self._update(id, lambda job: _webhook_attempted(job, attempt, now, state, retry_in_s))[1] is not None

    def append_log(self, id: str, message: str, level: str = "INFO", source: str = "worker") -> None:
        """Add a progress line, shown by the status endpoint with `logs=1`."""
        if level not in LOG_LEVELS:
            raise ValueError(f"level must be one of {LOG_LEVELS}, got {level!r}")
        self._push_log(id, {"message": message, "level": level, "source": source, "timestamp": self._now()})

    def stats(self) -> JobStats:
        """Completion totals and duration histograms since the store was created (see JobStats)."""
        return JobStats.from_counters(self._read_stats())

    def record_worker(self, worker_id: str, info: dict[str, Any], ttl_s: float) -> None:
        """A worker's heartbeat: store (or replace) its `info`, alive until ttl_s from now. A worker
        sends one more often than ttl_s, so one that stops (crash, lost host) drops out by itself."""
        _check_positive("ttl_s", ttl_s)
        now = self._now()
        self._save_worker(WorkerInfo(id=worker_id, seen_at=now, info=info), expires_at=now + ttl_s)

    def live_workers(self) -> list[WorkerInfo]:
        """The workers whose last heartbeat is still within its ttl, by id."""
        return sorted(self._workers_alive_at(self._now()), key=lambda worker: worker.id)

    def expire_finished(self, older_than_s: float) -> list[str]:
        """Delete jobs (and their logs) finished more than older_than_s ago, except those whose webhook
        is still pending; returns their ids so the caller deletes their files. Each id is returned to
        one caller only."""
        if older_than_s < 0:
            raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
        return self._delete_finished(before=self._now() - older_than_s)

    @abstractmethod
    def get(self, id: str) -> Job | None: ...

    @abstractmethod
    def queue_position(self, id: str) -> int:
        """How many queued jobs are ahead of this one (0 = next); 0 when it is not queued."""

    @abstractmethod
    def logs(self, id: str, since: int = 0) -> list[dict[str, Any]]:
        """Log entries {message, level, source, timestamp} from index `since` on (a reader that has
        seen n entries passes since=n to get only the new ones)."""

    @abstractmethod
    def counts(self) -> dict[str, Any]:
        """{"queued": n, "running": n, "completed": {"OK": n, "ERROR": n, "CANCELLED": n}, "webhooks_pending": n}
        over the jobs stored now (expired jobs no longer count; stats() keeps the totals); `webhooks_pending`:
        webhooks in the outbox, waiting for their next attempt."""

    @abstractmethod
    def forget_worker(self, worker_id: str) -> None:
        """Drop a worker's heartbeat at once (a clean shutdown) instead of waiting for its ttl."""

    @abstractmethod
    def close(self) -> None: ...

    # --- Storage primitives ---

    @abstractmethod
    def _now(self) -> float:
        """The store's clock, the one leases are measured on."""

    @abstractmethod
    def _insert(self, job: Job, max_queue: int | None) -> None:
        """Store a new queued job behind all others, calling check_room atomically with the insert."""

    @abstractmethod
    def _claim(self, change: Callable[[Job], Job]) -> Job | None:
        """Atomically apply `change` to the oldest queued job and store the result, adding
        stat_increments(before, after) to the statistics; None if none."""

    @abstractmethod
    def _update(self, id: str, change: Callable[[Job], Job | None]) -> tuple[Job | None, Job | None]:
        """Atomically read a job, apply `change` and store what it returns (nothing when None),
        adding stat_increments(before, after) to the statistics. Returns (before, after); before is
        None when the job does not exist."""

    @abstractmethod
    def _expired_ids(self, now: float) -> list[str]:
        """Ids of running jobs whose lease ended before `now`."""

    @abstractmethod
    def _push_log(self, id: str, entry: dict[str, Any]) -> None: ...

    @abstractmethod
    def _webhooks_due_at(self, now: float) -> list[tuple[str, str]]:
        """(id, webhook_url) of the jobs whose webhook_due_at is at or before `now`, earliest first."""

    @abstractmethod
    def _delete_finished(self, before: float) -> list[str]:
        """Delete completed jobs finished before `before` whose webhook is not pending, with their
        logs; return their ids."""

    @abstractmethod
    def _read_stats(self) -> dict[str, float]:
        """Every statistics counter stored, by name."""

    @abstractmethod
    def _save_worker(self, worker: WorkerInfo, expires_at: float) -> None:
        """Store (replace) a worker's heartbeat, valid until `expires_at` on the store's clock."""

    @abstractmethod
    def _workers_alive_at(self, now: float) -> list[WorkerInfo]:
        """The heartbeats that expire after `now`, in any order."""

"""The job store in Redis: one queue shared by workers on several hosts.

Keys under `prefix`: a hash per job (`job:<id>`, the Job's record plus its submission number `seq`),
a list per job's logs (`logs:<id>`), and sorted sets that index jobs by state: `queue` (score: seq,
so a re-queued job gets its place back), `running` (score: lease end), `done:<outcome>` (score:
finish time), and `webhooks`, the outbox (score: when the webhook is next due; a job is in it while
its webhook is pending). The hash and its index entries always change together in one MULTI/EXEC,
with the statistics counters in the hash `stats` that the change adds to. A worker's heartbeat is a key
`worker:<id>` that expires with its ttl, listed by the sorted set `workers` (score: expiry), whose
stale entries the next heartbeat removes.

Atomicity is optimistic (WATCH, then MULTI/EXEC, retried when a watched key changed): a change to a
job watches its hash; a claim or a bounded submit also watches `queue`, so two claimers never take
the same job and concurrent submits never overshoot the bound. This keeps the state rules in Python,
shared with the SQLite store, instead of restating them in Lua. Times come from the Redis server's
clock, so a lease means the same on every host. Jobs are as durable as the server is configured to
be (enable `appendonly` for restarts of Redis itself).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import redis

from server.jobs.store import (
    IN_PROGRESS,
    IN_QUEUE,
    OUTCOMES,
    Job,
    JobStore,
    WorkerInfo,
    check_room,
    stat_increments,
)


class RedisJobStore(JobStore):
    """Jobs in the Redis at `url` (e.g. redis://host:6379/0), keys under `prefix`."""

    def __init__(self, url: str, prefix: str = "multitalk"):
        self._redis = redis.Redis.from_url(
            url, decode_responses=True,
            # An outage surfaces within seconds as ConnectionError/TimeoutError (server.jobs.failures), not a hang;
            # a dropped connection (a restarted Redis) is retried at once with backoff, a timeout never (the command
            # may have run).
            socket_connect_timeout=5, socket_timeout=10,
            retry=redis.retry.Retry(redis.backoff.ExponentialWithJitterBackoff(base=0.1, cap=1.0), retries=3,
                                    supported_errors=(redis.ConnectionError,)))
        self._prefix = prefix
        self._queue = f"{prefix}:queue"
        self._running = f"{prefix}:running"
        self._stats = f"{prefix}:stats"
        self._workers = f"{prefix}:workers"
        self._webhooks = f"{prefix}:webhooks"

    def _job_key(self, id: str) -> str:
        return f"{self._prefix}:job:{id}"

    def _log_key(self, id: str) -> str:
        return f"{self._prefix}:logs:{id}"

    def _done_key(self, outcome: str) -> str:
        return f"{self._prefix}:done:{outcome}"

    def _worker_key(self, worker_id: str) -> str:
        return f"{self._prefix}:worker:{worker_id}"

    def close(self) -> None:
        self._redis.close()

    def get(self, id: str) -> Job | None:
        record = self._redis.hgetall(self._job_key(id))
        return Job.from_record(record) if record else None

    def queue_position(self, id: str) -> int:
        return self._redis.zrank(self._queue, id) or 0

    def logs(self, id: str, since: int = 0) -> list[dict[str, Any]]:
        return [json.loads(entry) for entry in self._redis.lrange(self._log_key(id), since, -1)]

    def counts(self) -> dict[str, Any]:
        pipe = self._redis.pipeline(transaction=True)
        for key in (self._queue, self._running, self._webhooks, *map(self._done_key, OUTCOMES)):
            pipe.zcard(key)
        queued, running, webhooks, *completed = pipe.execute()
        return {"queued": queued, "running": running, "completed": dict(zip(OUTCOMES, completed)),
                "webhooks_pending": webhooks}

    def forget_worker(self, worker_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._worker_key(worker_id))
        pipe.zrem(self._workers, worker_id)
        pipe.execute()

    def _now(self) -> float:
        seconds, microseconds = self._redis.time()
        return seconds + microseconds / 1e6

    def _insert(self, job: Job, max_queue: int | None) -> None:
        # Numbered outside the transaction: a number lost to a QueueFull leaves a harmless gap.
        seq = self._redis.incr(f"{self._prefix}:seq")

        def insert(pipe: redis.client.Pipeline) -> None:
            if max_queue is not None:
                check_room(pipe.zcard(self._queue), max_queue)
            pipe.multi()
            self._save(pipe, job, seq)

        self._redis.transaction(insert, *([self._queue] if max_queue is not None else []))

    def _claim(self, change: Callable[[Job], Job]) -> Job | None:
        def claim(pipe: redis.client.Pipeline) -> Job | None:
            oldest = pipe.zrange(self._queue, 0, 0)
            return self._apply(pipe, oldest[0], change)[1] if oldest else None

        return self._redis.transaction(claim, self._queue, value_from_callable=True)

    def _update(self, id: str, change: Callable[[Job], Job | None]) -> tuple[Job | None, Job | None]:
        return self._redis.transaction(lambda pipe: self._apply(pipe, id, change), self._job_key(id),
                                       value_from_callable=True)

    def _apply(self, pipe: redis.client.Pipeline, id: str,
               change: Callable[[Job], Job | None]) -> tuple[Job | None, Job | None]:
        """Inside a WATCH: read the job (watching its hash too), queue its changed state; (before, after)."""
        key = self._job_key(id)
        pipe.watch(key)
        record = pipe.hgetall(key)
        if not record:
            return None, None
        before = Job.from_record(record)
        after = change(before)
        if after is not None:
            pipe.multi()
            self._save(pipe, after, int(record["seq"]))
            self._add_stats(pipe, stat_increments(before, after))
        return before, after

    def _save(self, pipe: redis.client.Pipeline, job: Job, seq: int) -> None:
        """Queue the commands that store `job` and move it to the index of its state."""
        key = self._job_key(job.id)
        record = job.to_record()
        pipe.hset(key, mapping={"seq": seq, **{name: value for name, value in record.items() if value is not None}})
        nulls = [name for name, value in record.items() if value is None]
        if nulls:
            pipe.hdel(key, *nulls)
        pipe.zrem(self._queue, job.id)
        pipe.zrem(self._running, job.id)
        if job.status == IN_QUEUE:
            pipe.zadd(self._queue, {job.id: seq})
        elif job.status == IN_PROGRESS:
            pipe.zadd(self._running, {job.id: job.lease_expires_at})
        else:
            pipe.zadd(self._done_key(job.outcome), {job.id: job.finished_at})
        if job.webhook_due_at is None:
            pipe.zrem(self._webhooks, job.id)
        else:
            pipe.zadd(self._webhooks, {job.id: job.webhook_due_at})

    def _add_stats(self, pipe: redis.client.Pipeline, increments: dict[str, int | float]) -> None:
        for name, amount in increments.items():
            if isinstance(amount, int):
                pipe.hincrby(self._stats, name, amount)
            else:
                pipe.hincrbyfloat(self._stats, name, amount)

    def _expired_ids(self, now: float) -> list[str]:
        return self._redis.zrangebyscore(self._running, "-inf", f"({now}")

    def _push_log(self, id: str, entry: dict[str, Any]) -> None:
        self._redis.rpush(self._log_key(id), json.dumps(entry))

    def _webhooks_due_at(self, now: float) -> list[tuple[str, str]]:
        ids = self._redis.zrangebyscore(self._webhooks, "-inf", now)
        pipe = self._redis.pipeline(transaction=False)
        for id in ids:
            pipe.hget(self._job_key(id), "webhook_url")
        return [(id, url) for id, url in zip(ids, pipe.execute() if ids else []) if url is not None]

    def _delete_finished(self, before: float) -> list[str]:
        finished = [(outcome, id) for outcome in OUTCOMES
                    for id in self._redis.zrangebyscore(self._done_key(outcome), "-inf", f"({before}")]
        if not finished:
            return []
        # A completed job's webhook never becomes pending again, so one not pending now stays so.
        pipe = self._redis.pipeline(transaction=False)
        for _, id in finished:
            pipe.zscore(self._webhooks, id)
        found = [job for job, due_at in zip(finished, pipe.execute()) if due_at is None]
        if not found:
            return []
        pipe = self._redis.pipeline(transaction=True)
        for outcome, id in found:
            pipe.zrem(self._done_key(outcome), id)
            pipe.delete(self._job_key(id), self._log_key(id))
        removed = pipe.execute()[::2]
        # A concurrent caller that removed an id first owns it (and its files).
        return [id for (_, id), was_there in zip(found, removed) if was_there]

    def _read_stats(self) -> dict[str, float]:
        return {name: float(value) for name, value in self._redis.hgetall(self._stats).items()}

    def _save_worker(self, worker: WorkerInfo, expires_at: float) -> None:
        ttl_ms = math.ceil((expires_at - worker.seen_at) * 1000)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._worker_key(worker.id), json.dumps({"seen_at": worker.seen_at, "info": worker.info}), px=ttl_ms)
        pipe.zadd(self._workers, {worker.id: expires_at})
        pipe.zremrangebyscore(self._workers, "-inf", worker.seen_at)
        pipe.execute()

    def _workers_alive_at(self, now: float) -> list[WorkerInfo]:
        ids = self._redis.zrangebyscore(self._workers, f"({now}", "+inf")
        values = self._redis.mget([self._worker_key(id) for id in ids]) if ids else []
        workers = []
        for id, value in zip(ids, values):
            if value is not None:  # None: the key expired between the two reads, the worker is gone
                saved = json.loads(value)
                workers.append(WorkerInfo(id=id, seen_at=saved["seen_at"], info=saved["info"]))
        return workers

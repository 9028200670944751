"""The job store's queue semantics, each test run against both backends: the SQLite file, and a real
redis-server started for the session (skipped without the binary, a failure under
MULTITALK_REQUIRE_REDIS=1). Concurrency is checked with threads sharing one store and with separate
processes each opening their own, as the API process and the workers do."""

from __future__ import annotations

import functools
import gc
import math
import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import redis

from server.jobs import DURATION_BUCKETS_S, WORKER_LOST, QueueFull, RedisJobStore, SqliteJobStore, open_job_store

APP = "fal-ai/ai-avatar/multi"
LEASE_S = 0.3  # the lease tests sleep past it


@pytest.fixture(params=["sqlite", "redis"])
def spec(request, tmp_path) -> tuple[str | None, Path]:
    """open_job_store's arguments for one backend, fresh per test; picklable, for child processes."""
    if request.param == "sqlite":
        return None, tmp_path
    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    return url, tmp_path


@pytest.fixture
def store(spec):
    opened = open_job_store(*spec)
    yield opened
    opened.close()


class _Clock:
    """A store clock the test sets, so durations come out exact on both backends."""

    def __init__(self, now_s: float):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock(store, monkeypatch) -> _Clock:
    fake = _Clock(1000.0)
    monkeypatch.setattr(store, "_now", fake)
    return fake


def _submit_n(store, n: int) -> list[str]:
    return [store.submit(APP, {"n": i}).id for i in range(n)]


def test_open_job_store_picks_the_backend(spec):
    opened = open_job_store(*spec)
    assert isinstance(opened, RedisJobStore if spec[0] else SqliteJobStore)
    if not spec[0]:
        assert (spec[1] / "jobs.sqlite3").is_file()
    opened.close()


def test_submit_get_and_queue_positions(store):
    job = store.submit(APP, {"prompt": "hi", "nested": {"x": [1, 2]}}, webhook_url="http://hook/x")
    fetched = store.get(job.id)
    assert fetched == job
    assert (fetched.status, fetched.outcome, fetched.attempts, fetched.cancel_requested) == ("IN_QUEUE", None, 0, False)
    assert fetched.input == {"prompt": "hi", "nested": {"x": [1, 2]}} and fetched.webhook_url == "http://hook/x"
    others = _submit_n(store, 3)
    assert [store.queue_position(id) for id in [job.id, *others]] == [0, 1, 2, 3]
    assert store.claim("w1", 60).id == job.id
    assert [store.queue_position(id) for id in [job.id, *others]] == [0, 0, 1, 2]
    assert store.get("no-such-job") is None and store.queue_position("no-such-job") == 0
    assert store.counts() == {"queued": 3, "running": 1, "completed": {"OK": 0, "ERROR": 0, "CANCELLED": 0}}


def test_claim_takes_the_oldest_and_holds_a_lease(store):
    ids = _submit_n(store, 3)
    before = time.time()
    first = store.claim("w1", 60)
    assert first.id == ids[0]
    assert (first.status, first.attempts, first.worker_id) == ("IN_PROGRESS", 1, "w1")
    assert before - 1 < first.started_at <= first.lease_expires_at - 60 + 1e-6 < time.time() + 1
    assert store.get(first.id) == first
    assert store.claim("w2", 60).id == ids[1]
    assert store.renew(first.id, "w1", 120)
    assert store.get(first.id).lease_expires_at > first.lease_expires_at + 59
    assert not store.renew(first.id, "w2", 120), "only the worker holding the job renews it"
    assert not store.renew(ids[2], "w1", 120), "a queued job has no lease"
    store.claim("w3", 60)
    assert store.claim("w4", 60) is None
    with pytest.raises(ValueError):
        store.claim("w4", 0)


def _claim_all(store) -> list[str]:
    worker = f"{os.getpid()}-{threading.get_ident()}"
    claimed = []
    while (job := store.claim(worker, 60)) is not None:
        claimed.append(job.id)
        time.sleep(0.002)  # "runs" it, as a worker would, so the claimers interleave
    return claimed


def _submit_some(store, count: int, max_queue: int) -> list[bool]:
    """Whether each of `count` submits was accepted."""
    accepted = []
    for _ in range(count):
        try:
            store.submit(APP, {}, max_queue=max_queue)
            accepted.append(True)
        except QueueFull:
            accepted.append(False)
    return accepted


def _after_barrier(barrier, task: Callable, store):
    barrier.wait()
    return task(store)


def _child(spec, barrier, results, task: Callable) -> None:
    store = open_job_store(*spec)
    results.put(_after_barrier(barrier, task, store))
    store.close()


def _run_concurrently(mode: str, spec, store, task: Callable, n: int) -> list:
    """task(store) in n threads sharing `store`, or in n processes each opening its own; all start together."""
    if mode == "threads":
        barrier = threading.Barrier(n)
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: _after_barrier(barrier, task, store), range(n)))
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(n), context.Queue()
    children = [context.Process(target=_child, args=(spec, barrier, results, task)) for _ in range(n)]
    for child in children:
        child.start()
    outputs = [results.get(timeout=30) for _ in children]
    for child in children:
        child.join(10)
        assert child.exitcode == 0
    return outputs


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_concurrent_claimers_take_each_job_exactly_once(store, spec, mode):
    ids = _submit_n(store, 50)
    claimed = [id for batch in _run_concurrently(mode, spec, store, _claim_all, 4 if mode == "processes" else 8)
               for id in batch]
    assert sorted(claimed) == sorted(ids)
    assert store.counts()["running"] == 50 and store.counts()["queued"] == 0
    assert store.stats().wait_seconds.count == 50, "each claim counted once, with its job's change"


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_concurrent_submits_never_overshoot_max_queue(store, spec, mode):
    if mode == "threads":
        outcomes = _run_concurrently(mode, spec, store, functools.partial(_submit_some, count=1, max_queue=50), 100)
    else:
        outcomes = _run_concurrently(mode, spec, store, functools.partial(_submit_some, count=25, max_queue=50), 4)
    accepted = [ok for batch in outcomes for ok in batch]
    assert (accepted.count(True), accepted.count(False)) == (50, 50)
    assert store.counts()["queued"] == 50
    with pytest.raises(QueueFull, match="50"):
        store.submit(APP, {}, max_queue=50)
    store.submit(APP, {}, max_queue=51)


def test_cancel_queued_running_finished_and_unknown(store):
    running, queued, later = _submit_n(store, 3)
    assert store.claim("w1", 60).id == running
    assert store.request_cancel(queued) == "OK"
    job = store.get(queued)
    assert (job.status, job.outcome) == ("COMPLETED", "CANCELLED") and job.finished_at is not None
    assert store.queue_position(later) == 0, "a cancelled job leaves the queue at once"
    assert not store.is_cancel_requested(running)
    assert store.request_cancel(running) == "CANCELLATION_REQUESTED"
    assert store.is_cancel_requested(running) and store.get(running).status == "IN_PROGRESS"
    assert store.request_cancel(running) == "CANCELLATION_REQUESTED"
    assert store.renew(running, "w1", 60), "the worker keeps its lease while it winds down"
    assert store.finish(running, "w1", "CANCELLED")
    assert (store.get(running).status, store.get(running).outcome) == ("COMPLETED", "CANCELLED")
    assert store.request_cancel(running) == "ALREADY_COMPLETED"
    assert store.request_cancel("no-such-job") == "NOT_FOUND"
    assert store.claim("w2", 60).id == later, "the cancelled queued job never runs"
    assert store.counts()["completed"] == {"OK": 0, "ERROR": 0, "CANCELLED": 2}


def test_finish_with_result_or_error(store):
    good, bad = _submit_n(store, 2)
    store.claim("w1", 60)
    store.claim("w2", 60)
    assert not store.finish(good, "w2", "OK", result={"video": {}}), "only the worker holding the job finishes it"
    assert store.finish(good, "w1", "OK", result={"video": {"url": "/files/x.mp4"}, "seed": 81})
    job = store.get(good)
    assert (job.status, job.outcome, job.error) == ("COMPLETED", "OK", None)
    assert job.result == {"video": {"url": "/files/x.mp4"}, "seed": 81}
    assert job.finished_at >= job.started_at and job.lease_expires_at is None
    assert not store.finish(good, "w1", "ERROR", error="late"), "a finished job stays as it finished"
    assert not store.renew(good, "w1", 60)
    assert store.finish(bad, "w2", "ERROR", error="CUDA out of memory", error_type="OutOfMemory")
    job = store.get(bad)
    assert (job.outcome, job.result, job.error, job.error_type) == ("ERROR", None, "CUDA out of memory", "OutOfMemory")
    with pytest.raises(ValueError):
        store.finish(bad, "w2", "FAILED")
    assert store.counts() == {"queued": 0, "running": 0, "completed": {"OK": 1, "ERROR": 1, "CANCELLED": 0}}


def test_logs_append_and_read_since(store):
    job = store.submit(APP, {})
    assert store.logs(job.id) == []
    for i in range(3):
        store.append_log(job.id, f"step {i + 1}/3")
    store.append_log(job.id, "slow", level="WARN", source="server")
    entries = store.logs(job.id)
    assert [e["message"] for e in entries] == ["step 1/3", "step 2/3", "step 3/3", "slow"]
    assert entries[0]["level"] == "INFO" and entries[0]["source"] == "worker"
    assert (entries[3]["level"], entries[3]["source"]) == ("WARN", "server")
    assert all(abs(e["timestamp"] - time.time()) < 5 for e in entries)
    assert store.logs(job.id, since=3) == entries[3:] and store.logs(job.id, since=4) == []
    with pytest.raises(ValueError):
        store.append_log(job.id, "x", level="LOUD")


def test_expired_lease_requeues_once_then_fails(store):
    lost, behind = _submit_n(store, 2)
    assert store.claim("w1", LEASE_S).id == lost
    assert store.requeue_expired() == [], "a live lease is left alone"
    time.sleep(LEASE_S + 0.1)
    [requeued] = store.requeue_expired()
    assert (requeued.id, requeued.status, requeued.attempts, requeued.worker_id) == (lost, "IN_QUEUE", 1, None)
    assert store.queue_position(lost) == 0 and store.queue_position(behind) == 1, "back at its original place"
    assert "re-queued" in store.logs(lost)[-1]["message"]
    assert not store.renew(lost, "w1", 60) and not store.finish(lost, "w1", "OK"), "the dead worker lost the job"
    assert store.claim("w2", LEASE_S).id == lost
    time.sleep(LEASE_S + 0.1)
    [failed] = store.requeue_expired(max_attempts=2)
    assert (failed.status, failed.outcome, failed.error_type, failed.attempts) == ("COMPLETED", "ERROR", WORKER_LOST, 2)
    assert "stopped responding" in failed.error and store.get(lost) == failed
    assert store.requeue_expired() == []
    assert store.claim("w3", 60).id == behind


def test_expired_lease_with_pending_cancel_is_cancelled(store):
    job = store.submit(APP, {})
    store.claim("w1", LEASE_S)
    store.request_cancel(job.id)
    time.sleep(LEASE_S + 0.1)
    [cancelled] = store.requeue_expired()
    assert (cancelled.status, cancelled.outcome) == ("COMPLETED", "CANCELLED")


def test_a_new_store_sees_everything(spec, store):
    done, running, queued = _submit_n(store, 3)
    store.claim("w1", 60)
    store.finish(done, "w1", "OK", result={"seed": 1})
    store.claim("w1", 60)
    store.append_log(running, "step 1/2")
    store.close()
    reopened = open_job_store(*spec)
    assert reopened.get(done).result == {"seed": 1}
    assert reopened.get(running).status == "IN_PROGRESS" and reopened.logs(running)[0]["message"] == "step 1/2"
    assert reopened.queue_position(queued) == 0
    assert reopened.claim("w2", 60).id == queued
    reopened.close()


def test_expire_finished_deletes_old_finished_jobs(store):
    ok, cancelled, running, queued = _submit_n(store, 4)
    store.claim("w1", 60)
    store.finish(ok, "w1", "OK", result={})
    store.request_cancel(cancelled)
    store.claim("w2", 60)
    store.append_log(ok, "done")
    assert store.expire_finished(older_than_s=3600) == []
    time.sleep(0.01)
    assert sorted(store.expire_finished(older_than_s=0)) == sorted([ok, cancelled])
    assert store.get(ok) is None and store.get(cancelled) is None and store.logs(ok) == []
    assert store.get(running).status == "IN_PROGRESS" and store.get(queued).status == "IN_QUEUE"
    assert store.expire_finished(older_than_s=0) == []
    assert store.counts() == {"queued": 1, "running": 1, "completed": {"OK": 0, "ERROR": 0, "CANCELLED": 0}}


def test_heartbeats_expire_after_their_ttl(store):
    store.record_worker("w2", {"state": "ready", "job_id": None}, ttl_s=60)
    store.record_worker("w1", {"state": "loading", "gpu_memory": {"allocated_bytes": 1 << 30}}, ttl_s=LEASE_S)
    workers = store.live_workers()
    assert [w.id for w in workers] == ["w1", "w2"]
    assert workers[0].info == {"state": "loading", "gpu_memory": {"allocated_bytes": 1 << 30}}
    assert all(abs(w.seen_at - time.time()) < 5 for w in workers)
    time.sleep(LEASE_S + 0.1)
    assert [w.id for w in store.live_workers()] == ["w2"]
    with pytest.raises(ValueError):
        store.record_worker("w1", {}, ttl_s=0)


def test_a_new_heartbeat_replaces_the_last(store):
    store.record_worker("w1", {"state": "loading"}, ttl_s=LEASE_S)
    first = store.live_workers()[0]
    time.sleep(LEASE_S * 0.6)
    store.record_worker("w1", {"state": "ready"}, ttl_s=LEASE_S)
    time.sleep(LEASE_S * 0.6)
    [second] = store.live_workers()
    assert second.info == {"state": "ready"} and second.seen_at > first.seen_at, "alive past the first ttl"


def test_forget_worker_and_other_store_instances(spec, store):
    other = open_job_store(*spec)
    store.record_worker("w1", {"state": "ready"}, ttl_s=60)
    other.record_worker("w2", {"state": "ready"}, ttl_s=60)
    assert store.live_workers() == other.live_workers() and len(other.live_workers()) == 2
    other.forget_worker("w1")
    other.forget_worker("no-such-worker")
    assert [w.id for w in store.live_workers()] == ["w2"]
    other.close()


def test_stats_count_every_way_a_job_completes_and_outlive_the_jobs(spec, store, clock):
    ok, failed, cancelled, stopped, lost = _submit_n(store, 5)
    store.claim("w1", 60)
    store.finish(ok, "w1", "OK", result={})
    store.claim("w1", 60)
    store.finish(failed, "w1", "ERROR", error="boom")
    assert store.request_cancel(cancelled) == "OK"
    store.claim("w1", 60)
    store.request_cancel(stopped)
    store.finish(stopped, "w1", "CANCELLED")
    for _ in range(2):  # lost twice: re-queued (not completed), then failed
        assert store.claim("w1", 1).id == lost
        clock.advance(2)
        assert store.stats().completed == {"OK": 1, "ERROR": 1, "CANCELLED": 2}
        store.requeue_expired(max_attempts=2)
    assert store.get(lost).error_type == WORKER_LOST
    stats = store.stats()
    assert stats.completed == {"OK": 1, "ERROR": 2, "CANCELLED": 2}
    assert stats.run_seconds.count == 4, "the job cancelled in the queue never ran"
    assert stats.wait_seconds.count == 5, "a re-queued job waits again"
    clock.advance(1)
    assert len(store.expire_finished(older_than_s=0)) == 5
    assert store.counts()["completed"] == {"OK": 0, "ERROR": 0, "CANCELLED": 0}
    assert store.stats() == stats
    store.close()
    reopened = open_job_store(*spec)
    assert reopened.stats() == stats
    reopened.close()


def test_stats_histograms_bucket_and_sum_durations(store, clock):
    quick, long = _submit_n(store, 2)
    clock.advance(5)
    store.claim("w1", 9999)  # waited 5 s: the `le=5` bucket, bounds are inclusive
    clock.advance(70)
    store.finish(quick, "w1", "OK")  # ran 70 s
    store.claim("w1", 9999)  # waited 75 s
    clock.advance(4000)
    store.finish(long, "w1", "OK")  # ran 4000 s: past the last finite bound
    stats = store.stats()

    def bucket_counts(by_bound_s: dict[float, int]) -> tuple[int, ...]:
        return tuple(by_bound_s.get(bound, 0) for bound in DURATION_BUCKETS_S)

    assert stats.wait_seconds.bounds_s == DURATION_BUCKETS_S
    assert stats.wait_seconds.counts == bucket_counts({5: 1, 120: 1})
    assert stats.run_seconds.counts == bucket_counts({120: 1, math.inf: 1})
    assert (stats.wait_seconds.count, stats.run_seconds.count) == (2, 2)
    assert stats.wait_seconds.sum_s == pytest.approx(80) and stats.run_seconds.sum_s == pytest.approx(4070)


def _open_files_on(path: Path) -> int:
    """This process's open file descriptors on `path` (SQLite's own file, not its -wal/-shm companions)."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))


BURST = 16


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_threads_that_end_leave_no_sqlite_connection_open(tmp_path):
    """Server thread pools retire idle threads; each one's connection used to stay open (an fd each, without end).
    SQLite itself may keep closed connections' descriptors for reuse while others hold locks on the file: at most
    as many as were open at once (one burst and the store's own), not one per thread that ever ran."""
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    threads_run = 0
    for _burst in range(8):
        threads = [threading.Thread(target=store.get, args=("no-such-id",)) for _ in range(BURST)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        threads_run += len(threads)
    gc.collect()
    assert _open_files_on(path) <= BURST + 1 < threads_run
    store.close()
    assert _open_files_on(path) == 0

"""The job store's queue semantics and webhook outbox, each test run against both backends (the `spec`
and `store` fixtures of conftest.py: the SQLite file, and a real redis-server). Concurrency is checked
with threads sharing one store and with separate processes each opening their own, as the API process
and the workers do. Last, the SQLite file's own concerns: connections of ended threads, migrating an
older file, refusing a damaged one."""

from __future__ import annotations

import functools
import gc
import math
import multiprocessing
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from server.jobs import (
    DURATION_BUCKETS_S,
    WORKER_LOST,
    DamagedJobStore,
    QueueFull,
    RedisJobStore,
    SqliteJobStore,
    open_job_store,
)

APP = "fal-ai/ai-avatar/multi"
LEASE_S = 0.3  # the lease tests sleep past it


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
    assert store.counts() == {"queued": 3, "running": 1, "completed": {"OK": 0, "ERROR": 0, "CANCELLED": 0},
                              "webhooks_pending": 0}


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
    assert store.counts() == {"queued": 0, "running": 0, "completed": {"OK": 1, "ERROR": 1, "CANCELLED": 0},
                              "webhooks_pending": 0}


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
    assert store.counts() == {"queued": 1, "running": 1, "completed": {"OK": 0, "ERROR": 0, "CANCELLED": 0},
                              "webhooks_pending": 0}


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


HOOK = "https://example.com/hook"


def _submit_with_webhooks(store, n: int) -> list[str]:
    return [store.submit(APP, {"n": i}, webhook_url=f"{HOOK}/{i}").id for i in range(n)]


def _complete(store, id: str) -> None:
    assert store.claim("w1", 60).id == id
    store.finish(id, "w1", "OK", result={"status_code": 200, "body": {"seed": 1}})


def test_every_way_a_job_completes_puts_its_webhook_in_the_outbox(store, clock):
    finished, cancelled, lost = _submit_with_webhooks(store, 3)
    silent = store.submit(APP, {}).id
    assert store.claim("w1", 60).id == finished
    assert store.get(finished).webhook_state is None and store.due_webhooks() == [], "nothing to send yet"
    store.finish(finished, "w1", "OK", result={})  # a worker's finish
    clock.advance(1)
    assert store.request_cancel(cancelled) == "OK"  # a cancel while queued
    assert store.claim("w1", 1).id == lost
    clock.advance(2)
    [failed] = store.requeue_expired(max_attempts=1)  # the lease sweep giving up
    assert failed.webhook_state == "pending", "in the write that completed it"
    _complete(store, silent)  # no webhook_url: nothing to send
    for id in (finished, cancelled, lost):
        job = store.get(id)
        assert (job.status, job.webhook_state, job.webhook_attempts) == ("COMPLETED", "pending", 0)
        assert job.webhook_due_at == job.finished_at, "due the moment it completed"
    assert (store.get(silent).webhook_state, store.get(silent).webhook_due_at) == (None, None)
    assert store.due_webhooks() == [(finished, f"{HOOK}/0"), (cancelled, f"{HOOK}/1"), (lost, f"{HOOK}/2")]


def test_a_taken_webhook_is_held_then_retried_then_ended(store, clock):
    [id] = _submit_with_webhooks(store, 1)
    _complete(store, id)
    taken = store.take_webhook(id, hold_s=30)
    assert (taken.webhook_attempts, taken.webhook_due_at) == (1, clock.now_s + 30)
    assert store.take_webhook(id, hold_s=30) is None and store.due_webhooks() == [], "held: no second sender"
    clock.advance(31)  # its sender died mid-attempt: due again once the hold ends
    assert store.due_webhooks() == [(id, f"{HOOK}/0")]
    assert store.take_webhook(id, hold_s=30).webhook_attempts == 2
    assert not store.record_webhook_attempt(id, 1, "delivered"), "the attempt that outlived its hold decides nothing"
    assert store.record_webhook_attempt(id, 2, "pending", retry_in_s=10)
    assert (store.get(id).webhook_state, store.get(id).webhook_due_at) == ("pending", clock.now_s + 10)
    assert store.due_webhooks() == [] and store.take_webhook(id, hold_s=30) is None
    clock.advance(10)
    assert store.take_webhook(id, hold_s=30).webhook_attempts == 3
    assert store.record_webhook_attempt(id, 3, "failed")
    job = store.get(id)
    assert (job.webhook_state, job.webhook_attempts, job.webhook_due_at) == ("failed", 3, None)
    assert store.due_webhooks() == [] and store.take_webhook(id, hold_s=30) is None
    assert not store.record_webhook_attempt(id, 3, "delivered"), "an ended webhook stays ended"
    with pytest.raises(ValueError):
        store.take_webhook(id, hold_s=0)
    with pytest.raises(ValueError):
        store.record_webhook_attempt(id, 3, "lost")
    with pytest.raises(ValueError):
        store.record_webhook_attempt(id, 3, "pending", retry_in_s=-1)


def _take_all_due(store) -> list[str]:
    return [id for id, _ in store.due_webhooks() if store.take_webhook(id, hold_s=60) is not None]


def test_concurrent_senders_take_each_attempt_once(store, spec):
    ids = _submit_with_webhooks(store, 20)
    for id in ids:
        _complete(store, id)
    taken = [id for batch in _run_concurrently("threads", spec, store, _take_all_due, 8) for id in batch]
    assert sorted(taken) == sorted(ids)
    assert {store.get(id).webhook_attempts for id in ids} == {1}


def test_a_pending_webhook_keeps_its_job_from_expiring(store, clock):
    pending, delivered = _submit_with_webhooks(store, 2)
    for id in (pending, delivered):
        _complete(store, id)
    store.take_webhook(delivered, hold_s=30)
    store.record_webhook_attempt(delivered, 1, "delivered")
    clock.advance(1)
    assert store.expire_finished(older_than_s=0) == [delivered]
    assert store.get(pending).webhook_state == "pending"
    store.take_webhook(pending, hold_s=30)
    store.record_webhook_attempt(pending, 1, "failed")
    assert store.expire_finished(older_than_s=0) == [pending], "kept only while its webhook is pending"


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


def _close_under_running_reads(folder: Path, rounds: int, readers: int) -> None:
    """In a child process: close stores while threads read from them. Exits 1 when a reader ended in
    anything but the closed store's refusal, dies of SIGSEGV where close pulls a connection from
    under a running statement."""
    for round in range(rounds):
        store = SqliteJobStore(folder / f"jobs-{round}.sqlite3")
        endings: list[BaseException | None] = []

        def read() -> None:
            try:
                while True:
                    store.due_webhooks()
                    store.counts()
            except BaseException as exc:  # the child reports how every reader ended
                endings.append(exc)

        threads = [threading.Thread(target=read) for _ in range(readers)]
        for thread in threads:
            thread.start()
        time.sleep(0.005)
        store.close()
        for thread in threads:
            thread.join(10)
        if any(thread.is_alive() for thread in threads) or not all(
                isinstance(exc, sqlite3.ProgrammingError) and "is closed" in str(exc) for exc in endings):
            raise SystemExit(1)


def test_closing_the_store_under_running_reads_waits_for_them_and_refuses_later_calls(tmp_path):
    """Shutdown closes the store while the webhook sender's threads may still be reading it: each running
    statement finishes, each later call is refused, and the process does not crash (it did: CI died of
    a segfault in one such read)."""
    child = multiprocessing.get_context("spawn").Process(target=_close_under_running_reads, args=(tmp_path, 100, 4))
    child.start()
    child.join(120)
    assert child.exitcode == 0


def test_a_file_made_before_webhooks_gains_their_columns(tmp_path):
    """The jobs table as the first release made it (no owner, no webhook columns)."""
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, app TEXT NOT NULL, "
                "input TEXT NOT NULL, created_at REAL NOT NULL, status TEXT NOT NULL, outcome TEXT, result TEXT, "
                "error TEXT, error_type TEXT, webhook_url TEXT, started_at REAL, finished_at REAL, "
                "attempts INTEGER NOT NULL, cancel_requested INTEGER NOT NULL, worker_id TEXT, lease_expires_at REAL)")
    old.execute("INSERT INTO jobs (id, app, input, created_at, status, outcome, finished_at, attempts, "
                "cancel_requested) VALUES ('old', 'a', '{}', 1, 'COMPLETED', 'OK', 2, 1, 0)")
    old.commit()
    old.close()
    store = SqliteJobStore(path)
    job = store.get("old")
    assert (job.owner, job.webhook_state, job.webhook_attempts, job.webhook_due_at) == (None, None, 0, None)
    [id] = _submit_with_webhooks(store, 1)
    _complete(store, id)
    assert store.due_webhooks() == [(id, f"{HOOK}/0")]
    store.close()


def _damage_header(path: Path, page_size: int, root_page: int) -> None:
    with path.open("r+b") as file:
        file.write(b"not a database header!")


def _truncate(path: Path, page_size: int, root_page: int) -> None:
    with path.open("r+b") as file:
        file.truncate(page_size * root_page + 100)


def _damage_table_page(path: Path, page_size: int, root_page: int) -> None:
    """Overwrite the jobs table's root page (an interior page of its b-tree once the table spans pages):
    SQLite fails the check itself ("malformed")."""
    with path.open("r+b") as file:
        file.seek((root_page - 1) * page_size)
        file.write(b"\xa5" * page_size)


def _damage_leaf_cell_pointer(path: Path, page_size: int, root_page: int) -> None:
    """Point the first cell of a table's leaf page past the page's end: the check lists the problem."""
    with path.open("r+b") as file:
        data = file.read()
        leaf = next(page for page in range(root_page, len(data) // page_size) if data[page * page_size] == 0x0D)
        file.seek(leaf * page_size + 8)  # the cell pointer array, after a leaf page's 8-byte header
        file.write(b"\xff\xf0")


@pytest.mark.parametrize("damage", [_damage_header, _truncate, _damage_table_page, _damage_leaf_cell_pointer])
def test_a_damaged_file_is_refused_at_open_naming_it_and_what_to_do(tmp_path, damage):
    """A damaged page used to open fine: /healthz said 200 while every status read failed."""
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    for i in range(100):
        store.submit(APP, {"n": i, "text": "x" * 400})
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the file itself, none in the WAL
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root_page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'jobs'").fetchone()[0]
    db.close()
    assert (root_page - 1) * page_size > 100, "the damage is past the header"
    damage(path, page_size, root_page)
    with pytest.raises(DamagedJobStore) as refused:
        SqliteJobStore(path)
    message = str(refused.value)
    assert str(path) in message and "move it aside" in message and "starts with an empty job store" in message
    (tmp_path / "aside").mkdir()
    for moved in tmp_path.glob("jobs.sqlite3*"):
        moved.rename(tmp_path / "aside" / moved.name)
    fresh = SqliteJobStore(path)
    assert fresh.counts()["queued"] == 0, "moved aside, the server starts with an empty store"
    fresh.close()


def test_a_file_that_cannot_be_opened_is_not_called_damaged(tmp_path):
    """Only a damaged file is worth moving aside: one SQLite cannot open (here a folder in its place; a lock or an
    I/O error alike) keeps SQLite's own error, not advice that would throw a healthy store away."""
    path = tmp_path / "jobs.sqlite3"
    path.mkdir()
    with pytest.raises(sqlite3.OperationalError) as refused:
        SqliteJobStore(path)
    assert not isinstance(refused.value, DamagedJobStore)

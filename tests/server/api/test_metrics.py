"""/metrics' exposition, read back with a small parser of the text format (prometheus_client is not a
dependency): values after jobs move through the queue and workers send heartbeats, on the SQLite
store, and the same exposition from the Redis store."""

from __future__ import annotations

import re

import pytest
import redis

from server.api.metrics import render_metrics
from server.jobs import RedisJobStore, SqliteJobStore

APP = "fal-ai/ai-avatar/multi"
LE = ("1", "5", "15", "30", "60", "120", "300", "600", "1200", "1800", "3600", "+Inf")  # the buckets' labels
_SAMPLE_LINE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)")
_LABEL = re.compile(r'(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"(?:,|$)')
_UNESCAPED = {"n": "\n", "\\": "\\", '"': '"'}

Key = tuple[str, frozenset[tuple[str, str]]]


def parse(text: str) -> tuple[dict[str, str], dict[Key, float]]:
    """({family: type}, {(sample name, labels): value}); fails on a sample of a family without HELP
    and TYPE before it, or a line that is not of the format."""
    types: dict[str, str] = {}
    helped: set[str] = set()
    samples: dict[Key, float] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ")[2])
        elif line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ")
            types[family] = kind
        else:
            match = _SAMPLE_LINE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            family = re.sub(r"_(bucket|sum|count)$", "", match["name"])
            family = family if family in types else match["name"]
            assert family in types and family in helped, f"{match['name']} has no TYPE and HELP before it"
            samples[match["name"], _parse_labels(match["labels"] or "")] = float(match["value"])
    return types, samples


def _parse_labels(text: str) -> frozenset[tuple[str, str]]:
    labels = [(m["name"], re.sub(r"\\(.)", lambda e: _UNESCAPED[e[1]], m["value"])) for m in _LABEL.finditer(text)]
    assert "".join(m[0] for m in _LABEL.finditer(text)) == text, f"malformed labels: {text!r}"
    return frozenset(labels)


def scrape(store) -> dict[Key, float]:
    body, content_type = render_metrics(store)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body.decode())[1]


def value(samples: dict[Key, float], name: str, **labels: str) -> float:
    return samples[f"multitalk_{name}", frozenset(labels.items())]


def buckets(samples: dict[Key, float], histogram: str) -> dict[str, float]:
    """A histogram's cumulative bucket counts by their `le` label."""
    return {dict(labels)["le"]: count for (name, labels), count in samples.items()
            if name == f"multitalk_{histogram}_bucket"}


@pytest.fixture
def store(tmp_path):
    opened = SqliteJobStore(tmp_path / "jobs.sqlite3")
    yield opened
    opened.close()


def _move_jobs(store, monkeypatch) -> None:
    """On a clock the test sets: one job waits 2 s and runs 30 s, one waits 32 s and is still
    running, one is cancelled in the queue, one still waits."""
    now_s = [1000.0]
    monkeypatch.setattr(store, "_now", lambda: now_s[0])
    done, running, cancelled, _ = [store.submit(APP, {}).id for _ in range(4)]
    now_s[0] += 2
    store.claim("w1", 600)
    now_s[0] += 30
    store.finish(done, "w1", "OK", result={})
    store.claim("w1", 600)
    store.request_cancel(cancelled)


def test_an_empty_store(store):
    types, samples = parse(render_metrics(store)[0].decode())
    assert types == {
        "multitalk_queue_depth": "gauge", "multitalk_jobs_running": "gauge", "multitalk_webhooks_pending": "gauge",
        "multitalk_jobs_completed_total": "counter",
        "multitalk_job_run_seconds": "histogram", "multitalk_job_queue_wait_seconds": "histogram",
        "multitalk_workers_alive": "gauge", "multitalk_worker_ready": "gauge", "multitalk_worker_busy": "gauge",
        "multitalk_gpu_memory_allocated_bytes": "gauge", "multitalk_gpu_memory_reserved_bytes": "gauge",
        "multitalk_gpu_memory_total_bytes": "gauge",
        "multitalk_gpu_memory_peak_allocated_bytes": "gauge", "multitalk_gpu_memory_peak_reserved_bytes": "gauge",
        "multitalk_gpu_memory_outside_allocator_bytes": "gauge", "multitalk_gpu_memory_pinned_host_bytes": "gauge",
    }
    assert value(samples, "queue_depth") == value(samples, "jobs_running") == value(samples, "workers_alive") == 0
    assert [value(samples, "jobs_completed_total", outcome=o) for o in ("OK", "ERROR", "CANCELLED")] == [0, 0, 0]
    assert buckets(samples, "job_run_seconds") == dict.fromkeys(LE, 0)
    assert value(samples, "job_run_seconds_count") == value(samples, "job_run_seconds_sum") == 0


def test_job_metrics(store, monkeypatch):
    _move_jobs(store, monkeypatch)
    samples = scrape(store)
    assert (value(samples, "queue_depth"), value(samples, "jobs_running")) == (1, 1)
    assert [value(samples, "jobs_completed_total", outcome=o) for o in ("OK", "ERROR", "CANCELLED")] == [1, 0, 1]
    assert buckets(samples, "job_run_seconds") == dict(zip(LE, [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]))
    assert (value(samples, "job_run_seconds_sum"), value(samples, "job_run_seconds_count")) == (30, 1)
    assert buckets(samples, "job_queue_wait_seconds") == dict(zip(LE, [0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]))
    assert (value(samples, "job_queue_wait_seconds_sum"), value(samples, "job_queue_wait_seconds_count")) == (34, 2)


def test_worker_metrics(store):
    odd_id = 'host "a"\\gpu\n0'
    gpu_memory = {"allocated_bytes": 3 << 30, "reserved_bytes": 4 << 30, "total_bytes": 80 << 30}
    store.record_worker("w1", {"state": "ready", "job_id": "j1", "gpu_memory": gpu_memory}, ttl_s=60)
    store.record_worker("w2", {"state": "loading", "job_id": None, "gpu_memory": None}, ttl_s=60)
    store.record_worker(odd_id, {"state": "ready", "job_id": None}, ttl_s=60)
    store.record_worker("gone", {"state": "ready"}, ttl_s=60)
    store.forget_worker("gone")
    samples = scrape(store)
    assert value(samples, "workers_alive") == 3
    assert [value(samples, "worker_ready", worker=w) for w in ("w1", "w2", odd_id)] == [1, 0, 1]
    assert [value(samples, "worker_busy", worker=w) for w in ("w1", "w2", odd_id)] == [1, 0, 0]
    for name, size_bytes in gpu_memory.items():
        assert value(samples, f"gpu_memory_{name}", worker="w1") == size_bytes
        assert [key for key in samples if key[0] == f"multitalk_gpu_memory_{name}"] == [
            (f"multitalk_gpu_memory_{name}", frozenset({("worker", "w1")}))], "only workers that report it"


def test_redis_store_renders_the_same(store, redis_url, monkeypatch):
    redis.Redis.from_url(redis_url).flushdb()
    redis_store = RedisJobStore(redis_url)
    for each in (store, redis_store):
        _move_jobs(each, monkeypatch)
        each.record_worker("w1", {"state": "ready", "job_id": None}, ttl_s=60)
    assert scrape(redis_store) == scrape(store)
    redis_store.close()


"""GPU memory in /metrics: a heartbeat's figures (peaks, memory outside the allocator, pinned host memory)
as Prometheus lines, none for a CPU worker, and the figures themselves on a CUDA machine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_metrics import parse, value

from server.api.metrics import render_metrics
from server.jobs import SqliteJobStore
from server.worker.runtime import Heartbeat, _gpu_memory

GIB = 1 << 30
FIGURES = {"allocated_bytes": 3 * GIB, "reserved_bytes": 4 * GIB, "peak_allocated_bytes": 5 * GIB,
           "peak_reserved_bytes": 6 * GIB, "outside_allocator_bytes": 600 << 20, "total_bytes": 80 * GIB,
           "pinned_host_bytes": 2 * GIB}


@pytest.fixture
def store(tmp_path):
    opened = SqliteJobStore(tmp_path / "jobs.sqlite3")
    yield opened
    opened.close()


def _gpu_series(samples) -> set[str]:
    return {name for name, _ in samples if name.startswith("multitalk_gpu_memory_")}


def test_every_figure_of_a_heartbeat_is_a_gauge_per_worker(store):
    store.record_worker("w1", {"state": "ready", "job_id": None, "gpu_memory": FIGURES}, ttl_s=60)
    text = render_metrics(store)[0].decode()
    types, samples = parse(text)
    for name, size_bytes in FIGURES.items():
        assert types[f"multitalk_gpu_memory_{name}"] == "gauge"
        assert value(samples, f"gpu_memory_{name}", worker="w1") == size_bytes
    assert "# HELP multitalk_gpu_memory_outside_allocator_bytes GPU memory in use outside" in text
    assert "# HELP multitalk_gpu_memory_pinned_host_bytes Page-locked host memory" in text
    for line in ('multitalk_gpu_memory_peak_allocated_bytes{worker="w1"} 5368709120',
                 'multitalk_gpu_memory_peak_reserved_bytes{worker="w1"} 6442450944',
                 'multitalk_gpu_memory_outside_allocator_bytes{worker="w1"} 629145600',
                 'multitalk_gpu_memory_pinned_host_bytes{worker="w1"} 2147483648'):
        assert line in text.splitlines()


def test_a_heartbeat_of_an_older_worker_renders_what_it_has(store):
    """During a rolling upgrade a worker of the previous version reports only the first three figures."""
    older = {name: FIGURES[name] for name in ("allocated_bytes", "reserved_bytes", "total_bytes")}
    store.record_worker("old", {"state": "ready", "job_id": None, "gpu_memory": older}, ttl_s=60)
    types, samples = parse(render_metrics(store)[0].decode())
    assert _gpu_series(samples) == {f"multitalk_gpu_memory_{name}" for name in older}
    assert {f"multitalk_gpu_memory_{name}" for name in FIGURES} <= set(types), "every family is still declared"


def test_a_cpu_worker_reports_no_gpu_memory(store):
    assert _gpu_memory("cpu") is None
    heartbeat = Heartbeat(SimpleNamespace(store=store), "cpu-worker", {"state": "ready", "device": "cpu",
                                                                        "job_id": None})
    heartbeat.beat()
    assert store.live_workers()[0].info["gpu_memory"] is None
    samples = parse(render_metrics(store)[0].decode())[1]
    assert value(samples, "workers_alive") == 1
    assert _gpu_series(samples) == set()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures a real GPU")
def test_the_figures_on_a_gpu():
    device = torch.device("cuda", torch.cuda.current_device())
    held = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    pinned = torch.empty(32 << 20, dtype=torch.uint8).pin_memory()
    figures = _gpu_memory(str(device))
    assert set(figures) == set(FIGURES)
    assert figures["allocated_bytes"] >= held.numel()
    assert figures["peak_allocated_bytes"] >= figures["allocated_bytes"]
    assert figures["peak_reserved_bytes"] >= figures["reserved_bytes"] >= figures["allocated_bytes"]
    assert 0 < figures["outside_allocator_bytes"] < figures["total_bytes"], "the CUDA context at least"
    assert figures["pinned_host_bytes"] >= pinned.numel()

"""The /metrics body: the job store's queue, completion totals and live workers in Prometheus' text
exposition format (version 0.0.4).

Written by hand rather than with prometheus_client: every value is read from the store at scrape
time (it is shared by the API process and all workers, on one host or many), so there is no
in-process registry to keep, and the format takes a few lines.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping

from server.jobs import OUTCOMES, Histogram, JobStore, WorkerInfo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# One line of a metric family: (what follows the family's name, e.g. "_bucket"; labels; value).
Sample = tuple[str, Mapping[str, str], float]

# The keys of a heartbeat's `gpu_memory` (server/worker/runtime.py says how each is measured).
_GPU_MEMORY_HELP = {
    "allocated_bytes": "GPU memory held by the worker's tensors.",
    "reserved_bytes": "GPU memory held by the worker's caching allocator (allocated plus cached).",
    "peak_allocated_bytes": "Most GPU memory held by the worker's tensors since its process started.",
    "peak_reserved_bytes": "Most GPU memory held by the worker's caching allocator since its process started.",
    "outside_allocator_bytes": "GPU memory in use outside the worker's caching allocator: the device's used memory "
                               "(total minus free) minus reserved; the CUDA context, libraries' own buffers and "
                               "other processes on the GPU.",
    "total_bytes": "The worker's GPU memory in all.",
    "pinned_host_bytes": "Page-locked host memory of the worker's process: PyTorch's pinned allocator (in use or "
                         "cached) plus the offloaded blocks' buffers.",
}


def render_metrics(store: JobStore) -> tuple[bytes, str]:
    """The exposition of `store` now, and the content type to send it with."""
    counts, stats, workers = store.counts(), store.stats(), store.live_workers()
    families = [
        _family("queue_depth", "gauge", "Jobs waiting in the queue.", [_single(counts["queued"])]),
        _family("jobs_running", "gauge", "Jobs a worker is running.", [_single(counts["running"])]),
        _family("webhooks_pending", "gauge", "Webhooks waiting in the outbox for their next attempt.",
                [_single(counts["webhooks_pending"])]),
        _family("jobs_completed_total", "counter", "Jobs completed, by outcome.",
                [("", {"outcome": outcome}, stats.completed[outcome]) for outcome in OUTCOMES]),
        _family("job_run_seconds", "histogram", "Time from a job's start to its end, for jobs that started.",
                _histogram_samples(stats.run_seconds)),
        _family("job_queue_wait_seconds", "histogram", "Time from a job's submission to a worker claiming it.",
                _histogram_samples(stats.wait_seconds)),
        _family("workers_alive", "gauge", "Workers whose last heartbeat is within its ttl.", [_single(len(workers))]),
        _family("worker_ready", "gauge", "1 when the worker has loaded its model and takes jobs.",
                _per_worker(workers, lambda info: info.get("state") == "ready")),
        _family("worker_busy", "gauge", "1 when the worker is running a job.",
                _per_worker(workers, lambda info: info.get("job_id") is not None)),
        *(_family(f"gpu_memory_{name}", "gauge", help_text, _gpu_memory_samples(workers, name))
          for name, help_text in _GPU_MEMORY_HELP.items()),
    ]
    return "".join(families).encode(), CONTENT_TYPE


def _family(name: str, kind: str, help_text: str, samples: list[Sample]) -> str:
    """A metric family's HELP and TYPE lines and its samples, each line ending in a newline."""
    full_name = f"multitalk_{name}"
    lines = [f"# HELP {full_name} {help_text}", f"# TYPE {full_name} {kind}"]
    lines += [f"{full_name}{suffix}{_labels(labels)} {_number(value)}" for suffix, labels, value in samples]
    return "".join(line + "\n" for line in lines)


def _single(value: float) -> Sample:
    return "", {}, value


def _histogram_samples(histogram: Histogram) -> list[Sample]:
    """Prometheus buckets count every observation up to their bound (cumulative), the store's
    count each bucket alone: the running sum turns one into the other."""
    cumulative = itertools.accumulate(histogram.counts)
    buckets = [("_bucket", {"le": _number(bound)}, n) for bound, n in zip(histogram.bounds_s, cumulative)]
    return [*buckets, ("_sum", {}, histogram.sum_s), ("_count", {}, histogram.count)]


def _per_worker(workers: list[WorkerInfo], is_set: Callable[[dict[str, Any]], bool]) -> list[Sample]:
    return [("", {"worker": worker.id}, int(is_set(worker.info))) for worker in workers]


def _gpu_memory_samples(workers: list[WorkerInfo], name: str) -> list[Sample]:
    """Only workers that report the figure: not one on CPU, nor one still starting, nor one of an older
    version (during a rolling upgrade) whose heartbeat lacks it."""
    return [("", {"worker": worker.id}, worker.info["gpu_memory"][name])
            for worker in workers if name in (worker.info.get("gpu_memory") or {})]


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in labels.items()) + "}"


def _escape(label_value: str) -> str:
    """The format's three escapes in label values: backslash, double quote, line feed."""
    return label_value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "NaN" if math.isnan(value) else repr(value)

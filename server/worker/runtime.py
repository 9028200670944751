"""Running a worker for real: load the pipeline once, announce itself, serve jobs until stopped.

Used by `multitalk worker` (one process per GPU) and by `multitalk serve` for its embedded worker
(a thread of the API process). The worker announces itself through heartbeats in the job store
(state loading → warming_up (with --compile) → ready, or failed with the reason; its weights; the job it runs; GPU memory), which
is what `/readyz` and `/metrics` read, wherever the worker runs.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from server.jobs.failures import StoreOutage, storage_failure_or_raise
from server.services import Services
from server.settings import Settings
from server.worker.runner import Worker, WorkerSettings, new_worker_id

logger = logging.getLogger("multitalk.worker")

HEARTBEAT_EVERY_S = 5.0
HEARTBEAT_TTL_S = 20.0  # a worker silent this long is not counted as alive
HEARTBEAT_RETRY_MAX_S = 1.0  # the longest wait between heartbeats the store did not take


def resolve_weights(settings: Settings) -> tuple[Path, bool]:
    """(checkpoint folder, is_tiny); `tiny` means the seeded tiny checkpoints, made once in the data dir."""
    if settings.weights != "tiny":
        return Path(settings.weights), False
    from model.weights.tiny import cached_tiny_weights

    root = cached_tiny_weights(cache_root=settings.data_path)
    logger.warning("using the TINY demo/test weights at %s: random weights, the videos show noise", root)
    return root, True


def _device(settings: Settings) -> str:
    import torch

    if settings.device != "auto":
        return settings.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _gpu_memory(device: str) -> dict[str, int] | None:
    """The worker's memory figures in bytes for /readyz and /metrics; None on a CPU worker.

    `allocated` and `reserved` are PyTorch's caching allocator now (tensors; tensors plus its cache), and
    `peak_allocated` / `peak_reserved` their highest since the process started (nothing here resets them).
    `outside_allocator` is the device memory in use (cudaMemGetInfo's total − free) that the allocator does not
    hold: the CUDA context, libraries' own allocations (cuBLAS/cuDNN workspaces, NCCL buffers) and any other
    process on the same GPU. `pinned_host` is page-locked host memory of the process: PyTorch's pinned host
    allocator (`pin_memory()`), in use or cached, plus the offloaded blocks' buffers, registered in place
    (`model/runtime/pinned_blocks.py`).
    """
    import torch

    from model.runtime.pinned_blocks import page_locked_bytes

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    index = torch.device(device).index or 0
    reserved = torch.cuda.memory_reserved(index)
    free, total = torch.cuda.mem_get_info(index)
    return {"allocated_bytes": torch.cuda.memory_allocated(index), "reserved_bytes": reserved,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(index),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(index),
            # the job thread may allocate or free between the two reads: the difference can dip below zero
            "outside_allocator_bytes": max(total - free - reserved, 0),
            "pinned_host_bytes": torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) + page_locked_bytes(),
            "total_bytes": torch.cuda.get_device_properties(index).total_memory}


class Heartbeat:
    """Records the worker's state in the store every HEARTBEAT_EVERY_S from a side thread.

    A heartbeat the store cannot take (an outage) is retried within HEARTBEAT_RETRY_MAX_S rather than at
    the next regular beat, so the worker is announced again as soon as the store is back (a Redis that
    restarted without its data, or a wait longer than the ttl, would otherwise leave it unlisted)."""

    def __init__(self, services: Services, worker_id: str, info: dict[str, Any]):
        self.services, self.worker_id, self.info = services, worker_id, info
        self.worker: Worker | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{worker_id}", daemon=True)
        self._outage = StoreOutage(logger, f"while announcing worker_id={worker_id}", max_wait_s=HEARTBEAT_RETRY_MAX_S)
        self._next_beat_s = HEARTBEAT_EVERY_S  # sooner after a heartbeat the store did not take

    def update(self, **changes: Any) -> None:
        self.info.update(changes)
        self.beat()

    def beat(self) -> None:
        info = dict(self.info)
        if self.worker is not None:
            info["job_id"] = self.worker.current_job_id
        if info.get("device"):
            info["gpu_memory"] = _gpu_memory(info["device"])
        try:
            self.services.store.record_worker(self.worker_id, info, HEARTBEAT_TTL_S)
        except Exception as exc:
            wait_s = self._outage.noted(exc)
            if wait_s is None:
                logger.exception("heartbeat failed worker_id=%s", self.worker_id)
            else:
                self._next_beat_s = min(wait_s, HEARTBEAT_EVERY_S)
            return
        self._outage.recovered()
        self._next_beat_s = HEARTBEAT_EVERY_S

    def _run(self) -> None:
        while not self._stop.wait(self._next_beat_s):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.services.store.forget_worker(self.worker_id)
        except Exception as error:
            storage_failure_or_raise(error)
            logger.warning("worker not unlisted (the store is unusable); its heartbeat expires in %gs worker_id=%s",
                           HEARTBEAT_TTL_S, self.worker_id)


def worker_settings(settings: Settings) -> WorkerSettings:
    return WorkerSettings(lease_s=settings.lease_s, max_attempts=settings.max_attempts,
                          request_overrides=settings.request_overrides)


def run_worker(settings: Settings, services: Services, stop: threading.Event) -> None:
    """Load the pipeline and serve jobs until `stop` is set; the job in hand is finished first.

    A pipeline that fails to load leaves the worker announced as `failed` with the reason (so
    /readyz says why) until stopped, instead of silently disappearing.
    """
    worker_id = new_worker_id()
    info: dict[str, Any] = {"state": "loading", "weights": settings.weights, "tiny": settings.weights == "tiny",
                            "device": None, "job_id": None}
    with Heartbeat(services, worker_id, info) as heartbeat:
        try:
            from model.pipeline import Pipeline

            weights, tiny = resolve_weights(settings)
            device = _device(settings)
            heartbeat.update(weights=str(weights), device=device)
            logger.info("loading pipeline worker_id=%s weights=%s device=%s", worker_id, weights, device)
            pipeline = Pipeline.from_weights(weights, device, execution=settings.execution)
            if settings.compile:
                heartbeat.update(state="warming_up")
                pipeline.warm_up(settings.frame_size or (448, 896))
        except Exception as exc:
            logger.exception("pipeline failed to load worker_id=%s", worker_id)
            heartbeat.update(state="failed", error=f"{type(exc).__name__}: {exc}")
            stop.wait()
            return
        worker = Worker(services.store, pipeline, services.files, worker_settings(settings), worker_id,
                        on_completed=services.job_completed)
        heartbeat.worker = worker
        heartbeat.update(state="ready")
        logger.info("worker ready worker_id=%s tiny=%s overrides=%s", worker_id, tiny,
                    worker.settings.request_overrides)
        worker.serve_forever(stop)

"""The durable job queue shared by the API process and the workers: SQLite on one host, Redis across hosts."""

from __future__ import annotations

from pathlib import Path

from server.jobs.redis_store import RedisJobStore
from server.jobs.sqlite_store import DamagedJobStore, SqliteJobStore
from server.jobs.store import (
    COMPLETED,
    DURATION_BUCKETS_S,
    IN_PROGRESS,
    IN_QUEUE,
    LOG_LEVELS,
    OUTCOMES,
    WEBHOOK_DELIVERED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    WORKER_LOST,
    CancelResult,
    Histogram,
    Job,
    JobStats,
    JobStore,
    Outcome,
    QueueFull,
    Status,
    WebhookState,
    WorkerInfo,
)

__all__ = [
    "COMPLETED", "DURATION_BUCKETS_S", "IN_PROGRESS", "IN_QUEUE", "LOG_LEVELS", "OUTCOMES", "WEBHOOK_DELIVERED",
    "WEBHOOK_FAILED", "WEBHOOK_PENDING", "WORKER_LOST", "CancelResult", "DamagedJobStore", "Histogram", "Job",
    "JobStats", "JobStore", "Outcome", "QueueFull", "RedisJobStore", "SqliteJobStore", "Status", "WebhookState",
    "WorkerInfo", "open_job_store",
]


def open_job_store(redis_url: str | None, data_dir: Path) -> JobStore:
    """The Redis store when a URL is configured (several workers or hosts), else the SQLite file
    `data_dir/jobs.sqlite3` (one host, nothing to set up)."""
    if redis_url:
        return RedisJobStore(redis_url)
    return SqliteJobStore(Path(data_dir) / "jobs.sqlite3")

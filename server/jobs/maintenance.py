"""Housekeeping the API process runs in the background.

* Jobs whose worker died (lease ran out) are re-queued or failed, even when no worker is left to
  notice; failing one puts its webhook in the store's outbox, and `on_completed` sends it at once.
* Finished jobs and stored files older than the retention time are deleted (a job whose webhook is
  still pending is kept until it is delivered or given up).

Every API replica may run it: each store operation is atomic and each expired id is handed to one
caller only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from starlette.concurrency import run_in_threadpool

from server.jobs import COMPLETED, Job, JobStore
from server.jobs.failures import StoreOutage

if TYPE_CHECKING:
    from server.services import Services

logger = logging.getLogger("multitalk.maintenance")

SWEEP_EVERY_S = 5.0
CLEANUP_EVERY_SWEEPS = 60  # retention is hours; checking every five minutes is plenty


def sweep_expired_leases(store: JobStore, max_attempts: int, on_completed: Callable[[Job], None]) -> None:
    """Re-queue or fail the jobs of dead workers; `on_completed` gets those that failed (their webhook).
    Workers run it between jobs, the API on a timer, so it happens even with no worker left."""
    for job in store.requeue_expired(max_attempts):
        logger.warning("worker lost id=%s now=%s attempts=%d", job.id, job.status, job.attempts)
        if job.status == COMPLETED:
            on_completed(job)


def delete_expired(services: Services) -> None:
    retention_s = services.settings.retention_s
    jobs = services.store.expire_finished(retention_s)
    files = services.files.delete_older_than(retention_s)
    if jobs or files:
        logger.info("retention cleanup jobs=%d files=%d older_than_s=%g", len(jobs), files, retention_s)


async def run_maintenance(services: Services) -> None:
    """Forever, until cancelled; a failing round is logged and the next one tries again."""
    sweeps = 0
    outage = StoreOutage(logger, "in housekeeping")
    while True:
        try:
            await run_in_threadpool(sweep_expired_leases, services.store, services.settings.max_attempts,
                                    services.job_completed)
            if sweeps % CLEANUP_EVERY_SWEEPS == 0:
                await run_in_threadpool(delete_expired, services)
        except Exception as exc:  # housekeeping must outlive a store outage (logged once) or a bug (logged)
            if outage.noted(exc) is None:
                logger.exception("maintenance round failed")
        else:
            outage.recovered()
        sweeps += 1
        await asyncio.sleep(SWEEP_EVERY_S)

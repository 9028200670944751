"""Probes for orchestrators and monitoring: liveness, readiness, Prometheus metrics.

Readiness is read from the workers' heartbeats in the job store, so it is right whether the worker
is embedded in this process or runs on another host: ready means at least one live worker has its
model loaded. The tiny demo weights are announced here, since their videos are noise by design.

Every probe tells the truth about the job store: when it cannot be read (Redis unreachable, SQLite
locked or damaged) or the data dir is full, all three answer 503 with fal's flat error body saying
which (`store_unavailable`, or `insufficient_storage`), never 200 or a bare 500. Nothing in this
process can do its work then: no submit is accepted and no worker (embedded or on another host) can
claim or finish a job; all of them resume on their own once the store is back.
"""

from __future__ import annotations

import asyncio
import shutil

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.api.auth import is_known_key, presented_key
from server.api.errors import storage_failure_response
from server.api.metrics import render_metrics
from server.jobs.failures import FREE_SPACE_HINT, StorageFailure, storage_failure_or_raise
from server.services import Services, ServicesDep, StoreDep

router = APIRouter(tags=["health"])

TINY_NOTICE = "tiny random demo/test weights: videos have the right shape and sound but show noise"
HEALTH_TIMEOUT_S = 3.0  # a store that takes longer to answer one read is down, as far as a probe can tell
MIN_FREE_BYTES = 1024 * 1024  # below this the data dir cannot take an upload, a video or a job's record
_STORE_PROBLEMS = {503: {"description": "The job store cannot be read (`store_unavailable`: unreachable, not "
                                        "answering, or its file damaged), or the data dir is full "
                                        "(`insufficient_storage`); fal's flat error body says which."}}


def store_problem(services: Services) -> StorageFailure | None:
    """What keeps this process from working, if anything: one cheap read of the job store (the queue
    counts), then the data dir's free space."""
    try:
        services.store.counts()
    except Exception as exc:
        return storage_failure_or_raise(exc)
    free = shutil.disk_usage(services.settings.data_path).free
    if free < MIN_FREE_BYTES:
        return StorageFailure("full", f"the data dir is full ({free} bytes free); {FREE_SPACE_HINT}")
    return None


@router.get("/healthz", summary="The API process is up and its job store usable", responses=_STORE_PROBLEMS)
async def healthz(services: ServicesDep):
    """200 `{"status": "ok"}` when the process answers, the job store answers a read within HEALTH_TIMEOUT_S and
    the data dir has room; else 503 with the flat error body saying what is wrong. It does not check workers
    (`/readyz` does). A probe that restarts the process on 503 cannot mend the store; this process resumes on its
    own once the store is back."""
    try:
        failure = await asyncio.wait_for(run_in_threadpool(store_problem, services), HEALTH_TIMEOUT_S)
    except TimeoutError:
        failure = StorageFailure("unavailable", f"the job store did not answer within {HEALTH_TIMEOUT_S:g} s")
    if failure is not None:
        return storage_failure_response(failure, status_code=503)
    return {"status": "ok"}


@router.get("/readyz", summary="A worker is alive with its model loaded",
            responses={503: {"description": "No worker is ready (loading, failed or none running), or the job "
                                            "store cannot be read (fal's flat `store_unavailable` body)."}})
def readyz(request: Request, services: ServicesDep):
    """Probes send no key. With API keys set, a caller without a valid one sees the status, each worker's state
    and the queue length only: worker ids, hosts, weights paths, GPU figures and the running job's id are for key
    holders. When the job store cannot be read, 503 with the flat `store_unavailable` body (the error handlers):
    no worker can take a job then, whatever its last heartbeat said."""
    store = services.store
    keys = services.settings.api_keys
    detailed = not keys or is_known_key(presented_key(request), keys)
    workers = [{"id": w.id, **w.info} for w in store.live_workers()]
    ready = [w for w in workers if w.get("state") == "ready"]
    shown = workers if detailed else [{"state": w.get("state")} for w in workers]
    body = {"status": "ready" if ready else "not_ready", "workers": shown, "queue": store.counts()["queued"]}
    if any(w.get("tiny") for w in workers):
        body["notice"] = TINY_NOTICE
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=_STORE_PROBLEMS)
async def metrics(store: StoreDep):
    """Every value is read from the job store at scrape time; when it cannot be read, 503 with the flat
    `store_unavailable` body (the error handlers), so the scrape fails visibly instead of reporting stale or
    zero values."""
    payload, content_type = await run_in_threadpool(render_metrics, store)
    return Response(payload, media_type=content_type)

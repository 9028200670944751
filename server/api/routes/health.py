"""Probes for orchestrators and monitoring: liveness, readiness, Prometheus metrics.

Readiness is read from the workers' heartbeats in the job store, so it is right whether the worker
is embedded in this process or runs on another host: ready means at least one live worker has its
model loaded. The tiny demo weights are announced here, since their videos are noise by design.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from server.api.auth import is_known_key, presented_key
from server.api.metrics import render_metrics
from server.services import ServicesDep, StoreDep

router = APIRouter(tags=["health"])

TINY_NOTICE = "tiny random demo/test weights: videos have the right shape and sound but show noise"


@router.get("/healthz", summary="The API process is up")
def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="A worker is alive with its model loaded",
            responses={503: {"description": "No worker is ready (loading, failed or none running)."}})
def readyz(request: Request, services: ServicesDep):
    """Probes send no key. With API keys set, a caller without a valid one sees the status, each worker's state
    and the queue length only: worker ids, hosts, weights paths, GPU figures and the running job's id are for key
    holders."""
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


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(store: StoreDep):
    payload, content_type = await run_in_threadpool(render_metrics, store)
    return Response(payload, media_type=content_type)

"""The synchronous endpoints `POST /fal-ai/ai-avatar[/multi|/single-text|/multi-text]` (PEERS_AND_PROTOCOL.md §A.3).

A run is a queued job whose caller waits: it takes its turn with the queued requests, so one GPU is
never asked for two videos at once, and it answers with the same response as the job's result URL.
If the caller goes away before the end the job is cancelled: the Python client retries a dropped
connection as a new POST, and nobody would ever read the first video.

(No `from __future__ import annotations` here: each route's body type is its endpoint's input model, which
FastAPI must see as a class, not as the name of a local variable.)
"""

import asyncio
import logging

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from server.api.auth import OwnerDep, require_api_key
from server.api.schemas import INPUT_MODELS, AvatarOutput, EndpointInput
from server.api.submission import accept
from server.api.views import result_response
from server.jobs import COMPLETED
from server.services import BaseUrlDep, ServicesDep

router = APIRouter(tags=["run"], dependencies=[Depends(require_api_key)])
logger = logging.getLogger("multitalk.api")

POLL_S = 0.25


def _add_run_route(input_model: type[EndpointInput]) -> None:
    endpoint = input_model.endpoint

    @router.post(f"/{endpoint.app_id}", response_model=AvatarOutput, summary=f"{endpoint.title}: generate a video and "
                 "wait for it", responses={
                     422: {"description": "An input is invalid or unusable; `detail` names the field."},
                     429: {"description": "The queue is full; retry after `Retry-After` seconds."}})
    async def run(inp: input_model, services: ServicesDep, base_url: BaseUrlDep, request: Request, owner: OwnerDep):
        job = await accept(inp, services, base_url, owner=owner)
        store = services.store
        while job.status != COMPLETED:
            if await request.is_disconnected():
                outcome = await run_in_threadpool(store.request_cancel, job.id)
                logger.info("sync caller disconnected; cancel id=%s result=%s", job.id, outcome)
                if outcome == "OK":
                    services.job_completed(await run_in_threadpool(store.get, job.id))
                break
            await asyncio.sleep(POLL_S)
            job = await run_in_threadpool(store.get, job.id)
        return result_response(job, services, base_url)


for _model in INPUT_MODELS:
    _add_run_route(_model)

"""fal's queue API (PEERS_AND_PROTOCOL.md §A.4–A.8): submit, status, status stream, result, cancel.

Submit uses the full model id; status, result and cancel use owner/app only, as fal does (the forms
with the endpoint path are accepted too, for hand-built URLs). Requests whose Host starts with
`queue.` reach these routes without the `/queue` prefix (see middleware.py). Every ai-avatar endpoint has
its own submit route; they share the request routes, as on fal.

(No `from __future__ import annotations` here: each submit route's body type is its endpoint's input model,
which FastAPI must see as a class, not as the name of a local variable.)
"""

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.api.auth import OwnerDep, require_api_key
from server.api.errors import RequestError, validation_error_response
from server.api.public_urls import QUEUE_PREFIX, queue_urls
from server.api.schemas import (
    INPUT_MODELS,
    AvatarOutput,
    CancelResponse,
    EndpointInput,
    QueueStatusResponse,
    QueueSubmitResponse,
)
from server.api.submission import accept
from server.api.views import result_response, status_body
from server.jobs import COMPLETED, Job
from server.jobs.failures import StoreOutage
from server.jobs.webhooks import check_webhook_url
from server.services import OWNER_APP, BaseUrlDep, ServicesDep, StoreDep

logger = logging.getLogger("multitalk.api")
router = APIRouter(prefix=QUEUE_PREFIX, tags=["queue"], dependencies=[Depends(require_api_key)])

KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
STREAM_POLL_S = 0.25
CANCEL_STATUS_CODES = {"OK": 200, "CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400, "NOT_FOUND": 404}
# Query `logs`: the JS client sends 1/0, the Python client true/false.
LogsFlag = Annotated[str | None, Query(pattern="^(0|1|true|false|True|False)$",
                                       description="1 or true: include the logs.")]


def _wants_logs(logs: str | None) -> bool:
    return logs in ("1", "true", "True")


JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # the store's uuid4 ids


def _not_found(request_id: str) -> RequestError:
    return RequestError(404, f"Request {request_id} not found (unknown, or expired after its retention time)",
                        "request_not_found")


def request_id_path(request_id: str) -> str:
    """The path's request id, when it can be one of ours: anything else (an emoji, a NUL, a 10 kB string) is the 404
    of an unknown request at once — it must reach neither the store nor a response header, which takes latin-1 only."""
    if not JOB_ID.fullmatch(request_id):
        raise _not_found(ascii(request_id)[1:-1][:80])
    return request_id


RequestIdDep = Annotated[str, Depends(request_id_path)]


def existing_job(request_id: RequestIdDep, store: StoreDep, owner: OwnerDep) -> Job:
    """The job, if it exists and the caller may see it: a job submitted with a key belongs to that key, and any
    other key gets the 404 of an unknown request (not a 403, which would confirm the id exists)."""
    job = store.get(request_id)
    if job is None or (job.owner is not None and job.owner != owner):
        raise _not_found(request_id)
    return job


JobDep = Annotated[Job, Depends(existing_job)]


def _add_submit_route(input_model: type[EndpointInput]) -> None:
    endpoint = input_model.endpoint

    @router.post(f"/{endpoint.app_id}", response_model=QueueSubmitResponse, summary=f"{endpoint.title}: queue a "
                 "generation")
    async def submit(
        inp: input_model, services: ServicesDep, base_url: BaseUrlDep, response: Response, owner: OwnerDep,
        fal_webhook: Annotated[str | None, Query(description="URL that receives the result when the request "
                                                             "completes.")] = None,
        fal_max_queue_length: Annotated[int | None, Query(ge=0, description="Refuse (429) when more are "
                                                                            "queued.")] = None,
    ):
        if fal_webhook is not None and (reason := check_webhook_url(fal_webhook,
                                                                    services.settings.fetch_allowed_hosts)):
            return validation_error_response([{"loc": ("query", "fal_webhook"), "msg": reason,
                                               "type": "value_error", "input": fal_webhook}])
        job = await accept(inp, services, base_url, fal_webhook, fal_max_queue_length, owner)
        response.headers["x-fal-request-id"] = job.id
        position = await run_in_threadpool(services.store.queue_position, job.id)
        return {"status": "IN_QUEUE", "queue_position": position, **queue_urls(base_url, OWNER_APP, job.id)}


for _model in INPUT_MODELS:
    _add_submit_route(_model)


def _job_routes(prefix: str, in_schema: bool) -> None:
    """Register status/stream/result/cancel under `prefix` (owner/app, or owner/app/endpoint)."""

    @router.get(f"{prefix}/requests/{{request_id}}/status", response_model=QueueStatusResponse,
                response_model_exclude_none=False, include_in_schema=in_schema, summary="Status of a request",
                responses={202: {"description": "Queued or in progress", "model": QueueStatusResponse}})
    def status(job: JobDep, store: StoreDep, base_url: BaseUrlDep, response: Response, logs: LogsFlag = None):
        response.status_code = 200 if job.status == COMPLETED else 202
        response.headers["x-fal-request-id"] = job.id
        return status_body(job, store, base_url, 0 if _wants_logs(logs) else None)

    @router.get(f"{prefix}/requests/{{request_id}}/status/stream", include_in_schema=in_schema,
                summary="Status as server-sent events until COMPLETED", response_class=StreamingResponse)
    def status_stream(job: JobDep, store: StoreDep, base_url: BaseUrlDep, request: Request, logs: LogsFlag = None):
        events = _status_events(job.id, store, base_url, _wants_logs(logs), request)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"x-fal-request-id": job.id, "cache-control": "no-cache"})

    @router.get(f"{prefix}/requests/{{request_id}}", response_model=AvatarOutput, include_in_schema=in_schema,
                summary="Result of a completed request")
    def result(job: JobDep, services: ServicesDep, base_url: BaseUrlDep):
        return result_response(job, services, base_url)

    @router.put(f"{prefix}/requests/{{request_id}}/cancel", response_model=CancelResponse,
                include_in_schema=in_schema, summary="Cancel a queued or running request")
    def cancel(request_id: str, services: ServicesDep, response: Response, owner: OwnerDep):
        job = services.store.get(request_id) if JOB_ID.fullmatch(request_id) else None  # see request_id_path
        if job is None or (job.owner is not None and job.owner != owner):  # fal's cancel: NOT_FOUND in its body
            response.status_code = CANCEL_STATUS_CODES["NOT_FOUND"]
            return {"status": "NOT_FOUND"}
        outcome = services.store.request_cancel(request_id)
        if outcome == "OK":  # a queued job completes right here, so its webhook goes from here
            services.job_completed(services.store.get(request_id))
        response.status_code = CANCEL_STATUS_CODES[outcome]
        response.headers["x-fal-request-id"] = request_id
        return {"status": outcome}


_job_routes(f"/{OWNER_APP}", in_schema=True)
for _model in INPUT_MODELS:  # the hand-built forms with an endpoint path
    if _model.endpoint.app_id != OWNER_APP:
        _job_routes(f"/{_model.endpoint.app_id}", in_schema=False)


async def _status_events(job_id: str, store, base_url: str, with_logs: bool, request: Request) -> AsyncIterator[str]:
    """One `data:` event per change of the status or new log lines, a comment every KEEPALIVE_S, closed after
    COMPLETED. Each event's `logs` holds only the lines new since the previous event, as fal's stream does: the JS
    client appends every event's logs to what it has shown (polled status, by contrast, lists them all)."""
    last_state, logs_sent, last_sent_at = None, 0, time.monotonic()
    outage = StoreOutage(logger, f"in a status stream request_id={job_id}", max_wait_s=KEEPALIVE_S / 3)
    while not await request.is_disconnected():
        try:
            job = await run_in_threadpool(store.get, job_id)
            body = None if job is None else await run_in_threadpool(status_body, job, store, base_url,
                                                                    logs_sent if with_logs else None)
        except Exception as exc:  # a store outage: the stream stays open (keep-alives go on) until the store is back
            wait_s = outage.noted(exc)
            if wait_s is None:
                raise
            if time.monotonic() - last_sent_at >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_sent_at = time.monotonic()
            await asyncio.sleep(wait_s)
            continue
        outage.recovered()
        if job is None:  # expired while streaming
            return
        new_logs = body["logs"] or []  # None without logs=1
        state = json.dumps({**body, "logs": None})
        if state != last_state or new_logs:
            yield f"data: {json.dumps(body)}\n\n"
            last_state, logs_sent, last_sent_at = state, logs_sent + len(new_logs), time.monotonic()
        elif time.monotonic() - last_sent_at >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent_at = time.monotonic()
        if job.status == COMPLETED:
            return
        await asyncio.sleep(STREAM_POLL_S)

"""What the queue endpoints answer for a job: its status body, and its result as an HTTP response.

Kept apart from the routes because three of them share it (status, the SSE stream, and the
synchronous run, which returns the same result a queued request's `response_url` would).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fastapi.responses import JSONResponse

from server.api.errors import request_error_response
from server.api.public_urls import queue_urls, rebase_file_urls
from server.api.schemas import QueueStatusResponse
from server.jobs import COMPLETED, IN_QUEUE, Job, JobStore
from server.services import OWNER_APP, Services

CANCELLED_STATUS_CODE = 499  # fal's code for client_cancelled
STILL_RUNNING_DETAIL = "Request is still in progress"


def _log_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "timestamp": datetime.fromtimestamp(entry["timestamp"], timezone.utc)}


def _failure(job: Job) -> tuple[str, str]:
    """(error, error_type) of a job that did not end OK; a queued job cancelled never had a worker say why."""
    if job.outcome == "CANCELLED":
        return job.error or "the request was cancelled", job.error_type or "client_cancelled"
    return job.error or "the request failed", job.error_type or "internal_error"


def status_body(job: Job, store: JobStore, base_url: str, logs_since: int | None) -> dict[str, Any]:
    """fal's status object; `queue_position` and `logs` always present (the Python client needs the keys).
    `logs` holds the job's log lines from index `logs_since` on (0: all of them; a stream passes how many it has
    sent, so each poll reads only the new ones), or is null when `logs_since` is None."""
    body: dict[str, Any] = {"status": job.status, **queue_urls(base_url, OWNER_APP, job.id),
                            "queue_position": store.queue_position(job.id) if job.status == IN_QUEUE else None,
                            "logs": None if logs_since is None else [_log_entry(e) for e in store.logs(job.id, logs_since)]}
    if job.status == COMPLETED:
        ran = job.finished_at - job.started_at if job.started_at and job.finished_at else 0.0
        body["metrics"] = {"inference_time": round(ran, 3)}
        if job.outcome != "OK":
            body["error"], body["error_type"] = _failure(job)
    return QueueStatusResponse(**body).model_dump(mode="json")


def result_response(job: Job, services: Services, base_url: str) -> JSONResponse:
    """The finished job's response as the model gave it: the output on 200, its error body otherwise."""
    headers = {"x-fal-request-id": job.id}
    if job.status != COMPLETED:
        return request_error_response(400, STILL_RUNNING_DETAIL, "request_in_progress", headers)
    if job.result is not None:
        body = rebase_file_urls(job.result["body"], services.files.public_base_url, base_url)  # no-op with a public URL
        status_code = job.result["status_code"]
        if status_code >= 400 and isinstance(body, dict) and "error_type" in body:
            headers["x-fal-error-type"] = body["error_type"]
        return JSONResponse(body, status_code=status_code, headers=headers)
    status_code = CANCELLED_STATUS_CODE if job.outcome == "CANCELLED" else 500
    return request_error_response(status_code, *_failure(job), headers)

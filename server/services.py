"""The long-lived objects the routes share, and the FastAPI dependencies that hand them out.

One `Services` is built per process from the settings (job store, file store, fetch limits, webhook
sender: every process that has one delivers the store's pending webhooks) and kept on `app.state`;
routes receive it, or one of its parts, through `Depends`, which keeps route functions thin and lets
tests build an app around their own store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from model.contract.fields import ENDPOINTS
from server.api.public_urls import request_base_url
from server.files.fetch import FetchSettings
from server.files.s3_store import S3FileStore
from server.files.store import FileStore, LocalFileStore
from server.jobs import Job, JobStore, open_job_store
from server.jobs.webhooks import WebhookSender
from server.settings import Settings

# What status, result and cancel are called with: fal drops the endpoint path, leaving the owner/app all share.
OWNER_APP = "fal-ai/ai-avatar"
assert all(endpoint.app_id.startswith(OWNER_APP) for endpoint in ENDPOINTS)


@dataclass
class Services:
    settings: Settings
    store: JobStore
    files: FileStore
    fetch: FetchSettings
    webhooks: WebhookSender

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        data = settings.data_path
        data.mkdir(parents=True, exist_ok=True)  # even when jobs and files live elsewhere: /healthz watches it
        fetch = FetchSettings(allowed_hosts=settings.fetch_allowed_hosts)
        store = open_job_store(settings.redis_url, data)
        return cls(
            settings=settings,
            store=store,
            files=open_file_store(settings),
            fetch=fetch,
            webhooks=WebhookSender(store, settings.webhook_secret, attempts=settings.webhook_attempts,
                                   fetch_settings=fetch),
        )

    def job_completed(self, job: Job) -> None:
        """Whatever completes a job (a worker, a cancel, the lease sweep) calls this once. Its webhook
        is already pending in the store (the completing write put it there); this sends it now rather
        than at the sender's next poll."""
        if job.webhook_url is not None:
            self.webhooks.wake()

    def close(self) -> None:
        self.webhooks.close(timeout_s=5)
        self.store.close()


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_store(services: Annotated[Services, Depends(get_services)]) -> JobStore:
    return services.store


def get_base_url(request: Request, services: Annotated[Services, Depends(get_services)]) -> str:
    return request_base_url(request, services.settings.public_url)


ServicesDep = Annotated[Services, Depends(get_services)]
StoreDep = Annotated[JobStore, Depends(get_store)]
BaseUrlDep = Annotated[str, Depends(get_base_url)]


def open_file_store(settings: Settings) -> FileStore:
    """The bucket's store when `storage_url` (s3://bucket/prefix) is set, else the `files` folder of the data dir."""
    if settings.storage_url:
        bucket = S3FileStore(settings.storage_url, settings.base_url, settings.max_upload_bytes,
                             endpoint_url=settings.storage_endpoint_url, presigned_urls=settings.storage_presigned_urls)
        bucket.check_bucket()
        return bucket
    return LocalFileStore(settings.data_path / "files", settings.base_url, settings.max_upload_bytes)

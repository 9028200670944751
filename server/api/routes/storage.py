"""Uploads the fal clients make before a request, and downloads of stored files (§A.10, §B.1–B.2).

* JS client and fal-client's `fal` repository: `POST /storage/upload/initiate` → `{upload_url,
  file_url}`, then `PUT upload_url` with the bytes.
* fal-client's default `fal_v3` repository: `POST /storage/auth/token` → a short-lived token, then
  `POST /files/upload` with the raw body (`Content-Type`, `X-Fal-File-Name`) → `{access_url}`.
* `GET /files/{id}`: inputs and results. File ids are unguessable, so a file URL is its own
  permission (players and browsers fetch it without a key), like fal's CDN URLs.

With API keys configured, initiate and the token need a key, and `/files/upload` needs a token we
issued (an HMAC of its expiry under the keys, so it works on any API replica with the same keys);
the one-time `upload_url` token is itself the permission for the PUT.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from server.api.auth import presented_key, require_api_key
from server.api.errors import RequestError
from server.api.file_responses import stored_file_response
from server.api.public_urls import rebase_url
from server.files.store import FILES_PATH, UPLOADS_PATH, UnknownFile, UploadTooLarge
from server.services import BaseUrlDep, ServicesDep

router = APIRouter(tags=["files"])

TOKEN_LIFETIME_S = 3600


class InitiateUpload(BaseModel):
    file_name: str | None = None
    content_type: str | None = None


class InitiatedUpload(BaseModel):
    upload_url: str
    file_url: str


class UploadToken(BaseModel):
    token: str
    token_type: str = "Bearer"
    base_url: str
    expires_at: datetime


class UploadedFile(BaseModel):
    access_url: str


def _token_signature(expires: int, keys: frozenset[str]) -> str:
    secret = "\n".join(sorted(keys)).encode()
    return hmac.new(secret, f"upload:{expires}".encode(), hashlib.sha256).hexdigest()


def _require_upload_token(request: Request, services: ServicesDep) -> None:
    keys = services.settings.api_keys
    if not keys:
        return
    token = presented_key(request) or ""
    expires, _, signature = token.partition(".")
    if expires.isdigit() and int(expires) > time.time() and hmac.compare_digest(
        signature, _token_signature(int(expires), keys)
    ):
        return
    raise RequestError(401, "Unauthorized: upload with a token from /storage/auth/token", "unauthorized")


def _too_large(exc: UploadTooLarge) -> RequestError:
    return RequestError(413, str(exc), "payload_too_large")


@router.post("/storage/upload/initiate", response_model=InitiatedUpload, dependencies=[Depends(require_api_key)],
             summary="Reserve an upload; PUT the bytes to `upload_url`")
def initiate_upload(body: InitiateUpload, services: ServicesDep, base_url: BaseUrlDep,
                    storage_type: Annotated[str | None, Query(description="Accepted and ignored.")] = None):
    pending = services.files.initiate_upload(body.content_type, body.file_name)
    return {"upload_url": rebase_url(pending.upload_url, services.files.public_base_url, base_url),
            "file_url": rebase_url(pending.file_url, services.files.public_base_url, base_url)}


@router.put(f"{UPLOADS_PATH}{{token}}", summary="The bytes of an initiated upload")
async def complete_upload(token: str, request: Request, services: ServicesDep):
    try:
        await services.files.complete_upload(token, request.stream())
    except UnknownFile:
        raise RequestError(404, "unknown or already used upload URL; initiate a new upload", "upload_not_found") from None
    except UploadTooLarge as exc:
        raise _too_large(exc) from None
    return {}


@router.post("/storage/auth/token", response_model=UploadToken, dependencies=[Depends(require_api_key)],
             summary="A token for `POST /files/upload`")
def upload_token(services: ServicesDep, base_url: BaseUrlDep,
                 storage_type: Annotated[str | None, Query(description="Accepted and ignored.")] = None):
    expires = int(time.time()) + TOKEN_LIFETIME_S
    keys = services.settings.api_keys
    token = f"{expires}.{_token_signature(expires, keys)}" if keys else f"{expires}.open"
    return {"token": token, "base_url": base_url, "expires_at": datetime.fromtimestamp(expires, timezone.utc)}


@router.post(f"{FILES_PATH}upload", response_model=UploadedFile, dependencies=[Depends(_require_upload_token)],
             summary="Upload a file in the request body; answers its URL")
async def upload(request: Request, services: ServicesDep, base_url: BaseUrlDep,
                 content_type: Annotated[str | None, Header()] = None,
                 x_fal_file_name: Annotated[str | None, Header()] = None):
    try:
        stored = await services.files.save_upload(request.stream(), content_type, x_fal_file_name)
    except UploadTooLarge as exc:
        raise _too_large(exc) from None
    return {"access_url": rebase_url(stored.url, services.files.public_base_url, base_url)}


@router.get(f"{FILES_PATH}{{file_id}}", summary="Download a stored file (inputs and results)",
            response_class=FileResponse)
async def download(file_id: str, services: ServicesDep, range: Annotated[str | None, Header()] = None):
    try:
        stored = await run_in_threadpool(services.files.get, file_id)
    except UnknownFile:
        raise RequestError(404, "file not found (unknown, or deleted after its retention time)", "file_not_found") from None
    return stored_file_response(services.files, stored, range)

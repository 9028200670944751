"""Accepting a request: check its inputs, keep them, and queue the job.

The inputs are fetched *before* the job is queued, by the API: an unreachable, private, oversized
or non-media URL, or a broken data URI, is answered at once with a 422 naming the field, for queued
requests as for synchronous ones, instead of failing minutes later in a worker. Images are also
decoded in full, by the worker's own `load_image` (its size limits, read from the header, come first),
because a file can start like an image and still not decode: the one definition of a usable image,
applied where a refusal is a 422 rather than a failed job. Audio is checked the same way, by the
worker's own bounded decode (`check_audio_decodes`: header limits, then ffmpeg's whole output counted
and dropped, never held): what does not decode, or is too short, too long or too large to decode, is a
422 at submit. Only what the samples themselves show (silence, NaN) is left to the worker.

Once fetched, the inputs are kept in the file store and the job refers to them there, so a job never
depends on a URL that may change or expire, retries use the same bytes, and job records stay small
(no inline data URIs). A null seed is drawn here for the same reason: every attempt of a job uses
the same seed.

The job's input is `{"options": ..., "files": ...}`, plus `"speech"` for the text endpoints: the
request's options as the contract names them (`GenerationRequest` takes them as they are), the ids
of the stored inputs by field, and the texts to speak with their voices (`SpokenText`'s fields). A
worker builds its request from these alone and reads the files from the store; it never fetches a URL.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from model.contract.fields import FIELDS, seed_or_random
from model.media.audio_decode import check_audio_decodes
from model.media.image_input import load_image
from server.api.errors import RequestError
from server.api.public_urls import rebase_url
from server.api.schemas import EndpointInput, media_inputs, spoken_texts, to_generation_options
from server.files.fetch import FetchSettings, fetch_input
from server.files.scratch import process_scratch
from server.files.store import FileStore
from server.jobs import Job, QueueFull
from server.services import Services

logger = logging.getLogger("multitalk.api")
RETRY_AFTER_S = 30  # what a 429 suggests; a queue slot frees up when a job finishes


class _FilesSeenFrom:
    """The file store as seen through `base_url`: our own upload URLs, whichever host name the
    client used to reach us, resolve to stored files instead of going out to the network."""

    def __init__(self, files: FileStore, base_url: str):
        self.files, self.base_url = files, base_url
        self.open_read = files.open_read

    def resolve_url(self, url: str) -> str | None:
        return self.files.resolve_url(rebase_url(url, self.base_url, self.files.public_base_url))


# The worker's own definition of a usable input, by kind. Images are decoded in full; audio is decoded in full
# too, by the worker's bounded decode, but counted instead of kept (the API holds no samples, loads no librosa).
_CHECK_DECODES: dict[str, Callable[[Path, str], object]] = {"image": load_image, "audio": check_audio_decodes}


async def stage_inputs(inp: EndpointInput, files: FileStore, fetch: FetchSettings, base_url: str) -> dict:
    """The job's stored input: the contract's options with the seed fixed, the ids of the kept media, the texts."""
    media = media_inputs(inp)
    workdir = await run_in_threadpool(process_scratch().make_dir, "submit-")
    try:
        local = _FilesSeenFrom(files, base_url)
        fetched = await asyncio.gather(*(
            fetch_input(url, field, workdir, fetch, local, expect=FIELDS[field].kind)  # type: ignore[arg-type]
            for field, url in media.items()
        ))
        for field, file in zip(media, fetched):  # all checked before any is kept: a refusal leaves nothing behind
            await run_in_threadpool(_CHECK_DECODES[FIELDS[field].kind], file.path, field)
        kept_ids: dict[str, str] = {}
        try:
            for field, file in zip(media, fetched):
                kept = await run_in_threadpool(files.add_file, file.path, file.content_type,
                                               f"{field.removesuffix('_url')}{file.path.suffix}")
                kept_ids[field] = kept.id
        except BaseException:  # e.g. the disk filled after the first input: keep none of them
            await _delete_quietly(files, kept_ids.values())
            raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    speech = spoken_texts(inp)
    return {"options": to_generation_options(inp, seed_or_random(inp.seed)), "files": kept_ids,
            **({"speech": speech} if speech else {})}


async def accept(inp: EndpointInput, services: Services, base_url: str, webhook_url: str | None = None,
                 max_queue: int | None = None, owner: str | None = None) -> Job:
    """Queue the request; 422 for unusable inputs (InputError), 429 when the queue is full.

    A full queue is refused before the inputs are fetched (no wasted download) and again,
    atomically, by the store's submit (concurrent submits may have filled it meanwhile). When the
    submit fails, for that or any other reason (the job store unreachable or full: the error
    handlers' 503 or 507), the inputs kept for this request are deleted: nothing half-accepted stays.
    """
    limit = services.settings.max_queue
    if max_queue is not None:
        limit = max_queue if limit is None else min(limit, max_queue)
    if limit is not None and (await run_in_threadpool(services.store.counts))["queued"] >= limit:
        raise _queue_full(f"the queue already holds {limit} jobs (its limit); try again later")
    stored_input = await stage_inputs(inp, services.files, services.fetch, base_url)
    try:
        return await run_in_threadpool(services.store.submit, inp.endpoint.app_id, stored_input, webhook_url, limit,
                                       owner)
    except BaseException as exc:
        await _delete_quietly(services.files, stored_input["files"].values())
        if isinstance(exc, QueueFull):
            raise _queue_full(str(exc)) from None
        raise


async def _delete_quietly(files: FileStore, file_ids) -> None:
    """Remove inputs kept for a request that was not accepted, without hiding why it was not: a file the store
    cannot delete now (an outage) is left to retention."""
    for file_id in list(file_ids):
        try:
            await run_in_threadpool(files.delete, file_id)
        except Exception:
            logger.warning("could not delete an input of a refused request file_id=%s; retention will", file_id,
                           exc_info=True)


def _queue_full(detail: str) -> RequestError:
    return RequestError(429, detail, "queue_full", {"Retry-After": str(RETRY_AFTER_S)})

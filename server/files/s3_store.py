"""The file store in an S3 bucket (AWS S3, MinIO, Cloudflare R2, GCS interoperability), through boto3.

With it, hosts that share only the job store (Redis) and the bucket serve each other's files: the API
keeps uploads and fetched inputs there, a worker on another host copies a job's inputs from there into
its scratch folder and puts the video there, and any API host streams them back at `/files/<id>` (range
requests kept), or hands out presigned bucket URLs instead when `presigned_urls` is set.

Layout under `s3://<bucket>/<prefix>`: `data/<id>` (the bytes, with the content type as the object's
`Content-Type` and the file name in its metadata, written with the bytes in one request), and
`pending/<upload token>.json` (an initiated upload waiting for its PUT). Retention lists the objects by
their last-modified time. Credentials, region and the like come from boto3's usual sources (the
`AWS_*` variables, `~/.aws`, instance roles); an explicit endpoint (MinIO, R2, a local test server) is
addressed path-style, which every S3-compatible server understands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, unquote, urlsplit

from server.files.store import (
    DEFAULT_MAX_UPLOAD_BYTES,
    READ_CHUNK_BYTES,
    FileStore,
    StoredFile,
    UnknownFile,
    UploadTooLarge,
    clean_metadata,
    file_id_is_valid,
)

logger = logging.getLogger("multitalk.files")

FILE_NAME_KEY = "file-name"  # object metadata (x-amz-meta-file-name), percent-encoded: metadata is ASCII
MAX_QUOTED_NAME = 1800  # bytes of the percent-encoded file name, within S3's 2 KB of user metadata
PRESIGNED_URL_S = 7 * 24 * 3600  # the longest SigV4 allows


def parse_storage_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket[/prefix]`; ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"storage_url must look like s3://bucket/prefix, got {url!r}")
    return parts.netloc, parts.path.strip("/")


class UnusableBucket(ValueError):
    """The bucket does not exist or these credentials may not use it: a setting to mend, not an outage to wait out."""


class S3FileStore(FileStore):
    """The files under `s3://bucket/prefix`; `client` is a boto3 S3 client (thread-safe, shared)."""

    def __init__(self, storage_url: str, public_base_url: str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 *, endpoint_url: str | None = None, presigned_urls: bool = False, client=None):
        super().__init__(public_base_url, max_upload_bytes)
        self.bucket, prefix = parse_storage_url(storage_url)
        self.prefix = f"{prefix}/" if prefix else ""
        self.presigned_urls = presigned_urls
        self.client = client or _client(endpoint_url)

    def check_bucket(self) -> None:
        """At start: `UnusableBucket` when the bucket is missing or refused, saying what to set; an unreachable
        endpoint is only logged (like a job store outage, it may come back; requests answer 503 meanwhile)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise UnusableBucket(f"the bucket {self.bucket!r} of MULTITALK_STORAGE_URL does not exist; create it "
                                     "or fix the setting") from None
            if status in (401, 403):
                raise UnusableBucket(f"access to the bucket {self.bucket!r} is denied: check AWS_ACCESS_KEY_ID / "
                                     "AWS_SECRET_ACCESS_KEY (or the instance role) and the bucket's policy") from None
            if status in (301, 400):
                region = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
                raise UnusableBucket(f"the bucket {self.bucket!r} is in another region{f' ({region})' if region else ''}"
                                     ": set AWS_DEFAULT_REGION to it") from None
            logger.warning("bucket check failed bucket=%s error=%s; starting anyway", self.bucket, exc)
        except BotoCoreError as exc:
            logger.warning("bucket unreachable at start bucket=%s error=%s; starting anyway", self.bucket, exc)

    # -- adding files ---------------------------------------------------------------------------

    async def _save_stream(self, file_id: str, stream: AsyncIterable[bytes], content_type: str | None,
                           file_name: str | None) -> StoredFile:
        """Spooled to a temporary file (memory up to 8 MiB), then uploaded: an S3 PUT needs its length first."""
        with tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024) as spool:
            size = 0
            async for chunk in stream:
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise UploadTooLarge(f"the upload is larger than {self.max_upload_bytes // (1024 * 1024)} MB")
                spool.write(chunk)
            spool.seek(0)
            await asyncio.to_thread(self._put, file_id, spool, content_type, file_name)
        return await asyncio.to_thread(self.get, file_id)

    def add_file(self, source: Path, content_type: str | None, file_name: str | None = None) -> StoredFile:
        file_name = file_name or Path(source).name
        file_id = self.new_id(file_name, content_type)
        with Path(source).open("rb") as body:
            self._put(file_id, body, content_type, file_name)
        Path(source).unlink(missing_ok=True)  # moved, as the local store does
        return self.get(file_id)

    def _put(self, file_id: str, body: BinaryIO, content_type: str | None, file_name: str | None) -> None:
        content_type, file_name = clean_metadata(content_type, file_name, file_id)
        quoted = quote(file_name)
        while len(quoted) > MAX_QUOTED_NAME:  # S3 keeps at most 2 KB of user metadata
            file_name = file_name[:-1]
            quoted = quote(file_name)
        self.client.upload_fileobj(body, self.bucket, self._data_key(file_id), ExtraArgs={
            "ContentType": content_type, "Metadata": {FILE_NAME_KEY: quoted}})

    def _put_pending(self, token: str, pending: dict) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._pending_key(token), Body=json.dumps(pending).encode(),
                               ContentType="application/json")

    def _claim_pending(self, token: str) -> dict:
        key = self._pending_key(token)
        try:
            pending = json.loads(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except self.client.exceptions.NoSuchKey:
            raise UnknownFile(token) from None
        self.client.delete_object(Bucket=self.bucket, Key=key)
        return pending

    # -- reading files --------------------------------------------------------------------------

    def get(self, file_id: str) -> StoredFile:
        head = self._head(file_id)
        file_name = unquote(head.get("Metadata", {}).get(FILE_NAME_KEY, "")) or file_id
        return StoredFile(file_id, self.url_for(file_id), head["ContentType"], file_name, head["ContentLength"])

    def local_path(self, file_id: str) -> Path | None:
        return None

    def open_read(self, file_id: str) -> BinaryIO:
        if not file_id_is_valid(file_id):
            raise UnknownFile(file_id)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._data_key(file_id))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise UnknownFile(file_id) from None

    def read_range(self, file_id: str, start: int, end: int) -> Iterator[bytes]:
        if not file_id_is_valid(file_id):
            raise UnknownFile(file_id)
        body = self.client.get_object(Bucket=self.bucket, Key=self._data_key(file_id), Range=f"bytes={start}-{end}")
        stream = body["Body"]  # botocore's StreamingBody (its context manager hands out the raw stream instead)
        try:
            yield from stream.iter_chunks(READ_CHUNK_BYTES)
        finally:
            stream.close()

    def result_url(self, file_id: str) -> str:
        """With `presigned_urls`, a bucket URL that serves the file without credentials for `PRESIGNED_URL_S` (7 days,
        SigV4's most; set the retention shorter), so downloads never pass through this server. Signed with temporary
        credentials (an instance role), it lasts only as long as they do; it names the endpoint this server uses,
        which clients must be able to reach."""
        if not self.presigned_urls:
            return super().result_url(file_id)
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._data_key(file_id)}, ExpiresIn=PRESIGNED_URL_S)

    # -- removing files -------------------------------------------------------------------------

    def delete(self, file_id: str) -> bool:
        if not file_id_is_valid(file_id):
            return False
        try:
            self._head(file_id)
        except UnknownFile:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=self._data_key(file_id))
        return True

    def delete_older_than(self, age_s: float, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - age_s
        deleted = 0
        for folder in ("data/", "pending/"):
            old = [item["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(
                       Bucket=self.bucket, Prefix=self.prefix + folder)
                   for item in page.get("Contents", []) if item["LastModified"].timestamp() < cutoff]
            for start in range(0, len(old), 1000):  # DeleteObjects takes at most 1000 keys
                batch = old[start:start + 1000]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch],
                                                                       "Quiet": True})
            deleted += len(old) if folder == "data/" else 0
        return deleted

    # -- internals ------------------------------------------------------------------------------

    def _head(self, file_id: str) -> dict:
        if not file_id_is_valid(file_id):
            raise UnknownFile(file_id)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._data_key(file_id))
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise UnknownFile(file_id) from None
            raise

    def _data_key(self, file_id: str) -> str:
        return f"{self.prefix}data/{file_id}"

    def _pending_key(self, token: str) -> str:
        return f"{self.prefix}pending/{token}.json"


def _client(endpoint_url: str | None):
    import boto3
    from botocore.config import Config

    # Short connect/read limits: a request waits on the bucket in a worker thread, and an outage should be a quick 503
    config = Config(s3={"addressing_style": "path"} if endpoint_url else {}, retries={"mode": "standard"},
                    connect_timeout=5, read_timeout=30)
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=config)

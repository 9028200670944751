"""Both file stores keep the same promises: the local folder, and an S3 bucket (on a real S3-compatible server,
moto's, started by the tests; skipped without it unless MULTITALK_REQUIRE_S3=1)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.requests import ClientDisconnect

from server.app import create_app
from server.files.s3_store import S3FileStore
from server.files.store import LocalFileStore, UnknownFile, UploadTooLarge
from server.settings import Settings

PUBLIC = "http://10.1.2.3:8000/mt"
MiB = 1024 * 1024
DATA = bytes(range(256)) * 40  # 10240 bytes, every byte value


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalFileStore(tmp_path / "files", PUBLIC, max_upload_bytes=MiB)
    endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    return S3FileStore(f"s3://{bucket}/some/prefix", PUBLIC, MiB, endpoint_url=endpoint)


def _bytes_of(store, file_id: str) -> bytes:
    with store.open_read(file_id) as source:
        return source.read()


def test_uploads_keep_bytes_type_and_name(store, tmp_path):
    stored = asyncio.run(store.save_upload(_chunks(DATA[:100], DATA[100:]), "audio/wav", "Mé Voice.WAV"))
    assert stored.url == f"{PUBLIC}/files/{stored.id}" and stored.id.endswith(".wav")
    again = store.get(stored.id)
    assert (again.content_type, again.file_name, again.size) == ("audio/wav", "Mé Voice.WAV", len(DATA))
    assert _bytes_of(store, stored.id) == DATA and store.resolve_url(stored.url) == stored.id
    assert store.local_copy(stored.id, tmp_path).read_bytes() == DATA
    assert b"".join(store.read_range(stored.id, 10, 19)) == DATA[10:20]


def test_initiated_upload_works_once(store):
    pending = store.initiate_upload("image/png", "face.png")
    token = pending.upload_url.rsplit("/", 1)[1]
    with pytest.raises(UnknownFile):
        store.resolve_url(pending.file_url)  # nothing there until the PUT
    stored = asyncio.run(store.complete_upload(token, _chunks(b"png bytes")))
    assert stored.url == pending.file_url and store.get(stored.id).file_name == "face.png"
    with pytest.raises(UnknownFile):
        asyncio.run(store.complete_upload(token, _chunks(b"overwrite")))
    assert _bytes_of(store, stored.id) == b"png bytes"


async def _broken_off(part: bytes):
    """A PUT body whose client goes away after the first chunk."""
    yield part
    raise ClientDisconnect()


def test_an_initiated_upload_that_breaks_off_can_be_sent_again(store):
    pending = store.initiate_upload("audio/wav", "voice.wav")
    token = pending.upload_url.rsplit("/", 1)[1]
    with pytest.raises(ClientDisconnect):
        asyncio.run(store.complete_upload(token, _broken_off(DATA[:100])))
    with pytest.raises(UnknownFile):
        store.resolve_url(pending.file_url)  # nothing half-written is served
    stored = asyncio.run(store.complete_upload(token, _chunks(DATA)))
    assert stored.url == pending.file_url and _bytes_of(store, stored.id) == DATA


def test_an_upload_past_the_limit_keeps_nothing(store):
    with pytest.raises(UploadTooLarge):
        asyncio.run(store.save_upload(_chunks(bytes(MiB), b"x"), "image/png", "big.png"))
    assert store.delete_older_than(0, now=time.time() + 10) == 0


def test_added_files_move_in_and_delete(store, tmp_path):
    video = tmp_path / "result.mp4"
    video.write_bytes(DATA)
    stored = store.add_file(video, "video/mp4")
    assert not video.exists() and stored.file_name == "result.mp4" and stored.size == len(DATA)
    assert store.delete(stored.id) and not store.delete(stored.id)
    with pytest.raises(UnknownFile):
        store.get(stored.id)
    with pytest.raises(UnknownFile):
        store.open_read(stored.id)


def test_retention_removes_old_files_and_reservations(store, tmp_path):
    kept = asyncio.run(store.save_upload(_chunks(b"a"), "text/plain", "a.txt"))
    store.initiate_upload("image/png", "never.png")
    assert store.delete_older_than(3600) == 0 and store.get(kept.id)
    assert store.delete_older_than(0, now=time.time() + 10) == 1
    with pytest.raises(UnknownFile):
        store.get(kept.id)


@pytest.mark.parametrize("bad", ["../secret", "", "x" * 32 + "/../../x", "a.b.c", "/etc/passwd"])
def test_malformed_ids_never_reach_the_backend(store, bad):
    with pytest.raises(UnknownFile):
        store.get(bad)
    with pytest.raises(UnknownFile):
        store.open_read(bad)
    assert store.delete(bad) is False


def test_presigned_result_urls_serve_the_file_from_the_bucket(s3_endpoint, s3_bucket, tmp_path):
    store = S3FileStore(f"s3://{s3_bucket}", PUBLIC, endpoint_url=s3_endpoint, presigned_urls=True)
    video = tmp_path / "v.mp4"
    video.write_bytes(DATA)
    stored = store.add_file(video, "video/mp4")
    url = store.result_url(stored.id)
    assert url.startswith(f"{s3_endpoint}/{s3_bucket}/data/{stored.id}?") and "Signature" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == DATA
    assert S3FileStore(f"s3://{s3_bucket}", PUBLIC, endpoint_url=s3_endpoint).result_url(stored.id) == stored.url


def test_files_route_streams_from_the_bucket_with_ranges(s3_endpoint, s3_bucket, tmp_path):
    settings = Settings(data_dir=tmp_path, workers=0, storage_url=f"s3://{s3_bucket}/mt",
                        storage_endpoint_url=s3_endpoint)
    with TestClient(create_app(settings)) as client:
        stored = asyncio.run(client.app.state.services.files.save_upload(_chunks(DATA), "video/mp4", "clip.mp4"))
        path = f"/files/{stored.id}"
        whole = client.get(path)
        assert (whole.status_code, whole.content, whole.headers["content-type"]) == (200, DATA, "video/mp4")
        assert whole.headers["accept-ranges"] == "bytes" and 'filename="clip.mp4"' in whole.headers["content-disposition"]
        part = client.get(path, headers={"Range": "bytes=100-199"})
        assert (part.status_code, part.content) == (206, DATA[100:200])
        assert part.headers["content-range"] == f"bytes 100-199/{len(DATA)}"
        tail = client.get(path, headers={"Range": "bytes=-10"})
        assert (tail.status_code, tail.content) == (206, DATA[-10:])
        assert client.get(path, headers={"Range": f"bytes={len(DATA)}-"}).status_code == 416
        for ignored in ("bytes=9-3", "items=0-1", "bytes=0-" + "9" * 5000):  # not a range we serve: the whole file
            assert client.get(path, headers={"Range": ignored}).content == DATA
        assert client.get("/files/" + "A" * 32).status_code == 404
    assert not (tmp_path / "files").exists()  # nothing on the local disk


def test_an_unreachable_bucket_is_a_503_not_a_500(tmp_path, s3_endpoint):
    from local_servers import free_port

    settings = Settings(data_dir=tmp_path, workers=0, storage_url="s3://gone",
                        storage_endpoint_url=f"http://127.0.0.1:{free_port()}")  # nobody listens there
    with TestClient(create_app(settings)) as client:
        response = client.post("/storage/upload/initiate", json={"file_name": "a.png", "content_type": "image/png"})
        assert response.status_code == 503 and response.json()["error_type"] == "store_unavailable"
        assert "S3 bucket" in response.json()["detail"]
        assert client.get("/files/" + "A" * 32).status_code == 503


def test_a_missing_bucket_stops_the_start_with_what_to_fix(tmp_path, s3_endpoint):
    from server.files.s3_store import UnusableBucket
    from server.services import Services

    settings = Settings(data_dir=tmp_path, storage_url="s3://no-such-bucket/x", storage_endpoint_url=s3_endpoint)
    with pytest.raises(UnusableBucket, match="'no-such-bucket' of MULTITALK_STORAGE_URL does not exist"):
        Services.from_settings(settings)

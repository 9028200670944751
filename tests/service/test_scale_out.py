"""Hosts that share only Redis and a bucket (issue 17): an API and two workers, each with its own empty data dir.

Real processes: redis-server, an S3-compatible server (moto's) and `multitalk serve --workers 0` plus two
`multitalk worker`s whose data dirs are separate, so nothing reaches them through a shared disk. The unmodified
fal client uploads its inputs (they land in the bucket) and runs jobs; each worker copies a job's inputs from the
bucket into its scratch folder and puts the video there. Afterwards no data dir holds an input or a video, every
result URL serves the video's bytes from the bucket, and the retention housekeeping empties the bucket.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import fal_client
import httpx
import pytest

from server.jobs.maintenance import delete_expired
from server.services import Services
from server.settings import Settings

from media_probe import probe
from server_harness import Cluster, point_fal_client_at

pytestmark = [pytest.mark.service, pytest.mark.slow]

JOBS = 4
MEDIA_SUFFIXES = {".png", ".jpg", ".wav", ".mp3", ".mp4", ".m4a"}


@pytest.fixture
def hosts(tmp_path, tiny_weights, redis_url, s3_endpoint, s3_bucket):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    storage = {"MULTITALK_STORAGE_URL": f"s3://{s3_bucket}/multitalk", "MULTITALK_STORAGE_ENDPOINT_URL": s3_endpoint}
    cluster = Cluster(tmp_path / "api-host", tiny_weights["multitalk"], redis_url, env=storage)
    api = cluster.start_api(workers=0)
    worker_dirs = [tmp_path / "worker-host-1", tmp_path / "worker-host-2"]
    for data_dir in worker_dirs:
        cluster.start_worker(MULTITALK_DATA_DIR=str(data_dir))
    cluster.wait_ready(workers=2, process=api)
    yield cluster, [cluster.data_dir, *worker_dirs]
    cluster.stop_all()


def _media_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in MEDIA_SUFFIXES]


def test_two_workers_sharing_only_redis_and_a_bucket_run_jobs_end_to_end(hosts, monkeypatch, example_inputs,
                                                                        s3_endpoint, s3_bucket, redis_url, tmp_path):
    cluster, data_dirs = hosts
    point_fal_client_at(cluster, monkeypatch)
    client = fal_client.SyncClient(key="any-key")
    image, audio = (client.upload_file(example_inputs[name]) for name in ("image", "audio1"))
    assert image.startswith(f"{cluster.url}/files/")  # the upload went to the server, which kept it in the bucket
    handles = [client.submit("fal-ai/ai-avatar", arguments={"image_url": image, "audio_url": audio,
                                                          "prompt": "a person talks", "num_frames": 41, "seed": n})
               for n in range(JOBS)]
    results = [handle.get() for handle in handles]

    bucket = boto3.client("s3", endpoint_url=s3_endpoint)
    for n, result in enumerate(results):
        assert result["seed"] == n
        served = httpx.get(result["video"]["url"], timeout=30)
        file_id = result["video"]["url"].rsplit("/", 1)[1]
        kept = bucket.get_object(Bucket=s3_bucket, Key=f"multitalk/data/{file_id}")["Body"].read()
        assert served.status_code == 200 and served.content == kept and len(kept) == result["video"]["file_size"]
        (tmp_path / f"{n}.mp4").write_bytes(served.content)
        assert probe(tmp_path / f"{n}.mp4")["frames"] == 41
    workers = {next(line["message"] for line in handle.status(with_logs=True).logs
                    if line["message"].startswith("started on worker")) for handle in handles}
    assert len(workers) == 2, workers  # both hosts ran jobs
    for data_dir in data_dirs:
        assert _media_files(data_dir) == [], f"{data_dir} holds inputs or videos"

    settings = Settings(data_dir=tmp_path / "housekeeping", redis_url=redis_url, retention_s=1e-3,
                        storage_url=f"s3://{s3_bucket}/multitalk", storage_endpoint_url=s3_endpoint)
    services = Services.from_settings(settings)
    try:
        delete_expired(services)  # what the API's housekeeping does once the retention time has passed
    finally:
        services.close()
    assert bucket.list_objects_v2(Bucket=s3_bucket, Prefix="multitalk/").get("KeyCount", 0) == 0
    assert httpx.get(results[0]["video"]["url"], timeout=30).status_code == 404

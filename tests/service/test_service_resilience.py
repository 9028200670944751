"""No job is lost or run twice: several workers, killed workers, a restarted API, a flood of submits.

Real processes throughout (`multitalk serve` and `multitalk worker`), inspected through the HTTP API
and, for attempts and worker ids, through the job store itself.
"""

from __future__ import annotations

import asyncio
import errno
import http.server
import json
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.jobs import WORKER_LOST, open_job_store

from server_harness import Cluster, RestartableRedis

pytestmark = [pytest.mark.service, pytest.mark.slow]

QUEUE_SUBMIT = "/queue/fal-ai/ai-avatar/multi"


def _submit(cluster: Cluster, body: dict, **changes) -> str:
    response = httpx.post(cluster.url + QUEUE_SUBMIT, json={**body, **changes}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def _status(cluster: Cluster, request_id: str) -> dict:
    return httpx.get(f"{cluster.url}/queue/fal-ai/ai-avatar/requests/{request_id}/status?logs=1", timeout=10).json()


def _wait_completed(cluster: Cluster, ids: list[str], timeout_s: float = 240) -> dict[str, dict]:
    statuses: dict[str, dict] = {}

    def all_done() -> bool:
        # Polls the unfinished ones in order and stops at the first still running, so a long wait
        # does not load the API (and the CPU the workers share) with status requests.
        for i in ids:
            if i not in statuses:
                status = _status(cluster, i)
                if status["status"] != "COMPLETED":
                    return False
                statuses[i] = status
        return True

    cluster.wait_until(all_done, what=f"{len(ids)} jobs to complete", timeout_s=timeout_s)
    return statuses


def _cluster(tmp_path, tiny_weights, redis_url=None, **env) -> Cluster:
    return Cluster(tmp_path / "data", tiny_weights["multitalk"], redis_url, env=env)


def test_two_workers_on_one_redis_share_the_queue_without_running_a_job_twice(tmp_path, tiny_weights, redis_url,
                                                                              speech_request):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    cluster = _cluster(tmp_path, tiny_weights, redis_url)
    try:
        cluster.start_api(workers=0)
        cluster.start_worker()
        cluster.start_worker()
        cluster.wait_ready(workers=2)
        ids = [_submit(cluster, speech_request, seed=seed) for seed in range(8)]
        statuses = _wait_completed(cluster, ids)
        assert all("error" not in s for s in statuses.values())
        store = open_job_store(redis_url, cluster.data_dir)
        jobs = [store.get(i) for i in ids]
        assert all(job.attempts == 1 for job in jobs)  # claimed once each
        runs = [sum(log["message"].startswith("started on worker") for log in store.logs(i)) for i in ids]
        assert runs == [1] * len(ids)  # and run once each
        assert len({job.worker_id for job in jobs}) == 2  # both workers took jobs
        store.close()
    finally:
        cluster.stop_all()


def _kill_worker_mid_job(cluster: Cluster, body: dict) -> str:
    cluster.start_api(workers=0)
    worker = cluster.start_worker()
    cluster.wait_ready(process=worker)
    request_id = _submit(cluster, body, num_frames=241)
    cluster.wait_until(lambda: _status(cluster, request_id)["status"] == "IN_PROGRESS", worker, "the job to start")
    worker.kill()
    return request_id


def test_a_job_whose_worker_is_killed_is_retried_on_another(tmp_path, tiny_weights, speech_request):
    cluster = _cluster(tmp_path, tiny_weights, MULTITALK_LEASE_S="2")
    try:
        request_id = _kill_worker_mid_job(cluster, speech_request)
        cluster.start_worker()
        status = _wait_completed(cluster, [request_id])[request_id]
        assert "error" not in status
        messages = [log["message"] for log in status["logs"]]
        assert any("re-queued" in m for m in messages)
        store = open_job_store(None, cluster.data_dir)
        assert store.get(request_id).attempts == 2
        store.close()
    finally:
        cluster.stop_all()


def test_a_job_whose_worker_dies_on_its_last_attempt_fails_clearly(tmp_path, tiny_weights, speech_request):
    cluster = _cluster(tmp_path, tiny_weights, MULTITALK_LEASE_S="2", MULTITALK_MAX_ATTEMPTS="1")
    try:
        request_id = _kill_worker_mid_job(cluster, speech_request)
        status = _wait_completed(cluster, [request_id])[request_id]  # the API's lease sweep fails it
        assert status["error_type"] == WORKER_LOST and "crashed or was killed" in status["error"]
        result = httpx.get(f"{cluster.url}/queue/fal-ai/ai-avatar/requests/{request_id}", timeout=10)
        assert result.status_code == 500 and result.json()["error_type"] == WORKER_LOST
    finally:
        cluster.stop_all()


def test_queued_jobs_survive_an_api_restart(tmp_path, tiny_weights, speech_request):
    cluster = _cluster(tmp_path, tiny_weights)
    try:
        api = cluster.start_api(workers=0)
        ids = [_submit(cluster, speech_request, seed=seed) for seed in range(3)]
        api.kill()
        cluster.start_api(workers=1)
        statuses = _wait_completed(cluster, ids)
        assert all("error" not in s for s in statuses.values())
        results = [httpx.get(f"{cluster.url}/queue/fal-ai/ai-avatar/requests/{i}", timeout=10).json() for i in ids]
        assert [r["seed"] for r in results] == [0, 1, 2]
    finally:
        cluster.stop_all()


async def _submit_concurrently(url: str, body: dict, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post(url, json={**body, "seed": n}) for n in range(count)))


def test_a_flood_of_submits_is_either_queued_and_completed_or_refused_with_429(tmp_path, tiny_weights, speech_request):
    cluster = _cluster(tmp_path, tiny_weights, MULTITALK_MAX_QUEUE="50")
    try:
        cluster.start_api(workers=0)
        responses = asyncio.run(_submit_concurrently(cluster.url + QUEUE_SUBMIT, speech_request, 100))
        codes = Counter(r.status_code for r in responses)
        assert codes == {200: 50, 429: 50}
        assert all(r.headers["retry-after"].isdigit() for r in responses if r.status_code == 429)
        accepted = [r.json()["request_id"] for r in responses if r.status_code == 200]
        assert len(set(accepted)) == 50
        store = open_job_store(None, cluster.data_dir)
        assert store.counts()["queued"] == 50  # none lost, none duplicated
        store.close()
        cluster.start_worker()
        statuses = _wait_completed(cluster, accepted, timeout_s=600)
        assert all("error" not in s for s in statuses.values())
        seeds = sorted(httpx.get(f"{cluster.url}/queue/fal-ai/ai-avatar/requests/{i}", timeout=10).json()["seed"]
                       for i in accepted)
        accepted_seeds = sorted(json.loads(r.request.content)["seed"] for r in responses if r.status_code == 200)
        assert seeds == accepted_seeds  # each accepted request produced its own video
    finally:
        cluster.stop_all()


class _MediaHost:
    """A plain HTTP server on 127.0.0.1 serving the example inputs, counting the requests it answers."""

    def __init__(self, files: dict[str, Path]):
        self.files, self.hits = files, Counter()
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # the stdlib's name
                name = self.path.lstrip("/")
                if name not in host.files:
                    self.send_error(404)
                    return
                host.hits[name] += 1
                data = host.files[name].read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_queued_job_completes_from_its_stored_inputs_after_the_input_urls_stop_answering(tmp_path, tiny_weights,
                                                                                           example_inputs):
    """The API fetches and keeps the inputs at submit; the worker reads them from the file store, never the URLs."""
    media = _MediaHost({"image.png": example_inputs["image"], "first.wav": example_inputs["audio1"],
                        "second.wav": example_inputs["audio2"]})
    cluster = _cluster(tmp_path, tiny_weights, MULTITALK_FETCH_ALLOWED_HOSTS="127.0.0.1")
    try:
        cluster.start_api(workers=0)
        request_id = _submit(cluster, {"image_url": media.url("image.png"), "first_audio_url": media.url("first.wav"),
                                       "second_audio_url": media.url("second.wav"), "prompt": "two people talk",
                                       "num_frames": 41})
        media.stop()
        with pytest.raises(httpx.ConnectError):
            httpx.get(media.url("image.png"), timeout=5)
        cluster.start_worker()
        status = _wait_completed(cluster, [request_id])[request_id]
        assert "error" not in status, status
        result = httpx.get(f"{cluster.url}/queue/fal-ai/ai-avatar/requests/{request_id}", timeout=10).json()
        video = httpx.get(result["video"]["url"], timeout=30)
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"
        assert media.hits == {"image.png": 1, "first.wav": 1, "second.wav": 1}  # fetched once, by the API
    finally:
        cluster.stop_all()
        media.stop()


def _healthz(cluster: Cluster) -> httpx.Response:
    return httpx.get(f"{cluster.url}/healthz", timeout=10)


def test_workers_and_the_api_ride_out_a_redis_restart(tmp_path, tiny_weights, speech_request):
    """Redis (appendonly) down for ~8 s while jobs run: the `multitalk worker` process and the API's embedded
    worker back off and carry on, /healthz says 503 meanwhile and 200 after, and every job completes."""
    store = RestartableRedis(tmp_path / "redis")
    store.start()
    cluster = _cluster(tmp_path, tiny_weights, store.url)
    try:
        cluster.start_api(workers=1)
        worker = cluster.start_worker()
        cluster.wait_ready(workers=2, process=worker)
        ids = [_submit(cluster, speech_request, seed=seed) for seed in range(4)]
        cluster.wait_until(lambda: _status(cluster, ids[0])["status"] != "IN_QUEUE", worker, "a job to start")
        store.stop()
        cluster.wait_until(lambda: _healthz(cluster).status_code == 503, worker, "/healthz to say 503")
        assert _healthz(cluster).json()["error_type"] == "store_unavailable"
        time.sleep(8)
        store.start()
        cluster.wait_until(lambda: _healthz(cluster).status_code == 200, worker, "/healthz to say 200 again")
        statuses = _wait_completed(cluster, ids)
        assert all("error" not in s for s in statuses.values()), statuses
        assert worker.alive(), worker.output()[-3000:]
        cluster.wait_ready(workers=2, process=worker)  # both announced again
        assert "store unusable" in worker.output() and "store usable again" in worker.output()
    finally:
        cluster.stop_all()
        store.stop()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 32 MiB tmpfs mounted for the test (root only): a real file system that fills up. Skipped where mounting
    is not permitted; a failure under MULTITALK_REQUIRE_MOUNT=1."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        reason = ("mounting a small tmpfs needs root (or CAP_SYS_ADMIN) to test a full disk: "
                  f"{mounted.stderr.strip() if mounted else 'not root'}")
        if os.environ.get("MULTITALK_REQUIRE_MOUNT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def _fill(folder: Path) -> Path:
    """A file that takes every free byte of `folder`'s file system."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (b"\0" * 1024 * 1024, b"\0" * 4096, b"\0"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_fails_the_job_clearly_refuses_submits_and_recovers(tmp_path, small_disk, tiny_weights,
                                                                        redis_url, speech_request):
    """The data dir on a real small file system that fills up (the job store in Redis, so its writes go on):
    the job whose video does not fit ends with a clear 507, a submit is refused with 507, /healthz says so, and
    once space is freed a new job completes on the same worker."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    # The processes' logs stay outside, in the cluster's folder; only the data dir is on the small disk.
    cluster = Cluster(tmp_path / "cluster", tiny_weights["multitalk"], redis_url,
                      env={"MULTITALK_DATA_DIR": str(small_disk / "data")})
    try:
        cluster.start_api(workers=0)
        request_id = _submit(cluster, speech_request)
        filler = _fill(small_disk)
        health = _healthz(cluster)
        assert (health.status_code, health.json()["error_type"]) == (503, "insufficient_storage")
        refused = httpx.post(cluster.url + QUEUE_SUBMIT, json=speech_request, timeout=60)
        assert (refused.status_code, refused.json()["error_type"]) == (507, "insufficient_storage"), refused.text

        worker = cluster.start_worker()
        status = _wait_completed(cluster, [request_id])[request_id]
        assert status["error_type"] == "insufficient_storage"
        assert "no space left on device" in status["error"] and "free space in the data dir" in status["error"]
        result = httpx.get(f"{cluster.url}/queue/fal-ai/ai-avatar/requests/{request_id}", timeout=10)
        assert result.status_code == 507 and result.json()["error_type"] == "insufficient_storage"

        filler.unlink()
        assert _healthz(cluster).status_code == 200
        after = _submit(cluster, speech_request, seed=1)
        assert "error" not in _wait_completed(cluster, [after])[after]
        assert worker.alive()
    finally:
        cluster.stop_all()

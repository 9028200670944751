"""No job is lost or run twice: several workers, killed workers, a restarted API, a flood of submits.

Real processes throughout (`multitalk serve` and `multitalk worker`), inspected through the HTTP API
and, for attempts and worker ids, through the job store itself.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx

from server.jobs import WORKER_LOST, open_job_store

from server_harness import Cluster

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
        runs = [sum(log["message"] == "fetching inputs" for log in store.logs(i)) for i in ids]
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

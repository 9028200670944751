"""Repeated bursts of requests leave a `multitalk serve` process's open files and threads flat.

One real server (the tiny weights, its embedded worker, the harness's small frame size and one step)
runs one job, then takes identical bursts of concurrent requests of every kind a client makes: status
polls, result reads, video downloads, both upload flows, submits (accepted and refused) followed by
cancels, 404s, and a `/status/stream` read. Between bursts it idles for longer than its thread pools
keep an idle thread, so whatever a burst leaves behind piles up from one burst to the next. After the
last burst, /proc/<pid>/task and /proc/<pid>/fd may not count more than after the first (ALLOWANCE aside).

The job store's database file is counted apart: SQLite keeps a closed connection's descriptor for the
next connection to reuse while any other connection of the process holds a lock on the file, and in WAL
mode every open connection holds one. So the file's descriptors number the most connections that were
ever open at once, one per thread: a later burst that happens to run more threads at once than the first
raises it without a leak. It is bounded instead by anyio's request threads (its default limit, 40) plus
the threads alive at rest. tests/server/jobs/test_job_store.py checks the same bound per connection.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server_harness import Cluster

pytestmark = [pytest.mark.service, pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")]

QUEUE = "/queue/fal-ai/ai-avatar"
SUBMIT = "/queue/fal-ai/ai-avatar/multi"
BURSTS = 3  # measured after the first and after the last
# Starlette runs sync routes on anyio's worker threads, and anyio retires a thread idle for 10 s
# (MAX_IDLE_TIME) when the next call comes: a longer gap, then one request, retires the burst's threads.
IDLE_GAP_S = 11.0
ANYIO_THREAD_LIMIT = 40  # anyio's default limiter for worker threads
# The asyncio default executor (the webhook sender's store calls, copies of local files) starts a thread on
# demand, up to min(32, CPUs + 4), and never retires it: a later burst may need one more than the first did,
# with its connection's WAL descriptor. A leak grows with every burst of some fifty requests, far past this.
ALLOWANCE = {"threads": 1, "fds": 1}


@dataclass(frozen=True)
class Usage:
    threads: int
    database_fds: int  # on the job store's database file
    other_fds: int
    fd_kinds: Counter  # for the failure message: what the descriptors are (socket, pipe, which file)


def usage(pid: int, database: Path) -> Usage:
    kinds = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed while we looked
            continue
        kinds[target.split(":[")[0]] += 1
    database_fds = kinds[str(database)]
    return Usage(len(os.listdir(f"/proc/{pid}/task")), database_fds, sum(kinds.values()) - database_fds, kinds)


async def _upload_fal(client: httpx.AsyncClient, data: bytes) -> None:
    """fal's `fal` repository: initiate, then PUT the bytes."""
    initiated = await client.post("/storage/upload/initiate", json={"content_type": "audio/wav", "file_name": "a.wav"})
    assert initiated.status_code == 200, initiated.text
    assert (await client.put(initiated.json()["upload_url"], content=data)).status_code == 200


async def _upload_fal_v3(client: httpx.AsyncClient, data: bytes) -> None:
    """fal-client's default `fal_v3` repository: a token, then the raw body."""
    token = (await client.post("/storage/auth/token", json={})).json()["token"]
    response = await client.post("/files/upload", content=data,
                                 headers={"authorization": f"Bearer {token}", "content-type": "audio/wav"})
    assert response.status_code == 200, response.text


async def _submit_and_cancel(client: httpx.AsyncClient, body: dict) -> str:
    submitted = await client.post(SUBMIT, json=body)
    assert submitted.status_code == 200, submitted.text
    request_id = submitted.json()["request_id"]
    assert (await client.put(f"{QUEUE}/requests/{request_id}/cancel")).status_code in (200, 202, 400)  # queued, running, done
    return request_id


async def _expect(client: httpx.AsyncClient, method: str, url: str, status: int, **kwargs) -> None:
    response = await client.request(method, url, **kwargs)
    assert response.status_code == status, (url, response.status_code, response.text[:300])


async def _burst(base_url: str, done_id: str, video_url: str, body: dict, refused_body: dict, wav: bytes) -> list[str]:
    """One burst: about fifty concurrent requests; the ids of the jobs it submitted."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        status, result = f"{QUEUE}/requests/{done_id}/status", f"{QUEUE}/requests/{done_id}"
        unknown = "00000000-0000-4000-8000-000000000000"
        calls = [
            *(_expect(client, "GET", status, 200, params={"logs": "1"}) for _ in range(12)),
            *(_expect(client, "GET", result, 200) for _ in range(8)),
            *(_expect(client, "GET", video_url, 200) for _ in range(4)),
            _expect(client, "GET", f"{status}/stream", 200),
            *(_upload_fal(client, wav) for _ in range(3)),
            *(_upload_fal_v3(client, wav) for _ in range(3)),
            *(_expect(client, "GET", f"{QUEUE}/requests/{unknown}/status", 404) for _ in range(4)),
            *(_expect(client, "GET", "/files/" + "x" * 32, 404) for _ in range(4)),
            *(_expect(client, "POST", SUBMIT, 422, json=refused_body) for _ in range(2)),
        ]
        submits = [_submit_and_cancel(client, body) for _ in range(3)]
        outcomes = await asyncio.gather(*submits, *calls)
    return list(outcomes[: len(submits)])


def _wait_completed(cluster: Cluster, ids: list[str]) -> None:
    def all_completed() -> bool:
        return all(httpx.get(f"{cluster.url}{QUEUE}/requests/{i}/status", timeout=10).json()["status"] == "COMPLETED"
                   for i in ids)

    cluster.wait_until(all_completed, what=f"{len(ids)} jobs to complete", timeout_s=300)


def test_bursts_of_requests_leave_open_files_and_threads_flat(tmp_path, tiny_weights, speech_request,
                                                              example_inputs):
    cluster = Cluster(tmp_path / "data", tiny_weights["multitalk"])
    try:
        api = cluster.start_api()
        cluster.wait_ready(process=api)
        first = httpx.post(cluster.url + SUBMIT, json=speech_request, timeout=60).json()["request_id"]
        _wait_completed(cluster, [first])  # a finished job: its status, result and video are read in the bursts
        video_url = httpx.get(f"{cluster.url}{QUEUE}/requests/{first}", timeout=10).json()["video"]["url"]
        wav = example_inputs["audio1"].read_bytes()
        refused = {**speech_request, "first_audio_url": "data:audio/wav;base64,UklGRiQAAABXQVZFZm10IP////8="}

        measured = []
        for _ in range(BURSTS):
            ids = asyncio.run(_burst(cluster.url, first, video_url, speech_request, refused, wav))
            _wait_completed(cluster, ids)
            time.sleep(IDLE_GAP_S)
            assert httpx.get(f"{cluster.url}{QUEUE}/requests/{first}/status", timeout=10).status_code == 200
            time.sleep(1.0)  # the threads told to stop by that request exit
            measured.append(usage(api.proc.pid, (cluster.data_dir / "jobs.sqlite3").resolve()))
        after_first, after_last = measured[0], measured[-1]
        report = "\n".join(f"after burst {n + 1}: {u.threads} threads, {u.database_fds} + {u.other_fds} fds: "
                           f"{dict(u.fd_kinds)}" for n, u in enumerate(measured))
        assert after_last.threads <= after_first.threads + ALLOWANCE["threads"], report
        assert after_last.other_fds <= after_first.other_fds + ALLOWANCE["fds"], report
        assert after_last.database_fds <= ANYIO_THREAD_LIMIT + after_last.threads, report
    finally:
        cluster.stop_all()

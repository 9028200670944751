"""Webhooks live in the job store's outbox (issue 17): a delivery survives the SIGKILL of the process retrying it.

A real `multitalk serve` with an embedded worker completes five jobs while their webhook receiver is down, so
each webhook fails its first attempt and waits in the outbox (the request's logs say so). The API is then killed
with SIGKILL, the receiver comes up, and the API restarts on the same data dir: every webhook arrives, each
request's deliveries all carry the same bytes and a valid signature.
"""

from __future__ import annotations

import json

import httpx
import pytest

from server.jobs.webhooks import verify_signature

from local_servers import free_port, receiving_webhooks
from server_harness import Cluster

pytestmark = [pytest.mark.service, pytest.mark.slow]

SECRET = "restart-secret"
JOBS = 5


def _logs(cluster: Cluster, request_id: str) -> list[str]:
    status = httpx.get(f"{cluster.url}/queue/fal-ai/ai-avatar/requests/{request_id}/status?logs=1", timeout=10)
    return [line["message"] for line in status.json()["logs"]]


def test_pending_webhooks_are_delivered_after_the_api_is_killed_and_restarted(tmp_path, tiny_weights, speech_request):
    port = free_port()  # the receiver's, nobody listening yet: every first attempt is refused
    hook = f"http://127.0.0.1:{port}/hook"
    cluster = Cluster(tmp_path / "host", tiny_weights["multitalk"],
                      env={"MULTITALK_WEBHOOK_SECRET": SECRET, "MULTITALK_FETCH_ALLOWED_HOSTS": "127.0.0.1"})
    try:
        api = cluster.start_api()
        cluster.wait_ready(process=api)
        ids = [httpx.post(f"{cluster.url}/queue/fal-ai/ai-avatar/multi", params={"fal_webhook": hook},
                          json={**speech_request, "seed": n}, timeout=60).json()["request_id"] for n in range(JOBS)]
        cluster.wait_until(lambda: all(any(m.startswith("webhook attempt 1 ") and "failed" in m
                                           for m in _logs(cluster, request_id)) for request_id in ids),
                           api, "every first webhook attempt to fail", timeout_s=300)
        metrics = httpx.get(f"{cluster.url}/metrics", timeout=10).text
        assert f"multitalk_webhooks_pending {JOBS}" in metrics
        api.kill()  # SIGKILL: the sender's retries exist only in the store now

        with receiving_webhooks(port) as (_, deliveries):
            cluster.wait_ready(process=cluster.start_api())
            received: dict[str, set[bytes]] = {}
            while len(received) < JOBS:
                headers, body = deliveries.get(timeout=120)
                assert verify_signature(SECRET, body, headers)
                received.setdefault(json.loads(body)["request_id"], set()).add(body)
    finally:
        cluster.stop_all()
    assert set(received) == set(ids)
    assert all(len(bodies) == 1 for bodies in received.values())  # redelivered or not, always the same bytes
    assert all(json.loads(next(iter(bodies)))["status"] == "OK" for bodies in received.values())

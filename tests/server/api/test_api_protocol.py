"""fal's queue protocol in detail against running `multitalk serve` processes (PEERS_AND_PROTOCOL.md §A).

Three servers, each started once:

* `open_api`: no worker, so a queued job stays queued; no public URL configured, so the URLs it
  returns come from each request's Host and X-Forwarded-* headers.
* `keyed_api`: no worker, API keys k1 and k2, a queue of at most 2.
* `worker_api`: one embedded worker on `MULTITALK_WEIGHTS=tiny` (made in its data dir on start),
  for what needs a job to run: the status stream, and readiness.

The last tests run the app in process (`local_api`): the status stream's log lines, and error bodies.

Jobs a test queues are cancelled when it ends, so every test starts with an empty queue.
"""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.jobs import open_job_store
from model.contract.fields import AVATAR_MULTI
from server.settings import Settings

from server_harness import Cluster

pytestmark = [pytest.mark.service]

RUN = "/fal-ai/ai-avatar/multi"
SUBMIT = "/queue/fal-ai/ai-avatar/multi"
REQUESTS = "/queue/fal-ai/ai-avatar/requests"  # status, result and cancel: owner/app only, as on fal
STATUS_ORDER = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]


class Api:
    """An httpx client for one server that remembers the jobs it queued, to cancel them afterwards."""

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        self.http = httpx.Client(base_url=url, headers=headers, timeout=60)
        self.queued: list[str] = []

    def submit(self, body: dict, **kwargs) -> httpx.Response:
        response = self.http.post(kwargs.pop("path", SUBMIT), json=body, **kwargs)
        if response.status_code == 200:
            self.queued.append(response.json()["request_id"])
        return response

    def submitted(self, body: dict, **kwargs) -> dict:
        response = self.submit(body, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def cancel_queued(self) -> None:
        for request_id in self.queued:
            self.http.put(f"{REQUESTS}/{request_id}/cancel")
        self.queued.clear()


def _start(data_dir: Path, workers: int = 0, **env: str) -> Cluster:
    cluster = Cluster(data_dir, Path("tiny"))  # `tiny`: only a worker reads it, and makes it in the data dir
    process = cluster.start_api(workers=workers, **env)
    if workers:
        cluster.wait_ready(process=process)
    return cluster


@pytest.fixture(scope="module")
def open_cluster(tmp_path_factory) -> Iterator[Cluster]:
    cluster = _start(tmp_path_factory.mktemp("open-api"), MULTITALK_PUBLIC_URL="")
    yield cluster
    cluster.stop_all()


@pytest.fixture(scope="module")
def keyed_cluster(tmp_path_factory) -> Iterator[Cluster]:
    cluster = _start(tmp_path_factory.mktemp("keyed-api"), MULTITALK_API_KEYS="k1,k2", MULTITALK_MAX_QUEUE="2")
    yield cluster
    cluster.stop_all()


@pytest.fixture(scope="module")
def worker_cluster(tmp_path_factory) -> Iterator[Cluster]:
    cluster = _start(tmp_path_factory.mktemp("worker-api"), workers=1, MULTITALK_WEIGHTS="tiny")
    yield cluster
    cluster.stop_all()


def _api(url: str, headers: dict[str, str] | None = None) -> Iterator[Api]:
    api = Api(url, headers)
    yield api
    api.cancel_queued()
    api.http.close()


@pytest.fixture
def open_api(open_cluster) -> Iterator[Api]:
    yield from _api(open_cluster.url)


@pytest.fixture
def keyed_api(keyed_cluster) -> Iterator[Api]:
    yield from _api(keyed_cluster.url, {"Authorization": "Key k1"})


@pytest.fixture
def worker_api(worker_cluster) -> Iterator[Api]:
    yield from _api(worker_cluster.url)


def _queued_count(api: Api) -> float:
    lines = api.http.get("/metrics").text.splitlines()
    return float(next(line.split()[1] for line in lines if line.startswith("multitalk_queue_depth ")))


# -- status while queued --------------------------------------------------------------------------


def test_queued_requests_report_202_their_queue_position_and_a_logs_key(open_api, speech_request):
    jobs = [open_api.submitted(speech_request) for _ in range(3)]
    assert [job["queue_position"] for job in jobs] == [0, 1, 2]
    for position, job in enumerate(jobs):
        response = open_api.http.get(job["status_url"])
        assert response.status_code == 202
        body = response.json()
        assert (body["status"], body["queue_position"], body["logs"]) == ("IN_QUEUE", position, None)
        assert "metrics" not in body and "error" not in body


@pytest.mark.parametrize("flag, logs_are_listed", [("1", True), ("true", True), ("0", False), ("false", False)])
def test_logs_flag_takes_1_true_0_false(open_api, speech_request, flag, logs_are_listed):
    job = open_api.submitted(speech_request)
    logs = open_api.http.get(job["status_url"], params={"logs": flag}).json()["logs"]
    assert isinstance(logs, list) if logs_are_listed else logs is None


# -- the URLs a submit returns --------------------------------------------------------------------


def test_returned_urls_name_owner_and_app_only(open_api, open_cluster, speech_request):
    job = open_api.submitted(speech_request)
    response_url = f"{open_cluster.url}{REQUESTS}/{job['request_id']}"
    assert job["response_url"] == response_url
    assert job["status_url"] == f"{response_url}/status"
    assert job["cancel_url"] == f"{response_url}/cancel"
    assert "/multi" not in job["response_url"]


def test_urls_with_the_endpoint_path_work_too(open_api, speech_request):
    job = open_api.submitted(speech_request)
    with_path = f"/queue/fal-ai/ai-avatar/multi/requests/{job['request_id']}"
    assert open_api.http.get(f"{with_path}/status").json()["status"] == "IN_QUEUE"
    assert open_api.http.get(with_path).status_code == 400  # still in progress
    assert open_api.http.put(f"{with_path}/cancel").json() == {"status": "OK"}


def test_post_to_a_queue_host_queues_instead_of_running(open_api, speech_request):
    queue_host = {"Host": "queue.example.test"}
    body = open_api.submitted(speech_request, path=RUN, headers=queue_host)
    assert body["status"] == "IN_QUEUE"
    assert body["status_url"] == f"http://queue.example.test{REQUESTS}/{body['request_id']}/status"
    # fal's own form on that host, without the /queue prefix, reaches the queue routes too
    status = open_api.http.get(f"/fal-ai/ai-avatar/requests/{body['request_id']}/status", headers=queue_host)
    assert (status.status_code, status.json()["status"]) == (202, "IN_QUEUE")


def test_forwarded_headers_make_the_urls_without_a_public_url(open_api, speech_request):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.test"}
    job = open_api.submitted(speech_request, headers=forwarded)
    assert job["response_url"] == f"https://api.example.test{REQUESTS}/{job['request_id']}"
    status = open_api.http.get(f"{REQUESTS}/{job['request_id']}/status", headers=forwarded).json()
    assert status["status_url"] == f"https://api.example.test{REQUESTS}/{job['request_id']}/status"


# -- result, unknown ids, cancel ------------------------------------------------------------------


def test_result_before_completion_is_400_still_in_progress(open_api, speech_request):
    job = open_api.submitted(speech_request)
    response = open_api.http.get(job["response_url"])
    assert response.status_code == 400
    assert response.json()["detail"] == "Request is still in progress"


def test_unknown_request_is_404_on_status_result_and_cancel(open_api):
    for path in (f"{REQUESTS}/no-such-id/status", f"{REQUESTS}/no-such-id"):
        response = open_api.http.get(path)
        assert response.status_code == 404
        assert response.json()["error_type"] == "request_not_found"
        assert response.headers["x-fal-request-id"]
    cancel = open_api.http.put(f"{REQUESTS}/no-such-id/cancel")
    assert (cancel.status_code, cancel.json()) == (404, {"status": "NOT_FOUND"})


@pytest.mark.parametrize("request_id", ["%F0%9F%98%80", "%00", "a%00b", "x" * 5000, "00000000-0000-4000-8000-00000000000%C3%A9"],
                         ids=["emoji", "nul", "inner-nul", "huge", "non-ascii-uuid"])
def test_a_request_id_that_cannot_be_ours_is_a_404_on_every_route(open_api, request_id):
    """An emoji, a NUL or a huge id used to be a 500 (a non-latin-1 response header) or a dropped connection."""
    for method, path in (("GET", f"{REQUESTS}/{request_id}/status"), ("GET", f"{REQUESTS}/{request_id}"),
                         ("GET", f"{REQUESTS}/{request_id}/status/stream")):
        response = open_api.http.request(method, path)
        assert response.status_code == 404 and response.json()["error_type"] == "request_not_found"
        assert len(response.json()["detail"]) < 200
    cancel = open_api.http.put(f"{REQUESTS}/{request_id}/cancel")
    assert (cancel.status_code, cancel.json()) == (404, {"status": "NOT_FOUND"})


def test_cancelling_a_queued_request_completes_it_as_client_cancelled(open_api, speech_request):
    job = open_api.submitted(speech_request)
    cancel = open_api.http.put(job["cancel_url"])
    assert (cancel.status_code, cancel.json()) == (200, {"status": "OK"})
    status = open_api.http.get(job["status_url"])
    assert status.status_code == 200
    assert (status.json()["status"], status.json()["error_type"]) == ("COMPLETED", "client_cancelled")
    result = open_api.http.get(job["response_url"])
    assert result.status_code == 499 and result.json()["error_type"] == "client_cancelled"
    again = open_api.http.put(job["cancel_url"])
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})


def test_request_id_header_is_the_job_id_on_every_route_of_a_job(open_api, speech_request):
    submit = open_api.submit(speech_request)
    job = submit.json()
    request_id = job["request_id"]
    responses = [submit, open_api.http.get(job["status_url"]), open_api.http.get(job["response_url"]),
                 open_api.http.put(job["cancel_url"])]
    assert [response.headers["x-fal-request-id"] for response in responses] == [request_id] * 4
    assert open_api.http.get("/healthz").headers["x-fal-request-id"]


# -- files ----------------------------------------------------------------------------------------


def test_initiated_upload_is_served_back_with_its_bytes_and_type(open_api, example_inputs):
    image = example_inputs["image"].read_bytes()
    initiated = open_api.http.post("/storage/upload/initiate",
                                   json={"file_name": "people.png", "content_type": "image/png"}).json()
    assert open_api.http.put(initiated["upload_url"], content=image, headers={"content-type": "image/png"}
                             ).status_code == 200
    download = open_api.http.get(initiated["file_url"])
    assert (download.status_code, download.content) == (200, image)
    assert download.headers["content-type"] == "image/png"
    again = open_api.http.put(initiated["upload_url"], content=b"other bytes")
    assert again.status_code == 404


def _declared_only(url: str, method: str, path: str, length: int) -> tuple[int, dict]:
    """Send only the headers of a request declaring `length` body bytes, and read the answer (within 10 s)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.putrequest(method, path)
        connection.putheader("Content-Length", str(length))
        connection.putheader("Content-Type", "image/png")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_an_upload_declaring_more_than_the_limit_is_a_413_before_its_body(open_api, open_cluster):
    """A 2 GB Content-Length used to make the server wait for the body; both upload flows answer at once."""
    initiated = open_api.http.post("/storage/upload/initiate",
                                   json={"file_name": "big.png", "content_type": "image/png"}).json()
    for method, path in (("PUT", urlsplit(initiated["upload_url"]).path), ("POST", "/files/upload")):
        status, body = _declared_only(open_cluster.url, method, path, 2 * 10**9)
        assert status == 413 and body["error_type"] == "payload_too_large" and "MiB" in body["detail"]


def test_unknown_file_is_404(open_api):
    assert open_api.http.get("/files/" + "A" * 32 + ".png").status_code == 404


# -- probes, metrics, docs ------------------------------------------------------------------------


def test_readyz_is_503_without_a_worker(open_api):
    response = open_api.http.get("/readyz")
    assert response.status_code == 503
    assert (response.json()["status"], response.json()["workers"]) == ("not_ready", [])


def test_metrics_queue_depth_counts_the_queued_jobs(open_api, speech_request):
    assert _queued_count(open_api) == 0
    for _ in range(2):
        open_api.submitted(speech_request)
    assert _queued_count(open_api) == 2


def test_openapi_lists_the_routes_and_the_input_example(open_api):
    spec = open_api.http.get("/openapi.json").json()
    assert {RUN, SUBMIT, f"{REQUESTS}/{{request_id}}/status", f"{REQUESTS}/{{request_id}}",
            f"{REQUESTS}/{{request_id}}/cancel", "/storage/upload/initiate", "/storage/uploads/{token}",
            "/files/upload"} <= set(spec["paths"])
    [example] = spec["components"]["schemas"]["AvatarMultiInput"]["examples"]
    assert {"image_url", "first_audio_url", "prompt"} <= set(example)


def test_docs_page_is_html(open_api):
    response = open_api.http.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")


# -- API keys and the queue limit -----------------------------------------------------------------


def test_api_key_is_required_to_submit(keyed_api, keyed_cluster, speech_request):
    no_key = httpx.post(f"{keyed_cluster.url}{SUBMIT}", json=speech_request)
    assert no_key.status_code == 401 and no_key.json()["error_type"] == "unauthorized"
    wrong_key = httpx.post(f"{keyed_cluster.url}{SUBMIT}", json=speech_request, headers={"Authorization": "Key k3"})
    assert wrong_key.status_code == 401
    with_k2 = keyed_api.submit(speech_request, headers={"Authorization": "Key k2"})
    assert with_k2.status_code == 200
    assert httpx.get(f"{keyed_cluster.url}/healthz").status_code == 200
    # the job is k2's: only k2 can cancel it (the fixture's clean-up uses k1)
    assert keyed_api.http.put(with_k2.json()["cancel_url"], headers={"Authorization": "Key k2"}).status_code == 200


def test_token_upload_needs_the_token_and_the_file_needs_no_key(keyed_api, keyed_cluster, example_inputs):
    image = example_inputs["image"].read_bytes()
    upload = {"content": image, "headers": {"content-type": "image/png", "x-fal-file-name": "people.png"}}
    assert httpx.post(f"{keyed_cluster.url}/storage/auth/token").status_code == 401
    assert httpx.post(f"{keyed_cluster.url}/files/upload", **upload).status_code == 401
    token = keyed_api.http.post("/storage/auth/token").json()["token"]
    uploaded = httpx.post(f"{keyed_cluster.url}/files/upload",
                          content=upload["content"], headers={**upload["headers"], "Authorization": f"Bearer {token}"})
    assert uploaded.status_code == 200, uploaded.text
    download = httpx.get(uploaded.json()["access_url"])  # no key: a file URL is its own permission
    assert (download.status_code, download.content) == (200, image)


def test_a_job_belongs_to_the_key_that_submitted_it(keyed_api, keyed_cluster, speech_request):
    """Any key could read and cancel another key's jobs; now another key gets the 404 of an unknown request."""
    job = keyed_api.submitted(speech_request)  # with key k1
    other = {"Authorization": "Key k2"}
    for url in (job["status_url"], job["response_url"]):
        response = httpx.get(url, headers=other)
        assert response.status_code == 404 and response.json()["error_type"] == "request_not_found"
    cancel = httpx.put(job["cancel_url"], headers=other)
    assert (cancel.status_code, cancel.json()) == (404, {"status": "NOT_FOUND"})
    assert keyed_api.http.get(job["status_url"]).status_code == 202  # still queued, and its owner sees it
    assert keyed_api.http.put(job["cancel_url"]).json()["status"] == "OK"


def test_full_queue_is_429_with_retry_after(keyed_api, speech_request):
    for _ in range(2):
        keyed_api.submitted(speech_request)
    refused = keyed_api.submit(speech_request)
    assert refused.status_code == 429 and refused.json()["error_type"] == "queue_full"
    assert int(refused.headers["retry-after"]) > 0


# -- with a worker ----------------------------------------------------------------------------------


def test_readyz_without_a_valid_key_shows_states_and_counts_only(keyed_cluster):
    store = open_job_store(None, keyed_cluster.data_dir)
    store.record_worker("w-secret", {"state": "ready", "job_id": "job-secret", "weights": "/srv/weights/secret",
                                     "device": "cuda:0", "host": "gpu-7"}, ttl_s=5)
    for headers in ({}, {"Authorization": "Key not-a-key"}):
        body = httpx.get(f"{keyed_cluster.url}/readyz", headers=headers).json()
        assert body["status"] == "ready" and body["workers"] == [{"state": "ready"}] and "queue" in body
        assert "secret" not in json.dumps(body) and "gpu-7" not in json.dumps(body)
    detailed = httpx.get(f"{keyed_cluster.url}/readyz", headers={"Authorization": "Key k1"}).json()
    assert detailed["workers"][0]["job_id"] == "job-secret"


@pytest.mark.slow
def test_readyz_is_200_with_a_ready_worker_and_notes_the_tiny_weights(worker_api):
    response = worker_api.http.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready" and [worker["state"] for worker in body["workers"]] == ["ready"]
    assert "tiny" in body["notice"]


def test_status_stream_sends_data_events_until_completed_then_closes(worker_api, speech_request):
    job = worker_api.submitted(speech_request)
    events = []
    with worker_api.http.stream("GET", f"{job['status_url']}/stream", params={"logs": "1"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-fal-request-id"] == job["request_id"]
        for line in response.iter_lines():
            if line and not line.startswith(":"):  # ":" starts a keep-alive comment
                assert line.startswith("data: ")
                events.append(json.loads(line.removeprefix("data: ")))
    # The loop ended: the server closed the stream.
    statuses = [event["status"] for event in events]
    assert len(events) >= 2 and statuses[-1] == "COMPLETED"
    assert statuses == sorted(statuses, key=STATUS_ORDER.index)
    assert all(isinstance(event["logs"], list) for event in events)
    lines = [(log["timestamp"], log["message"]) for event in events for log in event["logs"]]
    assert lines and len(lines) == len(set(lines))  # each line once: an event lists only the new ones
    assert events[-1]["metrics"]["inference_time"] > 0


def test_a_sync_caller_that_disconnects_cancels_its_job(worker_cluster, speech_request):
    store = open_job_store(None, worker_cluster.data_dir)
    cancelled_before = store.stats().completed["CANCELLED"]
    with pytest.raises(httpx.ReadTimeout):  # the caller gives up long before a 241-frame video is done
        httpx.post(f"{worker_cluster.url}/fal-ai/ai-avatar/multi", json={**speech_request, "num_frames": 241},
                   timeout=httpx.Timeout(60, read=1.0))
    worker_cluster.wait_until(lambda: store.stats().completed["CANCELLED"] == cancelled_before + 1,
                              what="the abandoned sync job to be cancelled", timeout_s=120)
    store.close()


# -- in process: the status stream's logs, and error bodies -----------------------------------------


@pytest.fixture(scope="module")
def local_api(tmp_path_factory) -> Iterator[TestClient]:
    """The app in process, without workers (jobs are moved along through its store), with a 64 KiB body limit."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("local-api"), workers=0, max_body_bytes=64 * 1024)
    with TestClient(create_app(settings)) as client:
        yield client


def _sse_events(client: TestClient, path: str) -> list[dict]:
    with client.stream("GET", path) as response:
        assert response.status_code == 200
        return [json.loads(line.removeprefix("data: ")) for line in response.iter_lines() if line.startswith("data: ")]


def test_status_stream_events_carry_only_the_log_lines_new_since_the_previous_event(local_api):
    """Each event used to list every line so far, and the JS client, which appends each event's lines, showed
    them again and again; polled status still lists them all."""
    store = local_api.app.state.services.store
    job = store.submit(AVATAR_MULTI.app_id, {"options": {}, "files": {}})
    store.claim("worker-1", lease_s=60)
    store.append_log(job.id, "line 1")

    def work() -> None:
        time.sleep(1.0)
        store.append_log(job.id, "line 2")
        store.append_log(job.id, "line 3")
        time.sleep(1.0)
        store.finish(job.id, "worker-1", "OK", {"status_code": 200, "body": {}})

    worker = threading.Thread(target=work)
    worker.start()
    events = _sse_events(local_api, f"{REQUESTS}/{job.id}/status/stream?logs=1")
    worker.join()
    assert len(events) >= 2 and events[-1]["status"] == "COMPLETED"
    assert [log["message"] for event in events for log in event["logs"]] == ["line 1", "line 2", "line 3"]
    polled = local_api.get(f"{REQUESTS}/{job.id}/status", params={"logs": "1"}).json()
    assert [log["message"] for log in polled["logs"]] == ["line 1", "line 2", "line 3"]
    assert all(event["logs"] is None for event in _sse_events(local_api, f"{REQUESTS}/{job.id}/status/stream"))


@pytest.mark.parametrize("method, path, status, error_type", [
    ("POST", f"{RUN}/stream", 404, "not_found"), ("GET", "/no/such/route", 404, "not_found"),
    ("DELETE", RUN, 405, "method_not_allowed"), ("GET", f"{REQUESTS}/x/cancel", 405, "method_not_allowed"),
])
def test_unknown_routes_and_wrong_methods_answer_in_fals_flat_format(local_api, method, path, status, error_type):
    """They were FastAPI's bare {"detail": "Not Found"}: no error_type, and nothing the JS client shows."""
    response = local_api.request(method, path, json={})
    body = response.json()
    assert (response.status_code, body["error_type"], response.headers["x-fal-error-type"]) == (status, error_type,
                                                                                                error_type)
    assert body["message"] == body["detail"] and body["detail"].startswith(f"{method} {path}: ")
    if path.endswith("/stream"):  # where fal.stream posts
        assert "does not stream" in body["detail"] and "fal.subscribe" in body["detail"]


def test_error_bodies_carry_the_message_the_js_client_shows(local_api):
    """@fal-ai/client makes its error's message from `message` alone; `detail` keeps the shape the Python client reads."""
    invalid = local_api.post(RUN, json={"image_url": "https://example.com/a.png", "prompt": "p", "num_frames": 5})
    assert invalid.status_code == 422
    assert [entry["loc"] for entry in invalid.json()["detail"]] == [["body", "first_audio_url"], ["body", "num_frames"]]
    assert invalid.json()["message"] == ("first_audio_url: Field required; "
                                         "num_frames: Input should be greater than or equal to 41")
    unknown = local_api.get(f"{REQUESTS}/00000000-0000-4000-8000-000000000000/status")
    assert unknown.status_code == 404 and unknown.json()["message"] == unknown.json()["detail"]
    too_large = local_api.post(RUN, content=b"x" * (65 * 1024), headers={"content-type": "application/json"})
    assert too_large.status_code == 413
    assert too_large.json()["error_type"] == "payload_too_large" and too_large.json()["message"] == too_large.json()["detail"]


def test_a_status_stream_rides_out_a_store_outage_and_ends_with_completed(local_api, monkeypatch):
    """A store error mid-stream used to end the response with an exception; now the stream waits the outage out."""
    store = local_api.app.state.services.store
    job = store.submit(AVATAR_MULTI.app_id, {"options": {}, "files": {}})
    store.claim("worker-1", lease_s=60)
    real_get, reads = store.get, []

    def get_during_an_outage(id):
        reads.append(id)
        if 2 <= len(reads) <= 4:  # the route's own read passes; the stream's next three find the store down
            raise sqlite3.OperationalError("disk I/O error")
        return real_get(id)

    monkeypatch.setattr(store, "get", get_during_an_outage)
    finisher = threading.Timer(1.0, store.finish, (job.id, "worker-1", "OK", {"status_code": 200, "body": {}}))
    finisher.start()
    events = _sse_events(local_api, f"{REQUESTS}/{job.id}/status/stream")
    finisher.join()
    assert len(reads) > 4 and events[-1]["status"] == "COMPLETED"

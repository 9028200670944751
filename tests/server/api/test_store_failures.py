"""The API when its job store is down, damaged or full: fal's flat 503 or 507, never a bare 500, nothing
half-accepted left behind, and probes that say so. In process, on real stores (a Redis port nobody listens on,
a SQLite file with damaged pages) and real errors (SQLITE_FULL, ENOSPC)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.api.routes import health
from server.app import create_app
from server.services import Services
from server.settings import Settings

from local_servers import free_port
from server_harness import (
    damage_sqlite_file,
    failing_first,
    no_space_error,
    sqlite_full_error,
)

SUBMIT = "/queue/fal-ai/ai-avatar/multi"


def _status_path(request_id: str) -> str:
    return f"/queue/fal-ai/ai-avatar/requests/{request_id}/status"


def _client(settings: Settings) -> Iterator[tuple[TestClient, Services]]:
    services = Services.from_settings(settings)
    # No `with`: the lifespan (embedded workers, housekeeping) is not started; the routes are what is tested.
    yield TestClient(create_app(settings, services), raise_server_exceptions=False), services
    services.close()


@pytest.fixture
def redis_down(tmp_path) -> Iterator[tuple[TestClient, Services]]:
    yield from _client(Settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0", workers=0))


@pytest.fixture
def on_sqlite(tmp_path) -> Iterator[tuple[TestClient, Services]]:
    yield from _client(Settings(data_dir=tmp_path, workers=0))


def _kept_files(services: Services) -> list[str]:
    return sorted(path.name for path in (services.files.root / "data").iterdir())


def _assert_flat_error(response, status_code: int, error_type: str, words: str) -> None:
    assert response.status_code == status_code, response.text
    body = response.json()
    assert body["error_type"] == error_type and words in body["detail"], body
    assert response.headers["x-fal-error-type"] == error_type


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_probes_answer_503_saying_the_store_is_unreachable(redis_down, path):
    client, _ = redis_down
    response = client.get(path)
    _assert_flat_error(response, 503, "store_unavailable", "unreachable")
    assert response.headers["retry-after"].isdigit()


def test_status_and_submit_answer_503_while_the_store_is_down_and_keep_nothing(redis_down, speech_request):
    client, services = redis_down
    _assert_flat_error(client.get(_status_path(str(uuid.uuid4()))), 503, "store_unavailable", "unreachable")
    _assert_flat_error(client.post(SUBMIT, json=speech_request), 503, "store_unavailable", "unreachable")
    assert _kept_files(services) == []


def test_a_damaged_store_answers_503_naming_the_damage(on_sqlite):
    client, services = on_sqlite
    jobs = [services.store.submit("fal-ai/ai-avatar/multi", {"n": n}) for n in range(20)]
    damage_sqlite_file(services.settings.data_path / "jobs.sqlite3")
    _assert_flat_error(client.get(_status_path(jobs[-1].id)), 503, "store_unavailable", "damaged")
    _assert_flat_error(client.get("/healthz"), 503, "store_unavailable", "damaged")


def test_a_submit_the_full_store_refuses_is_a_507_and_keeps_no_inputs(on_sqlite, speech_request, monkeypatch):
    client, services = on_sqlite
    monkeypatch.setattr(services.store, "submit", failing_first(services.store.submit, 1, sqlite_full_error()))
    _assert_flat_error(client.post(SUBMIT, json=speech_request), 507, "insufficient_storage", "free space")
    assert _kept_files(services) == []
    assert client.post(SUBMIT, json=speech_request).status_code == 200  # and carries on once there is room


def test_a_submit_on_a_full_disk_is_a_507(on_sqlite, speech_request, monkeypatch):
    client, services = on_sqlite
    monkeypatch.setattr(services.files, "add_file", failing_first(services.files.add_file, 1, no_space_error()))
    _assert_flat_error(client.post(SUBMIT, json=speech_request), 507, "insufficient_storage",
                       "no space left on device")


def test_a_disk_that_fills_between_two_inputs_keeps_neither(on_sqlite, speech_request, monkeypatch):
    client, services = on_sqlite
    add_file = services.files.add_file

    def full_after_the_first(*args, **kwargs):
        if _kept_files(services):
            raise no_space_error()
        return add_file(*args, **kwargs)

    monkeypatch.setattr(services.files, "add_file", full_after_the_first)
    _assert_flat_error(client.post(SUBMIT, json=speech_request), 507, "insufficient_storage",
                       "no space left on device")
    assert _kept_files(services) == []


def test_healthz_says_when_the_data_dir_is_full(on_sqlite, monkeypatch):
    client, _ = on_sqlite
    assert client.get("/healthz").json() == {"status": "ok"}
    monkeypatch.setattr(health.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    _assert_flat_error(client.get("/healthz"), 503, "insufficient_storage", "the data dir is full")

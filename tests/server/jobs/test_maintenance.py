"""The API's housekeeping: jobs of dead workers are retried or failed (with their webhook), and
finished jobs and stored files are deleted after the retention time, recent ones kept."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import pytest

from model.contract.fields import AVATAR_MULTI
from server.files.store import UnknownFile
from server.jobs import maintenance
from server.jobs.maintenance import delete_expired, sweep_expired_leases
from server.services import Services
from server.settings import Settings

from local_servers import free_port


def _services(tmp_path, **settings) -> tuple[Services, list]:
    services = Services.from_settings(Settings(data_dir=tmp_path, **settings))
    completed = []
    services.job_completed = completed.append  # what would send the webhooks
    return services, completed


def test_sweep_requeues_then_fails_a_job_whose_worker_died(tmp_path):
    services, completed = _services(tmp_path, max_attempts=2)
    store = services.store
    job = store.submit(AVATAR_MULTI.app_id, {"prompt": "x"}, webhook_url="https://example.com/hook")
    for attempt in (1, 2):
        assert store.claim("dead-worker", lease_s=0.05).id == job.id
        time.sleep(0.1)
        sweep_expired_leases(store, services.settings.max_attempts, services.job_completed)
    failed = store.get(job.id)
    assert (failed.status, failed.outcome, failed.error_type) == ("COMPLETED", "ERROR", "WorkerLost")
    assert [j.id for j in completed] == [job.id]  # one webhook, for the final failure only
    services.close()


def _finished_job(store, prompt: str):
    job = store.submit(AVATAR_MULTI.app_id, {"prompt": prompt})
    assert store.claim("w", lease_s=60).id == job.id
    store.finish(job.id, "w", "OK", {"status_code": 200, "body": {}})
    return job


def test_retention_deletes_old_jobs_and_files_and_keeps_recent_ones(tmp_path):
    services, _ = _services(tmp_path, retention_s=0.5)
    store, files = services.store, services.files
    old_job = _finished_job(store, "old")
    time.sleep(0.6)
    recent_job = _finished_job(store, "recent")
    queued_job = store.submit(AVATAR_MULTI.app_id, {"prompt": "queued"})
    source = tmp_path / "video.mp4"
    source.write_bytes(b"old")
    old_file = files.add_file(source, "video/mp4")
    source.write_bytes(b"new")
    new_file = files.add_file(source, "video/mp4")
    an_hour_ago = time.time() - 3600
    os.utime(services.files.path_for(old_file.id), (an_hour_ago, an_hour_ago))

    delete_expired(services)

    assert store.get(old_job.id) is None
    assert store.get(recent_job.id) is not None and store.get(queued_job.id) is not None
    assert services.files.get(new_file.id) and services.files.local_path(new_file.id).exists()
    with pytest.raises(UnknownFile):
        services.files.get(old_file.id)
    services.close()


def test_housekeeping_and_the_webhook_sender_log_a_store_outage_once_not_every_round(tmp_path, monkeypatch, caplog):
    """Rounds keep their pace through an outage; each loop says once that the store is down, with no traceback."""
    monkeypatch.setattr(maintenance, "SWEEP_EVERY_S", 0.01)
    services = Services.from_settings(Settings(data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                                               workers=0))
    services.webhooks.poll_s = 0.01

    def down() -> list[logging.LogRecord]:
        return [record for record in caplog.records if record.getMessage().startswith("store unusable")]

    async def some_rounds() -> None:
        """Until both loops have met the outage (however slow the machine), then many more rounds."""
        rounds = asyncio.create_task(maintenance.run_maintenance(services))
        deadline = time.monotonic() + 60
        while len({record.name for record in down()}) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # ≈ 50 more rounds of each loop
        rounds.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rounds

    try:
        with caplog.at_level(logging.INFO):
            asyncio.run(some_rounds())
    finally:
        services.close()
    assert sorted(record.name for record in down()) == ["multitalk.maintenance", "multitalk.webhooks"]
    assert not [record for record in caplog.records if record.exc_info]

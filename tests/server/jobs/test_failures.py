"""Store and storage failures are classified once: real errors of an outage, a damaged file and a full disk."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3

import pytest
import redis

from server.jobs import RedisJobStore, SqliteJobStore
from server.jobs.failures import StoreOutage, storage_failure

from local_servers import free_port
from server_harness import damage_sqlite_file, no_space_error, sqlite_full_error


def test_an_unreachable_redis_is_unavailable():
    store = RedisJobStore(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(redis.ConnectionError) as caught:
        store.get("any")
    failure = storage_failure(caught.value)
    assert (failure.kind, failure.status_code, failure.error_type) == ("unavailable", 503, "store_unavailable")
    assert "unreachable" in failure.detail
    store.close()


def test_a_full_sqlite_store_is_full_even_behind_its_failed_rollback():
    full = sqlite_full_error()
    assert storage_failure(full).kind == "full"
    db = sqlite3.connect(":memory:", isolation_level=None)
    try:
        try:
            raise full
        except sqlite3.OperationalError:
            db.execute("ROLLBACK")  # SQLite rolled back already: "cannot rollback - no transaction is active"
    except sqlite3.OperationalError as hiding:
        failure = storage_failure(hiding)
    assert (failure.kind, failure.status_code, failure.error_type) == ("full", 507, "insufficient_storage")
    assert "free space in the data dir" in failure.detail


def test_a_damaged_sqlite_file_is_unavailable_and_named_damaged(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    for n in range(20):
        store.submit("app", {"n": n})
    store.close()
    damage_sqlite_file(tmp_path / "jobs.sqlite3")
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    with pytest.raises(sqlite3.DatabaseError) as caught:
        db.execute("SELECT * FROM jobs WHERE status = 'IN_QUEUE'").fetchall()
    db.close()
    failure = storage_failure(caught.value)
    assert failure.kind == "unavailable" and "damaged" in failure.detail


def test_no_space_on_the_device_is_full_also_in_ffmpegs_words():
    assert storage_failure(no_space_error()).kind == "full"
    assert storage_failure(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))).kind == "full"
    ffmpeg = RuntimeError(f"ffmpeg failed writing output.mp4: output.mp4: {os.strerror(errno.ENOSPC)}")
    assert storage_failure(ffmpeg).kind == "full"


@pytest.mark.parametrize("error", [ValueError("bug"), FileNotFoundError(errno.ENOENT, "gone"),
                                   sqlite3.IntegrityError("UNIQUE constraint failed"),
                                   redis.ResponseError("WRONGTYPE Operation against a key"),
                                   RuntimeError("ffmpeg failed writing output.mp4: Invalid argument")])
def test_other_errors_are_not_storage_failures(error):
    assert storage_failure(error) is None


def test_an_outage_backs_off_capped_and_logs_each_change_once(caplog):
    outage = StoreOutage(logging.getLogger("test.outage"), "worker_id=w", first_wait_s=0.25, max_wait_s=2.0)
    down = storage_failure(redis.ConnectionError("refused"))
    with caplog.at_level(logging.INFO, logger="test.outage"):
        waits = [outage.failed(down) for _ in range(6)]
        outage.recovered()
        outage.recovered()
        again = outage.failed(down)
    assert waits == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0] and again == 0.25
    messages = [record.getMessage() for record in caplog.records]
    assert [m.split(" worker_id")[0] for m in messages] == ["store unusable", "store usable again", "store unusable"]
    assert "kind=unavailable" in messages[0] and "retries=6" in messages[1]

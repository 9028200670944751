"""Job stores on both backends for the store and webhook tests: the SQLite file, and a real redis-server
started for the session (skipped without the binary, a failure under MULTITALK_REQUIRE_REDIS=1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from server.jobs import open_job_store


@pytest.fixture(params=["sqlite", "redis"])
def spec(request, tmp_path) -> tuple[str | None, Path]:
    """open_job_store's arguments for one backend, fresh per test; picklable, for child processes."""
    if request.param == "sqlite":
        return None, tmp_path
    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    return url, tmp_path


@pytest.fixture
def store(spec):
    opened = open_job_store(*spec)
    yield opened
    opened.close()

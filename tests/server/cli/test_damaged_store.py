"""`multitalk serve` and `multitalk worker` on a damaged job store: the store's message, not a traceback."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_damaged_job_store_stops_the_command_with_what_to_do(tmp_path, command):
    (tmp_path / "jobs.sqlite3").write_bytes(b"not a database " * 512)
    done = subprocess.run([sys.executable, "-m", "server.cli.main", command, "--data-dir", str(tmp_path),
                           "--weights", "tiny"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"multitalk {command}: the job store {tmp_path / 'jobs.sqlite3'} is damaged" in done.stderr
    assert "move it aside" in done.stderr and "Traceback" not in done.stderr

"""Real `multitalk serve` / `multitalk worker` processes on 127.0.0.1 for the service tests.

Each process is the installed command line, started exactly as a user would (flags plus MULTITALK_*
variables), with its output in a log file that a failing test prints. Jobs run on the tiny weights
at a small frame size and one step (`--frame-size`, `--steps`), so a video takes seconds on a CPU.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from local_servers import free_port, redis_binary_or_skip, wait_for_redis
from repo_paths import REPO_ROOT

FAST_JOBS = ("--frame-size", "32x64", "--steps", "1")
START_TIMEOUT_S = 180.0


@dataclass
class Process:
    """One started command; `log` holds its stdout and stderr."""

    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as when the host or the OOM killer takes it."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    """An API and its workers sharing one data dir (and, optionally, one Redis)."""

    data_dir: Path
    weights: Path
    redis_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _environment(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MULTITALK_")}
        env.update({"MULTITALK_DATA_DIR": str(self.data_dir), "MULTITALK_WEIGHTS": str(self.weights),
                    "MULTITALK_PUBLIC_URL": self.url, "MULTITALK_DEVICE": "cpu", **self.env, **extra})
        if self.redis_url:
            env["MULTITALK_REDIS_URL"] = self.redis_url
        return env

    def _start(self, args: list[str], extra_env: dict[str, str]) -> Process:
        log = self.data_dir / f"process-{len(self.processes)}-{args[0]}.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "server.cli.main", *args], stdout=out, stderr=subprocess.STDOUT,
                                    env=self._environment(extra_env), cwd=REPO_ROOT)
        process = Process(proc, log)
        self.processes.append(process)
        return process

    def start_api(self, *args: str, workers: int = 1, **env: str) -> Process:
        process = self._start(["serve", "--port", str(self.port), "--workers", str(workers), *FAST_JOBS, *args], env)
        self.wait_until(lambda: self._get("/healthz") == 200, process, "the API to answer /healthz")
        return process

    def start_worker(self, *args: str, **env: str) -> Process:
        return self._start(["worker", *FAST_JOBS, *args], env)

    def wait_ready(self, workers: int = 1, process: Process | None = None) -> None:
        """Until /readyz lists `workers` workers with their model loaded."""
        def ready() -> bool:
            response = httpx.get(f"{self.url}/readyz", timeout=5)
            return sum(w.get("state") == "ready" for w in response.json()["workers"]) >= workers

        self.wait_until(ready, process, f"{workers} ready worker(s)")

    def wait_until(self, condition, process: Process | None = None, what: str = "a condition",
                   timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process is not None and not process.alive():
                raise AssertionError(f"process exited while waiting for {what}:\n{process.output()[-4000:]}")
            try:
                if condition():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        logs = "\n".join(p.output()[-3000:] for p in self.processes)
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}\n{logs}")

    def _get(self, path: str) -> int:
        return httpx.get(f"{self.url}{path}", timeout=5).status_code

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop(timeout_s=30)


class RestartableRedis:
    """A redis-server with `appendonly` on a fixed port and folder, which a test can stop and start again:
    a Redis restart (an outage of a few seconds) that keeps its data."""

    def __init__(self, folder: Path):
        self.binary, self.folder, self.port = redis_binary_or_skip(), folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--dir", str(self.folder)], stdout=subprocess.DEVNULL)
        wait_for_redis(self.url, self.proc, timeout_s=30)

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file and exits, as in a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None


# --- Store faults on cue, for in-process tests: real errors of the kinds an outage or a full disk raises. ---


def sqlite_full_error() -> sqlite3.OperationalError:
    """A real SQLITE_FULL ("database or disk is full"), from a scratch database capped by `max_page_count`."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (x TEXT)")
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    try:
        db.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,))
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        db.close()
    raise AssertionError("max_page_count did not stop the insert")


def no_space_error() -> OSError:
    """A real ENOSPC, from writing to /dev/full."""
    try:
        with open("/dev/full", "wb") as full:
            full.write(b"x")
    except OSError as exc:
        return exc
    raise AssertionError("/dev/full took a write")


def damage_sqlite_file(path: Path) -> None:
    """Overwrite every page but the first (the header and schema) with garbage, as a failing disk might,
    after moving the WAL's pages into the file."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = 4096
    with path.open("r+b") as file:
        file.seek(page)
        file.write(b"\xa5" * (path.stat().st_size - page))


def failing_first(call, times: int, error: BaseException):
    """`call`, except that its first `times` calls raise `error`; `.calls` counts every call."""
    def flaky(*args, **kwargs):
        flaky.calls += 1
        if flaky.calls <= times:
            raise error
        return call(*args, **kwargs)

    flaky.calls = 0
    return flaky


def point_fal_client_at(cluster: Cluster, monkeypatch) -> None:
    """Every host the unmodified `fal_client` knows, pointed at `cluster` (PEERS_AND_PROTOCOL.md §B.3 option 2)."""
    import fal_client

    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{cluster.url}/")
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{cluster.url}/queue/")
    monkeypatch.setattr(fal_client.client, "REST_URL", cluster.url)
    monkeypatch.setattr(fal_client.client, "CDN_URL", cluster.url)

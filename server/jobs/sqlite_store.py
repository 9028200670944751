"""The job store in one SQLite file: the default, embedded, nothing to set up, survives restarts.

Several processes on one host (the API and its workers) may open the same file. WAL mode lets
readers run beside the one writer; every change is one short `BEGIN IMMEDIATE` transaction, which
takes the database's write lock before reading, so a bounded submit or a claim is atomic across
processes, not just threads. Writers that find the lock taken wait (busy timeout) instead of failing.
Statistics counters live in `stats`, changed in the transaction that changes the job; heartbeats in
`workers`, whose expired rows the next heartbeat deletes. The webhook outbox is the jobs' webhook
columns, with an index of the pending ones by due time.

A file that SQLite cannot read in full (a damaged header, a truncated file, a damaged page found by
`PRAGMA quick_check` when the store opens) is refused with DamagedJobStore, instead of serving a
store whose every read fails.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from server.jobs.failures import sqlite_damage
from server.jobs.store import (
    COMPLETED,
    IN_PROGRESS,
    IN_QUEUE,
    JOB_FIELDS,
    OUTCOMES,
    WEBHOOK_PENDING,
    Job,
    JobStore,
    WorkerInfo,
    check_room,
    stat_increments,
)

_BUSY_TIMEOUT_S = 30.0

# `seq` orders the queue by submission; a re-queued job keeps its row, hence its place.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    app TEXT NOT NULL,
    input TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL,
    outcome TEXT,
    result TEXT,
    error TEXT,
    error_type TEXT,
    webhook_url TEXT,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL,
    worker_id TEXT,
    lease_expires_at REAL,
    owner TEXT,
    webhook_state TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_due_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_status_lease ON jobs (status, lease_expires_at);
CREATE INDEX IF NOT EXISTS jobs_by_status_finished ON jobs (status, finished_at);
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    message TEXT NOT NULL,
    level TEXT NOT NULL,
    source TEXT NOT NULL,
    timestamp REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_job ON logs (job_id, seq);
CREATE TABLE IF NOT EXISTS stats (
    name TEXT PRIMARY KEY,
    value NUMERIC NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    seen_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
"""
# Columns added after the first release: a file made before them gets them on open.
_ADDED_COLUMNS = {"owner": "TEXT", "webhook_state": "TEXT", "webhook_attempts": "INTEGER NOT NULL DEFAULT 0",
                  "webhook_due_at": "REAL"}
# Created after the columns are added, since an older file lacks them until then.
_WEBHOOK_INDEX = ("CREATE INDEX IF NOT EXISTS jobs_by_webhook_due ON jobs (webhook_due_at) "
                  "WHERE webhook_due_at IS NOT NULL")
_INSERT = f"INSERT INTO jobs ({', '.join(JOB_FIELDS)}) VALUES ({', '.join(':' + f for f in JOB_FIELDS)})"
_UPDATE = f"UPDATE jobs SET {', '.join(f'{f} = :{f}' for f in JOB_FIELDS if f != 'id')} WHERE id = :id"
_ADD_STAT = ("INSERT INTO stats (name, value) VALUES (?, ?) "
             "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value")
_SAVE_WORKER = ("INSERT INTO workers (id, info, seen_at, expires_at) VALUES (:id, :info, :seen_at, :expires_at) "
                "ON CONFLICT (id) DO UPDATE SET info = excluded.info, seen_at = excluded.seen_at, "
                "expires_at = excluded.expires_at")


class DamagedJobStore(sqlite3.DatabaseError):
    """The job store's file is damaged; the server refuses to start on it rather than fail every read."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"the job store {path} is damaged ({reason}). Stop every process using it, move it aside "
                         f"(with its -wal and -shm files, if any) and start again: the server then starts with an "
                         f"empty job store")


class _ThreadConnection:
    """A thread's connection, held only by that thread's `threading.local`: when the thread ends, Python
    drops its locals and this closes the connection. `lock` is held while the connection is in use, so
    that `close` from another thread waits for the statement running on it: closing a connection under
    a running statement crashes the interpreter (a segfault, not an exception)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.lock = threading.Lock()
        weakref.finalize(self, db.close)


class SqliteJobStore(JobStore):
    """Jobs in the SQLite file at `path` (created with its folder if missing).

    One connection per thread, opened on first use and closed when the thread ends (server thread
    pools retire idle threads: keeping their connections open leaked a file descriptor per retired
    thread) or when the store closes, whichever comes first; a closed store refuses every call. Open a
    new store in a forked child rather than using one created before the fork (SQLite connections
    must not cross a fork)."""

    def __init__(self, path: Path | str):
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()  # the threads' live ones
        self._connections_lock = threading.Lock()
        self._closed = False
        try:
            self._check_intact()
            with self._connection() as db:
                db.execute("PRAGMA journal_mode=WAL")  # stored in the file: every later connection uses it
            with self._write() as db:
                for statement in _SCHEMA.split(";"):
                    db.execute(statement)
                columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
                for name, definition in _ADDED_COLUMNS.items():
                    if name not in columns:  # a job store made before this column existed
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
                db.execute(_WEBHOOK_INDEX)
        except sqlite3.DatabaseError as exc:  # e.g. "file is not a database": a damaged header
            self.close()
            if isinstance(exc, DamagedJobStore) or sqlite_damage(exc) is None:  # a lock or an I/O error is no damage
                raise
            raise DamagedJobStore(self._path, str(exc)) from exc

    def _check_intact(self) -> None:
        """Read every page once (PRAGMA quick_check): a damaged page would otherwise only show when a
        read reaches it, with the server already up and answering."""
        with self._connection() as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise DamagedJobStore(self._path, "; ".join(problems[:3]))

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, held for the block: read every row inside it."""
        owned = getattr(self._local, "connection", None)
        if owned is None:
            with self._connections_lock:
                if self._closed:
                    raise sqlite3.ProgrammingError(f"the job store {self._path} is closed")
                # isolation_level=None: no implicit transactions, each change is an explicit one below.
                db = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                                     check_same_thread=False)
                db.row_factory = sqlite3.Row
                owned = self._local.connection = _ThreadConnection(db)
                self._connections.add(owned)
        with owned.lock:
            if self._closed:
                raise sqlite3.ProgrammingError(f"the job store {self._path} is closed")
            yield owned.db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction holding the write lock from its first statement on."""
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLITE_FULL and others roll back by themselves; a ROLLBACK would hide them
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        """Close every thread's connection, each once the statement running on it (if any) is done."""
        with self._connections_lock:
            self._closed = True
            for owned in list(self._connections):
                with owned.lock:
                    owned.db.close()
            self._connections.clear()

    def get(self, id: str) -> Job | None:
        with self._connection() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (id,)).fetchone()
        return None if row is None else Job.from_record(dict(row))

    def queue_position(self, id: str) -> int:
        # When the job is not queued the inner SELECT is NULL, `seq < NULL` is never true: 0.
        with self._connection() as db:
            return db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = :queued AND seq < "
                "(SELECT seq FROM jobs WHERE id = :id AND status = :queued)", {"id": id, "queued": IN_QUEUE},
            ).fetchone()[0]

    def logs(self, id: str, since: int = 0) -> list[dict[str, Any]]:
        with self._connection() as db:
            rows = db.execute(
                "SELECT message, level, source, timestamp FROM logs WHERE job_id = ? ORDER BY seq LIMIT -1 OFFSET ?",
                (id, since),
            ).fetchall()
        return [dict(row) for row in rows]

    def counts(self) -> dict[str, Any]:
        counts: dict[str, Any] = {"queued": 0, "running": 0, "completed": dict.fromkeys(OUTCOMES, 0)}
        with self._connection() as db:
            rows = db.execute("SELECT status, outcome, COUNT(*) FROM jobs GROUP BY status, outcome").fetchall()
            pending = db.execute("SELECT COUNT(*) FROM jobs WHERE webhook_due_at IS NOT NULL").fetchone()[0]
        for status, outcome, n in rows:
            if status == COMPLETED:
                counts["completed"][outcome] = n
            else:
                counts["queued" if status == IN_QUEUE else "running"] += n
        counts["webhooks_pending"] = pending
        return counts

    def forget_worker(self, worker_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def _now(self) -> float:
        return time.time()

    def _insert(self, job: Job, max_queue: int | None) -> None:
        with self._write() as db:
            if max_queue is not None:
                queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (IN_QUEUE,)).fetchone()[0]
                check_room(queued, max_queue)
            db.execute(_INSERT, job.to_record())

    def _claim(self, change: Callable[[Job], Job]) -> Job | None:
        with self._write() as db:
            row = db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (IN_QUEUE,)).fetchone()
            return _apply(db, row, change)[1]

    def _update(self, id: str, change: Callable[[Job], Job | None]) -> tuple[Job | None, Job | None]:
        with self._write() as db:
            return _apply(db, db.execute("SELECT * FROM jobs WHERE id = ?", (id,)).fetchone(), change)

    def _expired_ids(self, now: float) -> list[str]:
        with self._connection() as db:
            rows = db.execute("SELECT id FROM jobs WHERE status = ? AND lease_expires_at < ? ORDER BY seq",
                              (IN_PROGRESS, now)).fetchall()
        return [id for (id,) in rows]

    def _push_log(self, id: str, entry: dict[str, Any]) -> None:
        with self._write() as db:
            db.execute("INSERT INTO logs (job_id, message, level, source, timestamp) "
                       "VALUES (:job_id, :message, :level, :source, :timestamp)", {"job_id": id, **entry})

    def _webhooks_due_at(self, now: float) -> list[tuple[str, str]]:
        with self._connection() as db:
            rows = db.execute("SELECT id, webhook_url FROM jobs WHERE webhook_due_at <= ? ORDER BY webhook_due_at",
                              (now,)).fetchall()
        return [(id, url) for id, url in rows]

    def _delete_finished(self, before: float) -> list[str]:
        with self._write() as db:
            ids = [id for (id,) in db.execute("SELECT id FROM jobs WHERE status = ? AND finished_at < ? "
                                              "AND webhook_state IS NOT ?", (COMPLETED, before, WEBHOOK_PENDING))]
            db.executemany("DELETE FROM logs WHERE job_id = ?", [(id,) for id in ids])
            db.executemany("DELETE FROM jobs WHERE id = ?", [(id,) for id in ids])
        return ids

    def _read_stats(self) -> dict[str, float]:
        with self._connection() as db:
            return dict(db.execute("SELECT name, value FROM stats").fetchall())

    def _save_worker(self, worker: WorkerInfo, expires_at: float) -> None:
        with self._write() as db:
            db.execute("DELETE FROM workers WHERE expires_at <= ?", (worker.seen_at,))
            db.execute(_SAVE_WORKER, {"id": worker.id, "info": json.dumps(worker.info), "seen_at": worker.seen_at,
                                      "expires_at": expires_at})

    def _workers_alive_at(self, now: float) -> list[WorkerInfo]:
        with self._connection() as db:
            rows = db.execute("SELECT id, info, seen_at FROM workers WHERE expires_at > ?", (now,)).fetchall()
        return [WorkerInfo(id=id, seen_at=seen_at, info=json.loads(info)) for id, info, seen_at in rows]


def _apply(db: sqlite3.Connection, row: sqlite3.Row | None,
           change: Callable[[Job], Job | None]) -> tuple[Job | None, Job | None]:
    """Inside a write transaction: the job in `row`, changed and saved with the statistics its change
    adds; (before, after)."""
    if row is None:
        return None, None
    before = Job.from_record(dict(row))
    after = change(before)
    if after is not None:
        db.execute(_UPDATE, after.to_record())
        db.executemany(_ADD_STAT, stat_increments(before, after).items())
    return before, after

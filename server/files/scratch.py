"""Scratch folders that outlive no process, even one that is killed.

A worker writes each job's video into a folder of its own, and the API stages each request's fetched
inputs in one before they move into the file store; each removes its folder when done. A SIGKILL (the
OOM killer, a container's hard stop, a host's `kill -9`) skips that removal, and nothing else would
ever remove the folder. So each process makes one scratch folder for its life, holding an exclusive
`flock` on it, and makes those folders inside it; and each process, before making its own, removes
the scratch folders whose lock it can take. The kernel drops a process's locks when it dies, however
it dies, so a lock that can be taken means a dead owner. A lock rather than a pid: pids are reused,
and repeat across containers and hosts that share a temp dir; a lock is never mistaken for another's.

The lock is on the folder itself, not on a file inside it, so a folder never exists without its lock
being decidable: its maker locks it right after creating it and then checks that the path still
names the folder it locked (a sweeping process may have taken the lock first and removed it; the
maker then tries a new one). systemd-tmpfiles also leaves a directory alone while it is `flock`ed,
so a long-idle process's folder is not aged out of /tmp underneath it.

The folders live in the system temp dir (`TMPDIR`, else /tmp), where these folders were kept before,
rather than in the data dir: scratch is per host and per process, while the data dir may be shared by
hosts over NFS (see docker-compose.yml), where `flock` is only as good as the network file system's
lock manager, and a host that saw another host's live folder as unlocked would delete it mid-job.
Where /tmp is a small tmpfs (memory-backed in some container setups), point `TMPDIR` at a disk: a
folder holds one request's inputs while they are checked, or one job's video until it is stored.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("multitalk.scratch")

SCRATCH_PREFIX = "multitalk-scratch-"


@dataclass(frozen=True)
class ScratchDir:
    """One process's scratch folder, locked while `lock_fd` stays open: for the process's life."""

    path: Path
    lock_fd: int

    @classmethod
    def create(cls, root: Path) -> ScratchDir:
        """Remove the dead processes' scratch folders under `root`, then make and lock this one's."""
        remove_dead_scratch(root)
        while True:  # only a concurrent sweep that took the new folder's lock first makes it go round again
            path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=root))
            lock_fd = _lock_if_free(path)
            if lock_fd is not None:
                logger.info("scratch folder ready path=%s", path)
                return cls(path, lock_fd)

    def make_dir(self, prefix: str) -> Path:
        """A new empty folder for one job or request. Its user removes it; if this process is killed
        first, the next process to start removes it with this scratch folder."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.path))


def remove_dead_scratch(root: Path) -> None:
    """Remove every scratch folder under `root` whose lock is free: its process is dead."""
    for path in sorted(root.glob(f"{SCRATCH_PREFIX}*")):
        lock_fd = _lock_if_free(path)
        if lock_fd is None:  # alive, already gone, or not ours to open
            continue
        try:
            shutil.rmtree(path)
        except OSError as error:
            logger.warning("could not remove a dead process's scratch folder path=%s error=%s", path, error)
        else:
            logger.info("removed a dead process's scratch folder path=%s", path)
        finally:
            os.close(lock_fd)


def _lock_if_free(path: Path) -> int | None:
    """A descriptor holding the exclusive lock on folder `path`; None when a live process holds it, or when
    the folder is gone, was replaced, or cannot be opened (another user's). Any other failure (a file
    system without `flock`) is raised, not taken for a held lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    locked = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = os.path.samestat(os.fstat(fd), os.stat(path))
    except (BlockingIOError, FileNotFoundError):  # held by a live process; removed meanwhile
        pass
    finally:
        if not locked:
            os.close(fd)
    return fd if locked else None


_process_scratch: ScratchDir | None = None
_process_scratch_made = threading.Lock()


def process_scratch() -> ScratchDir:
    """This process's scratch folder in the system temp dir, made on first use (its workers and its API share it).

    A child forked later inherits the descriptor, and with it the lock: the folder lives while either does.
    """
    global _process_scratch
    with _process_scratch_made:
        if _process_scratch is None:
            _process_scratch = ScratchDir.create(Path(tempfile.gettempdir()))
        return _process_scratch

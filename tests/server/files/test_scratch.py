"""Scratch folders: a process killed with SIGKILL leaves its folder behind, and the next process to start
removes it; a live process's folder, in this process or another, is kept whatever its name says."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.files.scratch import SCRATCH_PREFIX, ScratchDir

from repo_paths import REPO_ROOT

# Another process with a scratch folder and a job folder in it (a file inside), until it is killed.
OTHER_PROCESS = """
import sys, time
from pathlib import Path
from server.files.scratch import ScratchDir
job = ScratchDir.create(Path(sys.argv[1])).make_dir("job-")
(job / "output.mp4").write_bytes(b"half a video")
print(job, flush=True)
time.sleep(600)
"""


class OtherProcess:
    def __init__(self, root: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, str(root)], stdout=subprocess.PIPE,
                                     text=True, cwd=REPO_ROOT)
        line = self.proc.stdout.readline().strip()
        assert line, "the other process did not make its job folder"
        self.job_dir = Path(line)
        self.scratch = self.job_dir.parent

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self.proc.stdout.close()


@pytest.fixture
def other_process(tmp_path) -> Iterator[OtherProcess]:
    other = OtherProcess(tmp_path)
    yield other
    other.kill()


def test_a_killed_process_folder_is_removed_by_the_next_start(tmp_path, other_process, caplog):
    other_process.kill()  # SIGKILL: its own cleanup never runs
    assert other_process.job_dir.is_dir()
    with caplog.at_level(logging.INFO, logger="multitalk.scratch"):
        mine = ScratchDir.create(tmp_path)
    assert not other_process.scratch.exists()
    assert f"removed a dead process's scratch folder path={other_process.scratch}" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [mine.path.name]


def test_a_live_process_folder_is_kept(tmp_path, other_process):
    mine = ScratchDir.create(tmp_path)
    assert other_process.job_dir.is_dir()
    assert mine.path != other_process.scratch and mine.path.parent == tmp_path


def test_two_in_one_process_keep_each_other(tmp_path):
    """Several workers of one process (or one temp dir) each have a folder; a new one keeps the others."""
    first = ScratchDir.create(tmp_path)
    job = first.make_dir("job-")
    second = ScratchDir.create(tmp_path)
    assert job.is_dir() and job.parent == first.path and second.path != first.path


def test_an_unlocked_folder_is_dead_whatever_pid_its_name_holds(tmp_path):
    """Pids are reused: a folder named after a live pid (this one's) but unlocked belongs to no one."""
    orphan = tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-abcdefgh"
    (orphan / "job-12345678-xyz").mkdir(parents=True)
    ScratchDir.create(tmp_path)
    assert not orphan.exists()


def test_other_folders_in_the_temp_dir_are_left_alone(tmp_path):
    unrelated = tmp_path / "multitalk-job-12345678-abc"  # what earlier versions made, or anyone else's
    unrelated.mkdir()
    ScratchDir.create(tmp_path)
    assert unrelated.is_dir()

"""A full disk while the file store writes leaves nothing behind: no partial copy, no file without its metadata."""

from __future__ import annotations

import errno
import os

import pytest

from server.files import store as file_store
from server.files.store import LocalFileStore

from server_harness import no_space_error


def _everything_under(root) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


def test_a_copy_that_runs_out_of_space_leaves_no_partial_file(tmp_path, monkeypatch):
    files = LocalFileStore(tmp_path / "files", "http://127.0.0.1:8000")
    video = tmp_path / "output.mp4"
    video.write_bytes(b"v" * 10_000)

    def copy_half_then_run_out(source, destination):  # as shutil.move copies across file systems
        with open(destination, "wb") as out:
            out.write(b"v" * 5_000)
        raise no_space_error()

    monkeypatch.setattr(file_store.shutil, "move", copy_half_then_run_out)
    with pytest.raises(OSError) as caught:
        files.add_file(video, "video/mp4")
    assert caught.value.errno == errno.ENOSPC
    assert _everything_under(files.root) == []


def test_metadata_that_cannot_be_written_takes_its_data_along(tmp_path, monkeypatch):
    files = LocalFileStore(tmp_path / "files", "http://127.0.0.1:8000")
    video = tmp_path / "output.mp4"
    video.write_bytes(b"v" * 10_000)
    real_replace = os.replace

    def full_for_metadata(source, destination):
        if str(destination).endswith(".json"):
            raise no_space_error()
        real_replace(source, destination)

    monkeypatch.setattr(file_store.os, "replace", full_for_metadata)
    with pytest.raises(OSError):
        files.add_file(video, "video/mp4")
    assert _everything_under(files.root) == []

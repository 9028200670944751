"""Fetch a weights layout from the Hugging Face Hub into the folders the loader reads: checked, resumable, once.

Why not simply `hf_hub_download(local_dir=...)` or `snapshot_download`:
- huggingface_hub 2.x writes every transfer to a process-unique temporary file and deletes it when the
  transfer fails, so an interrupted 10 GB shard would start again from zero. Here the transfer uses
  huggingface_hub's own pieces — `get_hf_file_metadata` (HEAD /resolve) and `http_get` (GET with a Range
  header, in-run retries, its tqdm progress bar), both honouring HF_TOKEN — but into
  `<dest>/.downloads/<etag>.incomplete`, which outlives a failed run and is resumed by the next one.
- `local_dir` copies a file that is already in the HF cache. Here a file whose blob is in the cache
  (HF_HUB_CACHE, else HF_HOME/hub; blobs are named by the Hub's ETag) is hard-linked into place — one
  inode, no second copy, still there after `hf cache delete` — or symlinked when the cache is on another
  filesystem. Everything else is downloaded straight into the weights folder, not into the cache: the
  ~80 GB then land on the disk the user chose with --dir, the one the free-space check looked at.
- Files are placed under the exact names `layout.find_layout` looks for (see manifest.py), never
  renamed or linked by hand afterwards.

Checks: the size and the Hub's ETag — sha256 for LFS files, the git blob sha1 for small ones — are
verified before a download is moved into place; a mismatch deletes the bad bytes and names the file.
What was verified is recorded (size, mtime, ETag) in `<dest>/.downloads/verified.json`, so a re-run skips
those files without hashing them again or asking the Hub about each one. All files of a repo come from
the commit its revision pointed to at the first file fetched, so shards and index always match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, HfFileMetadata, RepoFile, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, http_get, repo_folder_name
from huggingface_hub.utils import build_hf_headers, tqdm

from model.weights.manifest import LAYOUTS, LORA_DIR, LORAS

logger = logging.getLogger(__name__)

STATE_DIR = ".downloads"
_CHUNK = 8 * 2**20
_HASH_BAR_FROM = 64 * 2**20  # hashing smaller files is too quick to need a progress bar


class DownloadError(RuntimeError):
    """A download that cannot go on; the message says which file and what to do."""


class ChecksumMismatch(DownloadError):
    """A file's bytes are not what the Hub published."""


class NotEnoughSpace(DownloadError):
    """The files still to fetch do not fit on the destination disk."""


@dataclass(frozen=True)
class PlannedFile:
    """One file to fetch: where it is published and where the loader will look for it."""

    repo_id: str
    revision: str
    filename: str  # path inside the repo
    local_path: Path
    size: int | None = None
    sha256: str | None = None  # LFS files
    git_sha1: str | None = None  # files kept in git itself (configs, indexes)

    @property
    def etag(self) -> str | None:
        """The Hub's ETag for this file, which also names its blob in the HF cache."""
        return self.sha256 or self.git_sha1

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.revision}: {self.filename}"


def hub_endpoint() -> str:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, when it is imported)."""
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """The HF cache as configured now: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def human_size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def plan_download(layout: str, dest: Path, loras: Iterable[str] = ()) -> list[PlannedFile]:
    """Every file of `layout` plus the named LoRAs, with its place under `dest` (no network)."""
    if layout not in LAYOUTS:
        raise DownloadError(f"unknown layout {layout!r}: use one of {sorted(LAYOUTS)}")
    unknown = sorted(set(loras) - set(LORAS))
    if unknown:
        raise DownloadError(f"unknown LoRA {', '.join(unknown)}: use one of {sorted(LORAS)}")
    dest = Path(dest)
    plan = [PlannedFile(repo.repo_id, repo.revision, name, dest / repo.folder / name)
            for repo in LAYOUTS[layout] for name in repo.files]
    plan += [PlannedFile(lora.repo_id, lora.revision, lora.filename, dest / LORA_DIR / lora.target)
             for lora in (LORAS[name] for name in dict.fromkeys(loras))]
    return plan


def _unreachable(exc: Exception) -> bool:
    """No network, offline mode, or the Hub failing: not the user's or the manifest's fault."""
    if isinstance(exc, (httpx2.TransportError, OfflineModeIsEnabled)):
        return True
    return isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code >= 500


def fill_sizes(plan: list[PlannedFile], *, endpoint: str | None = None) -> list[PlannedFile]:
    """`plan` with the size and checksum of every file, asked with one paths-info call per repo and revision.

    When the Hub cannot be reached the plan comes back unchanged (sizes None): a dry run still lists
    every file and a re-run can still skip the files verified before. A file the Hub does not have is
    an error naming it, raised before anything is downloaded.
    """
    api = HfApi(endpoint=endpoint or hub_endpoint())
    wanted: dict[tuple[str, str], list[str]] = {}
    for item in plan:
        wanted.setdefault((item.repo_id, item.revision), []).append(item.filename)
    found: dict[tuple[str, str, str], RepoFile] = {}
    for (repo_id, revision), names in wanted.items():
        try:
            infos = api.get_paths_info(repo_id, names, revision=revision)
        except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as exc:
            if _unreachable(exc):
                logger.warning("hub_unreachable endpoint=%s error=%s", api.endpoint, exc)
                return list(plan)
            raise DownloadError(f"{repo_id}@{revision}: {exc}") from exc
        found.update({(repo_id, revision, info.path): info for info in infos if isinstance(info, RepoFile)})
    missing = [item.label for item in plan if (item.repo_id, item.revision, item.filename) not in found]
    if missing:
        raise DownloadError("not on the Hub (is the manifest out of date?):\n  " + "\n  ".join(missing))
    return [_with_info(item, found[item.repo_id, item.revision, item.filename]) for item in plan]


def _with_info(item: PlannedFile, info: RepoFile) -> PlannedFile:
    if info.lfs is not None:
        return replace(item, size=info.lfs.size, sha256=info.lfs.sha256)
    return replace(item, size=info.size, git_sha1=info.blob_id)


def file_etag(path: Path, like: str) -> str:
    """The Hub's ETag of the bytes in `path`, of the kind of `like`: sha256 (64 hex digits) or git blob sha1 (40)."""
    size = path.stat().st_size
    if len(like) == 64:
        digest = hashlib.sha256()
    elif len(like) == 40:
        digest = hashlib.sha1(b"blob %d\0" % size)
    else:
        raise DownloadError(f"cannot verify {path}: the Hub's ETag {like!r} is neither a sha256 nor a git sha1")
    with path.open("rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"verify {path.name}",
                                    disable=size < _HASH_BAR_FROM) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _problem(path: Path, etag: str, size: int | None) -> str | None:
    """Why `path` is not the published file, or None when it is."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size {actual_size:,} bytes, the Hub says {size:,}"
    actual = file_etag(path, etag)
    kind = "sha256" if len(etag) == 64 else "git sha1"
    return None if actual == etag else f"{kind} {actual}, the Hub says {etag}"


class _Verified:
    """Files verified before, by path under the weights root: their ETag, size and mtime when checked."""

    def __init__(self, dest: Path):
        self.dest = Path(dest)
        self.path = self.dest / STATE_DIR / "verified.json"
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def _key(self, path: Path) -> str:
        return path.relative_to(self.dest).as_posix()

    def holds(self, item: PlannedFile) -> bool:
        entry = self.entries.get(self._key(item.local_path))
        if entry is None or not item.local_path.is_file():
            return False
        stat = item.local_path.stat()
        unchanged = (entry["size"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
        return unchanged and item.etag in (None, entry["etag"])

    def add(self, path: Path, etag: str) -> None:
        stat = path.stat()
        self.entries[self._key(path)] = {"etag": etag, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        os.replace(staging, self.path)


def _partial(dest: Path, etag: str) -> Path:
    return Path(dest) / STATE_DIR / f"{etag}.incomplete"


def _cache_blob(cache_dir: Path, item: PlannedFile) -> Path:
    return cache_dir / repo_folder_name(repo_id=item.repo_id, repo_type="model") / "blobs" / item.etag


def pending_bytes(plan: list[PlannedFile], dest: Path, *, cache_dir: Path | None = None) -> list[int | None]:
    """Bytes each file still has to transfer: 0 when it is in place (verified, or of the right size and
    hashed later) or in the HF cache; its size less any partial download otherwise; None if unknown."""
    cache_dir = cache_dir or hub_cache_dir()
    verified = _Verified(dest)
    return [_pending(item, dest, verified, cache_dir) for item in plan]


def _pending(item: PlannedFile, dest: Path, verified: _Verified, cache_dir: Path) -> int | None:
    in_place = item.local_path.is_file() and item.local_path.stat().st_size == item.size
    if verified.holds(item) or in_place or (item.etag and _cache_blob(cache_dir, item).is_file()):
        return 0
    if item.size is None or item.etag is None:
        return item.size
    partial = _partial(dest, item.etag)
    return max(item.size - (partial.stat().st_size if partial.is_file() else 0), 0)


def existing_ancestor(path: Path) -> Path:
    """`path`, or its closest ancestor that exists: where a folder made on first use will live, so
    its disk can be measured before it exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(plan: list[PlannedFile], dest: Path, *, cache_dir: Path | None = None) -> int:
    """Refuse to start when what is still to fetch does not fit on `dest`'s disk (or cannot be sized
    because the Hub was not reachable); returns the bytes still to fetch."""
    pending = pending_bytes(plan, dest, cache_dir=cache_dir)
    unsized = [item.label for item, n in zip(plan, pending) if n is None]
    if unsized:
        raise DownloadError(f"{len(unsized)} files are not in {dest} yet and the Hub could not be reached to fetch "
                            f"them (check the network, HF_ENDPOINT, HF_HUB_OFFLINE), e.g. {unsized[0]}")
    needed = sum(pending)
    free = shutil.disk_usage(existing_ancestor(dest)).free
    if needed > free:
        raise NotEnoughSpace(
            f"not enough disk space in {dest}: {human_size(needed)} still to download, only {human_size(free)} free. "
            "Free some space or choose a folder on a larger disk with --dir."
        )
    return needed


def _link(source: Path, target: Path) -> None:
    """Put `source` at `target` without copying it: a hard link, or a symlink across filesystems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        os.symlink(source, target)


def _from_cache(item: PlannedFile, cache_dir: Path) -> bool:
    """Place the HF cache's copy of `item`, if it has a good one."""
    blob = _cache_blob(cache_dir, item)
    if not blob.is_file():
        return False
    _link(blob.resolve(), item.local_path)
    problem = _problem(item.local_path, item.etag, item.size)
    if problem:
        logger.warning("cache_blob_rejected blob=%s problem=%s", blob, problem)
        item.local_path.unlink()
    return problem is None


def _same_origin(a: str, b: str) -> bool:
    return urlsplit(a)[:2] == urlsplit(b)[:2]


def _fetch(item: PlannedFile, dest: Path, endpoint: str, commits: dict[tuple[str, str], str]) -> str:
    """Download `item` (resuming a partial file), verify it and move it into place; returns its ETag."""
    revision = commits.get((item.repo_id, item.revision), item.revision)
    url = hf_hub_url(item.repo_id, item.filename, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint, retry_on_errors=True)
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as exc:
        raise DownloadError(f"{item.label}: {exc}") from exc
    commits.setdefault((item.repo_id, item.revision), meta.commit_hash)
    partial = _partial(dest, meta.etag)
    _resume(item, url, meta, partial)
    problem = _problem(partial, meta.etag, meta.size)
    if problem:
        partial.unlink()
        raise ChecksumMismatch(f"{item.label}: downloaded file rejected ({problem}); it was deleted, run again")
    item.local_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, item.local_path)
    return meta.etag


def _resume(item: PlannedFile, url: str, meta: HfFileMetadata, partial: Path) -> None:
    """Append the rest of the file to `partial`: a Range request from its current size, kept on failure."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    if meta.size is not None and partial.is_file() and partial.stat().st_size > meta.size:
        partial.unlink()
    headers = build_hf_headers()
    if not _same_origin(url, meta.location):
        headers.pop("authorization", None)  # a CDN's signed URL must not receive the Hub token
    try:
        with partial.open("ab") as f:
            http_get(meta.location, f, resume_size=f.tell(), headers=headers, expected_size=meta.size,
                     displayed_filename=item.filename)
    except (HfHubHTTPError, httpx2.TransportError, OSError) as exc:
        kept = partial.stat().st_size if partial.is_file() else 0
        raise DownloadError(f"{item.label}: {exc}\nThe {human_size(kept)} received are kept in {partial}; "
                            "run the download again to resume.") from exc


def download(plan: list[PlannedFile], dest: Path, *, endpoint: str | None = None,
             cache_dir: Path | None = None) -> dict[Path, str]:
    """Get every file of `plan` (made for weights root `dest`) into place; returns how each one was got.

    Skips files verified before, adopts files already at their place or in the HF cache once they
    verify, and downloads the rest. Stops at the first file that cannot be got, keeping its partial
    download; once every file is in place, partial downloads of since-updated files are removed.
    """
    endpoint = endpoint or hub_endpoint()
    cache_dir = cache_dir or hub_cache_dir()
    verified = _Verified(dest)
    commits: dict[tuple[str, str], str] = {}
    outcome: dict[Path, str] = {}
    for item in plan:
        if verified.holds(item):
            outcome[item.local_path] = "verified before"
            continue
        if item.etag and item.local_path.is_file() and _problem(item.local_path, item.etag, item.size) is None:
            how, etag = "already in place", item.etag
        elif item.etag and _from_cache(item, cache_dir):
            how, etag = "linked from the HF cache", item.etag
        else:
            how, etag = "downloaded", _fetch(item, dest, endpoint, commits)
        verified.add(item.local_path, etag)
        outcome[item.local_path] = how
        logger.info("weights_file path=%s via=%s", item.local_path, how.replace(" ", "_"))
    for stale in (Path(dest) / STATE_DIR).glob("*.incomplete"):
        stale.unlink()
    return outcome


def download_weights(layout: str, dest: Path, loras: Iterable[str] = (), *, endpoint: str | None = None,
                     cache_dir: Path | None = None) -> dict[Path, str]:
    """Plan, size, check the disk, download: what `multitalk weights download` does."""
    plan = fill_sizes(plan_download(layout, dest, loras), endpoint=endpoint)
    check_free_space(plan, dest, cache_dir=cache_dir)
    return download(plan, dest, endpoint=endpoint, cache_dir=cache_dir)

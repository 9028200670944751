"""`multitalk weights download` against a fake Hub on 127.0.0.1: placement, resume, checksums, cache, disk, token.

The fake implements just what the download path calls — POST paths-info, HEAD/GET /resolve with the
Hub's headers (X-Repo-Commit, ETag; LFS files answer 302 to a "CDN" on another port with
X-Linked-Etag / X-Linked-Size, as the Hub does), and Range requests — and can drop a connection
half-way, answer 503 or send corrupted bytes. Every test points HF_ENDPOINT at it (or at a closed
port) and HF_HOME into tmp_path, so nothing here can reach the real Hub or the user's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import namedtuple
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

import pytest
from huggingface_hub import constants, hf_hub_download

from model.speech import synthesis
from model.speech.voices import VOICE_CHOICES, local_voice
from model.weights import manifest
from model.weights.download import (
    STATE_DIR,
    ChecksumMismatch,
    DownloadError,
    NotEnoughSpace,
    PlannedFile,
    download,
    download_weights,
    fill_sizes,
    hub_cache_dir,
    human_size,
    plan_download,
)
from server.cli.main import main

from local_servers import free_port
from repo_paths import REPO_ROOT

LFS_SUFFIXES = {".safetensors", ".pth", ".bin", ".model", ".pt"}


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repos (name, revision → files), fault injection per file name, and a log of every request."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.blobs: dict[str, tuple[str, bytes]] = {}  # sha256 → (file name, bytes), what the CDN serves
        self.faults: dict[str, list[str]] = {}  # file name → what the next GETs of its bytes do: drop, 503, corrupt
        self.requests: list[dict] = []
        self.url = self.cdn_url = ""

    def add(self, repo_id: str, revision: str, filename: str, data: bytes) -> None:
        for rev in (revision, self.commit(repo_id, revision)):
            self.repos.setdefault((repo_id, rev), {})[filename] = data
        self.blobs[hashlib.sha256(data).hexdigest()] = (filename, data)

    @staticmethod
    def commit(repo_id: str, revision: str) -> str:
        return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()

    def requests_to(self, server: str, method: str | None = None) -> list[dict]:
        return [r for r in self.requests if r["server"] == server and method in (None, r["method"])]

    @contextmanager
    def running(self) -> Iterator["FakeHub"]:
        servers = []
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.role, server.fake, server.daemon_threads = role, self, True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
        try:
            yield self
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self._record()
        body = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        repo_id, revision = self.path.removeprefix("/api/models/").split("/paths-info/")
        files = self.server.fake.repos.get((repo_id, unquote(revision)))
        if files is None:
            return self._reply(404, {"X-Error-Code": "RevisionNotFound"})
        listing = [_path_info(path, files[path]) for path in body["paths"] if path in files]
        self._reply(200, {"Content-Type": "application/json"}, json.dumps(listing).encode())

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _record(self) -> None:
        self.server.fake.requests.append({"server": self.server.role, "method": self.command, "path": unquote(self.path),
                                          "headers": {k.lower(): v for k, v in self.headers.items()}})

    def _serve(self, head: bool) -> None:
        self._record()
        fake = self.server.fake
        if self.server.role == "cdn":
            filename, data = fake.blobs[self.path.removeprefix("/cdn/")]
            return self._body(filename, data, {}, head)
        repo_id, rest = self.path.lstrip("/").split("/resolve/", 1)
        revision, filename = (unquote(part) for part in rest.split("/", 1))
        files = fake.repos.get((repo_id, revision), {})
        headers = {"X-Repo-Commit": fake.commit(repo_id, revision) if (repo_id, revision) in fake.repos else revision}
        if filename not in files:
            return self._reply(404, {**headers, "X-Error-Code": "EntryNotFound"})
        data = files[filename]
        if Path(filename).suffix not in LFS_SUFFIXES:
            return self._body(filename, data, {**headers, "ETag": f'"{_git_sha1(data)}"'}, head)
        sha = hashlib.sha256(data).hexdigest()
        self._reply(302, {**headers, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                          "Location": f"{fake.cdn_url}/cdn/{sha}"})

    def _body(self, filename: str, data: bytes, headers: dict, head: bool) -> None:
        fault = None if head or not self.server.fake.faults.get(filename) else self.server.fake.faults[filename].pop(0)
        if fault == "503":
            return self._reply(503, headers)
        if fault == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if "Range" in self.headers else 0
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send_response(206 if start else 200)
        for key, value in {**headers, "Content-Length": str(len(data) - start)}.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        body = data[start:]
        if fault == "drop":  # promise the whole body, send half, hang up
            body, self.close_connection = body[: len(body) // 2], True
        self.wfile.write(body)

    def _reply(self, status: int, headers: dict, body: bytes = b"") -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


def _path_info(path: str, data: bytes) -> dict:
    info = {"type": "file", "path": path, "size": len(data), "oid": _git_sha1(data)}
    if Path(path).suffix in LFS_SUFFIXES:
        info["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return info


def _random_bytes(item: PlannedFile) -> bytes:
    """Distinct, reproducible content per file; LFS-like files big enough to be cut in half meaningfully."""
    size = 2**18 if Path(item.filename).suffix in LFS_SUFFIXES else 200
    return hashlib.shake_256(item.label.encode()).digest(size)


def _serve(hub: FakeHub, plan: list[PlannedFile], content: Callable[[PlannedFile], bytes] = _random_bytes) -> dict[Path, bytes]:
    served = {}
    for item in plan:
        served[item.local_path] = content(item)
        hub.add(item.repo_id, item.revision, item.filename, served[item.local_path])
    return served


@pytest.fixture(autouse=True)
def _isolated_hub_env(monkeypatch, tmp_path):
    """No test reaches the real Hub or the user's HF cache: a closed port and a private HF_HOME."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def hub(monkeypatch) -> Iterator[FakeHub]:
    with FakeHub().running() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "weights"


def _wav2vec_plan(dest: Path) -> list[PlannedFile]:
    """The three chinese-wav2vec2-base files (two revisions): small, yet LFS and git files both."""
    return [item for item in plan_download("multitalk", dest) if item.repo_id == "TencentGameMate/chinese-wav2vec2-base"]


def _fetch(plan: list[PlannedFile], dest: Path) -> dict[Path, str]:
    return download(fill_sizes(plan), dest)


def test_manifest_places_files_where_the_loader_and_presets_look():
    from model.sampling.acceleration import recipe_for
    from model.weights import layout

    assert (manifest.WAN_ORIGINAL_DIR, manifest.WAN_DIFFUSERS_DIR, manifest.MULTITALK_DIR, manifest.WAV2VEC_DIR) == (
        layout.WAN_ORIGINAL_DIR, layout.WAN_DIFFUSERS_DIR, layout.MULTITALK_DIR, layout.WAV2VEC_DIR)
    assert manifest.KOKORO_DIR == synthesis.KOKORO_DIR
    assert {synthesis.CONFIG_FILE, synthesis.MODEL_FILE} <= set(manifest.KOKORO.files)
    assert {f"{synthesis.VOICES_DIR}/{voice_id}.pt" for voice_id in map(local_voice, VOICE_CHOICES)} <= \
        set(manifest.KOKORO.files)
    for name in (layout.T5_FILE, layout.CLIP_FILE, layout.VAE_FILE, layout.INDEX_FILE):
        assert name in manifest.WAN_ORIGINAL.files
    assert set(manifest.MULTITALK_ORIGINAL.files) == {layout.ADAPTER_FILE, layout.INDEX_FILE}
    loras = [Path(lora.target).stem for lora in manifest.LORAS.values()]
    assert recipe_for("regular", "480p", loras).lora == Path(manifest.LORAS["fusionx"].target).stem
    assert recipe_for("high", "480p", loras).lora == Path(manifest.LORAS["lightx2v"].target).stem


@pytest.mark.parametrize("layout", ["multitalk", "diffusers"])
def test_dry_run_lists_every_file_offline(layout, dest, capsys):
    assert main(["weights", "download", "--layout", layout, "--dir", str(dest), "--dry-run",
                 "--with-lora", "fusionx", "--with-lora", "lightx2v"]) == 0
    out = capsys.readouterr().out
    plan = plan_download(layout, dest, ["fusionx", "lightx2v"])
    for item in plan:
        assert f"?  {item.local_path.relative_to(dest).as_posix()}" in out
        assert f"{item.repo_id} @ {item.revision}" in out
    assert f"(from {manifest.LORAS['fusionx'].filename})" in out
    assert f"total: {len(plan)} files, ?" in out
    assert not dest.exists()


def test_dry_run_shows_sizes_and_total_from_the_hub(hub, dest, capsys):
    served = _serve(hub, plan_download("diffusers", dest))
    assert main(["weights", "download", "--layout", "diffusers", "--dir", str(dest), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"sizes from {hub.url}" in out
    assert "262.14 kB  Wan2.1-I2V-14B-480P-Diffusers/transformer/diffusion_pytorch_model-00014-of-00014.safetensors" in out
    total = human_size(sum(map(len, served.values())))
    assert f"total: {len(served)} files, {total}; still to download: {total}" in out
    assert not hub.requests_to("hub", "GET") and not hub.requests_to("cdn")


def test_download_puts_every_file_where_the_loader_finds_it(hub, dest, tiny_weights, capsys):
    """Tiny checkpoints served under the real names: after the download `inspect_weights` says OK."""
    tiny = tiny_weights["multitalk"]

    def content(item: PlannedFile) -> bytes:
        twin = tiny / item.local_path.relative_to(dest)
        return twin.read_bytes() if twin.is_file() else _random_bytes(item)

    served = _serve(hub, plan_download("multitalk", dest, ["fusionx", "lightx2v"]), content)
    argv = ["weights", "download", "--dir", str(dest), "--with-lora", "fusionx", "--with-lora", "lightx2v"]
    assert main(argv) == 0
    assert "layout check (multitalk): OK" in capsys.readouterr().out
    for path, data in served.items():
        assert path.read_bytes() == data, path

    hub.requests.clear()
    assert main(argv) == 0  # a re-run: nothing fetched, nothing re-hashed, one listing call per repo
    out = capsys.readouterr().out
    assert f"{len(served)} files in {dest}: {len(served)} verified before" in out
    assert {r["method"] for r in hub.requests} == {"POST"} and not hub.requests_to("cdn")


def test_diffusers_download_uses_the_diffusers_folders(hub, dest):
    served = _serve(hub, plan_download("diffusers", dest))
    outcome = download_weights("diffusers", dest)
    assert set(outcome.values()) == {"downloaded"}
    for path, data in served.items():
        assert path.read_bytes() == data
    assert (dest / manifest.WAN_DIFFUSERS_DIR / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (dest / manifest.MULTITALK_DIR / "multitalk.safetensors").is_file()


def test_interrupted_download_resumes_with_a_range_request(hub, dest, monkeypatch):
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 2**14)  # http_get writes whole chunks only
    plan = _wav2vec_plan(dest)
    served = _serve(hub, plan)
    weights = dest / manifest.WAV2VEC_DIR / "model.safetensors"
    hub.faults["model.safetensors"] = ["drop", "503"]  # cut half-way, then the Hub fails the in-run retry
    with pytest.raises(DownloadError, match="(?s)model.safetensors.*run the download again to resume"):
        _fetch(plan, dest)
    half = len(served[weights]) // 2
    assert [p.stat().st_size for p in (dest / STATE_DIR).glob("*.incomplete")] == [half]
    assert not weights.exists()

    hub.requests.clear()
    assert _fetch(plan, dest)[weights] == "downloaded"
    assert [r["headers"].get("range") for r in hub.requests_to("cdn", "GET")] == [f"bytes={half}-"]
    assert weights.read_bytes() == served[weights]
    assert not list((dest / STATE_DIR).glob("*.incomplete"))


def test_corrupted_download_is_rejected_and_deleted(hub, dest):
    plan = _wav2vec_plan(dest)
    served = _serve(hub, plan)
    weights = dest / manifest.WAV2VEC_DIR / "model.safetensors"
    hub.faults["model.safetensors"] = ["corrupt"]
    with pytest.raises(ChecksumMismatch, match=r"chinese-wav2vec2-base@refs/pr/1: model.safetensors.*sha256"):
        _fetch(plan, dest)
    assert not weights.exists() and not list((dest / STATE_DIR).glob("*.incomplete"))

    _fetch(plan, dest)  # the next run fetches it cleanly
    assert weights.read_bytes() == served[weights]


def test_hf_cache_entry_is_linked_not_downloaded_again(hub, dest):
    plan = _wav2vec_plan(dest)
    _serve(hub, plan)
    cached = {item.local_path: Path(hf_hub_download(item.repo_id, item.filename, revision=item.revision,
                                                    cache_dir=hub_cache_dir(), endpoint=hub.url))
              for item in plan}
    hub.requests.clear()
    outcome = _fetch(plan, dest)
    assert set(outcome.values()) == {"linked from the HF cache"}
    assert not hub.requests_to("hub", "GET") and not hub.requests_to("hub", "HEAD") and not hub.requests_to("cdn")
    for path, in_cache in cached.items():
        assert os.path.samefile(path, in_cache)  # the same bytes on disk: no second copy


def test_rerun_without_network_keeps_verified_files_and_names_missing_ones(hub, dest, monkeypatch):
    plan = _wav2vec_plan(dest)
    _serve(hub, plan)
    _fetch(plan, dest)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert set(_fetch(plan, dest).values()) == {"verified before"}
    with pytest.raises(DownloadError, match="files are not in .* yet and the Hub could not be reached"):
        download_weights("multitalk", dest)


def test_free_disk_check_refuses_before_downloading(hub, dest, monkeypatch):
    needed = human_size(sum(map(len, _serve(hub, plan_download("multitalk", dest)).values())))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10**6, 10**6 - 1000, 1000))
    message = f"not enough disk space in {dest}: {needed} still to download, only 1.00 kB free"
    with pytest.raises(NotEnoughSpace, match=re.escape(message) + ".*--dir"):
        download_weights("multitalk", dest)
    assert not hub.requests_to("hub", "HEAD") and not hub.requests_to("cdn")


def test_hf_token_goes_to_the_hub_as_bearer_and_not_to_the_cdn(hub, dest, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    _serve(hub, _wav2vec_plan(dest))
    _fetch(_wav2vec_plan(dest), dest)
    assert {r["headers"].get("authorization") for r in hub.requests_to("hub")} == {"Bearer hf_fake_token"}
    assert hub.requests_to("cdn") and not any("authorization" in r["headers"] for r in hub.requests_to("cdn"))


def test_file_missing_on_the_hub_is_named_before_anything_is_fetched(hub, dest):
    plan = plan_download("multitalk", dest)
    _serve(hub, [item for item in plan if item.filename != "Wan2.1_VAE.pth"])
    with pytest.raises(DownloadError, match="Wan-AI/Wan2.1-I2V-14B-480P@main: Wan2.1_VAE.pth"):
        download_weights("multitalk", dest)
    assert not hub.requests_to("cdn")


def test_script_runs_the_same_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "download_weights.py"), "--dry-run",
                             "--dir", str(tmp_path / "w"), "--layout", "diffusers"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"total: {len(plan_download('diffusers', tmp_path / 'w'))} files, ?" in result.stdout

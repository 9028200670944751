"""`multitalk doctor`: can this machine (or container) serve MultiTalk, and if not, what to change.

Each check is a small function returning a `Check`, so the command, its `--json` output and the
tests share them. A check fails when serving would not work (missing weights, unreachable Redis, an
invalid setting, no writable data dir); it warns when serving works but not as intended (no GPU, so
CPU only; less memory than the guidance). The exit code is 1 when a check failed, else 0. Nothing
here changes the machine: the tiny demo weights, for one, are announced, not created.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping
from urllib.parse import urlsplit, urlunsplit

from model.runtime.memory_budget import DEFAULT_GPU_BYTES, MemoryCase, predict
from model.weights.download import existing_ancestor
from server.settings import OPTIONS, Settings, load_settings

Status = Literal["ok", "warn", "fail"]
GB = 1000**3

MIN_PYTHON = (3, 10)  # pyproject.toml's requires-python
# The pipeline runs the transformer and T5 in bf16 on CUDA, which GPUs before Ampere only emulate.
MIN_COMPUTE_CAPABILITY = (8, 0)
# The data dir holds the job store, uploads, fetched inputs and videos (a few MB each) until retention.
DATA_DISK_MIN_BYTES = 1 * GB
DATA_DISK_RECOMMENDED_BYTES = 20 * GB
# Only these settings steer the checks; the settings check validates all the others.
DOCTOR_SETTINGS = ("weights", "data_dir", "redis_url", "device", "weight_storage", "offload")
CUDA_WHEEL_INDEX = "https://download.pytorch.org/whl/cu126"  # the Dockerfile's


@dataclass(frozen=True)
class Check:
    """One finding: what was looked at, how it stands, and (unless ok) the one thing to do about it."""

    name: str
    status: Status
    detail: str
    fix: str | None = None  # one sentence, whenever status is not "ok"


def _gb(size: int) -> str:
    return f"{size / GB:.1f} GB"


# --- Python and torch ---------------------------------------------------------------------------

def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Check:
    """The interpreter, with its path: a wrong venv is the usual cause of every other surprise."""
    shown = ".".join(map(str, version))
    if version[:2] < MIN_PYTHON:
        return Check("python", "fail", f"Python {shown}", f"Use Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer (CI and the Docker image use 3.11).")
    return Check("python", "ok", f"Python {shown} at {sys.executable}")


def check_torch() -> Check:
    """Whether torch imports and was built for CUDA (pip's default wheel on some platforms is CPU-only)."""
    try:
        import torch
    except ImportError as exc:
        return Check("torch", "fail", f"torch cannot be imported: {exc}", "Install torch, then this project (scripts/install.sh torch; scripts/install.sh project .).")
    if torch.version.cuda is None:
        plain = torch.__version__.split("+")[0]
        return Check("torch", "warn", f"torch {torch.__version__}, a CPU-only build",
                     f"To use a GPU, install a CUDA build: pip install torch=={plain} --index-url {CUDA_WHEEL_INDEX}.")
    return Check("torch", "ok", f"torch {torch.__version__}, built for CUDA {torch.version.cuda}")


# --- GPU ----------------------------------------------------------------------------------------

def nvidia_driver() -> str | None:
    """The driver version nvidia-smi reports, None without nvidia-smi or a GPU it can talk to."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def _cuda_index(device: str) -> int:
    """The GPU a `--device` setting means (auto and cuda: the first one)."""
    _, _, index = device.partition(":")
    return int(index) if index else 0


def _no_gpu_fix(torch_cuda: str | None, driver: str | None) -> str:
    if torch_cuda is None:
        return f"Install a CUDA build of torch (pip install torch --index-url {CUDA_WHEEL_INDEX}), as the Docker image has."
    if driver is not None:
        return (f"nvidia-smi sees driver {driver} but torch cannot use the GPU: make sure that driver supports "
                f"CUDA {torch_cuda} and that CUDA_VISIBLE_DEVICES does not hide the GPU.")
    return ("Run on a machine with an NVIDIA GPU and driver; in Docker, also install the NVIDIA Container Toolkit "
            "and pass --gpus all (docker-compose.yml reserves one GPU per worker).")


def check_gpu(device: str = "auto") -> Check:
    """GPU presence and identity; no GPU warns (CPU serving works, slowly) unless the device setting demands CUDA."""
    import torch

    driver = nvidia_driver()
    wants_cuda = device.startswith("cuda")
    if not torch.cuda.is_available():
        status: Status = "fail" if wants_cuda else "warn"
        consequence = (f"MULTITALK_DEVICE={device} cannot start" if wants_cuda
                       else "generation would run on the CPU, practical only for the tiny demo weights")
        return Check("gpu", status, f"no GPU: torch sees no CUDA device; {consequence}", _no_gpu_fix(torch.version.cuda, driver))
    count = torch.cuda.device_count()
    index = _cuda_index(device) if wants_cuda else 0
    if index >= count:
        return Check("gpu", "fail", f"MULTITALK_DEVICE={device} but {count} GPU(s) are visible",
                     f"Set MULTITALK_DEVICE to one of cuda:0 .. cuda:{count - 1}, or to auto.")
    name = torch.cuda.get_device_name(index)
    capability = torch.cuda.get_device_capability(index)
    detail = (f"{name} (cuda:{index} of {count}), compute capability {capability[0]}.{capability[1]}, "
              f"torch CUDA {torch.version.cuda}, driver {driver or 'unknown (no nvidia-smi on PATH)'}")
    if capability < MIN_COMPUTE_CAPABILITY:
        return Check("gpu", "warn", detail, "Use an Ampere or newer GPU (compute capability 8.0+): the pipeline runs in bf16, which older GPUs emulate slowly.")
    return Check("gpu", "ok", detail)


def gpu_memory(device: str = "auto") -> tuple[int, int] | None:
    """(free, total) bytes of the GPU the worker would use, None without one."""
    import torch

    if not torch.cuda.is_available() or device.startswith("cpu"):
        return None
    return torch.cuda.mem_get_info(_cuda_index(device))


def _memory_case(resolution: str, weight_storage: str, offload: str) -> MemoryCase:
    """A two-speaker request with 3 guidance passes (`none` and the TeaCache presets: the most activations)."""
    return MemoryCase(resolution, 2, 3, weight_storage, offload)


def check_vram(weights: str, memory: tuple[int, int] | None, weight_storage: str = "bf16",
               offload: str = "none") -> Check:
    """Free GPU memory (`memory` from `gpu_memory`) against the memory plan's predicted peak for the published
    weights under the configured options (`model.runtime.memory_budget`): a 480p request must fit, 720p should."""
    if weights == "tiny":
        shown = f"{_gb(memory[0])} free of {_gb(memory[1])}; " if memory else ""
        return Check("vram", "ok", f"{shown}the tiny demo weights need little memory")
    total = memory[1] if memory else DEFAULT_GPU_BYTES
    p480, p720 = (predict(_memory_case(resolution, weight_storage, offload), gpu_bytes=total)
                  for resolution in ("480p", "720p"))
    if memory is None:
        return Check("vram", "warn", "no GPU memory to measure",
                     f"Fix the gpu check: the real model wants a GPU with about {_gb(p480.gpu_peak_bytes)} free "
                     f"for 480p ({_gb(p720.gpu_peak_bytes)} for 720p).")
    free = memory[0]
    text = "CPU memory" if p480.text_encoder_on_cpu else "the GPU"
    detail = (f"{_gb(free)} free of {_gb(total)} (weight storage {weight_storage}, offload {offload}; predicted peak "
              f"{_gb(p480.gpu_peak_bytes)} at 480p, {_gb(p720.gpu_peak_bytes)} at 720p, text encoder in {text})")
    fix = ("Free the GPU (see nvidia-smi for other processes), use a bigger one, or save memory: "
           "MULTITALK_WEIGHT_STORAGE=fp8 (Ada/Hopper) or int8 halves the transformer's weights, and "
           "MULTITALK_OFFLOAD=blocks streams them from CPU memory (docs/benchmarks.md has the predicted table).")
    if free < p480.gpu_peak_bytes:
        return Check("vram", "fail", f"{detail}: a 480p request would not fit", fix)
    if free < p720.gpu_peak_bytes:
        return Check("vram", "warn", f"{detail}: 480p fits, 720p requests may not", fix)
    return Check("vram", "ok", detail)


# --- RAM and disk -------------------------------------------------------------------------------

def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field (its values are in kB, i.e. KiB)."""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return fields


def _cgroup_memory_limit() -> int | None:
    """A container's memory limit (cgroup v2), which /proc/meminfo does not show."""
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def system_memory() -> tuple[int, int] | None:
    """(available, total) bytes of RAM, within a container's limit; None where neither source exists."""
    try:
        info = parse_meminfo(Path("/proc/meminfo").read_text())
        total, available = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError):
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total, available = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
        except (OSError, ValueError):
            return None
    limit = _cgroup_memory_limit()
    if limit is not None and limit < total:
        total, available = limit, min(available, limit)
    return available, total


def check_ram(weights: str, memory: tuple[int, int] | None, weight_storage: str = "bf16", offload: str = "none",
              gpu_bytes: int | None = None) -> Check:
    """The machine's (or container's) RAM against the memory plan's predicted host memory for the published weights:
    the larger of start-up (a quantised or offloaded transformer is converted on the CPU) and serving (offloaded
    blocks pinned, the text encoder when it lives in CPU memory)."""
    if weights == "tiny":
        return Check("ram", "ok", (f"{_gb(memory[0])} available of {_gb(memory[1])}; " if memory else "")
                     + "the tiny demo weights need little memory")
    needed = predict(_memory_case("480p", weight_storage, offload), gpu_bytes=gpu_bytes or DEFAULT_GPU_BYTES).host_bytes
    if memory is None:
        return Check("ram", "warn", "could not read the memory size", "Make sure the host or container has at least "
                     f"{_gb(needed)} of RAM for the real weights (weight storage {weight_storage}, offload {offload}).")
    available, total = memory
    detail = f"{_gb(available)} available of {_gb(total)}; predicted need {_gb(needed)} " \
             f"(weight storage {weight_storage}, offload {offload})"
    if total < needed:
        return Check("ram", "fail", detail, f"Give the machine, or the container's memory limit, at least {_gb(needed)} "
                     "of RAM, or use MULTITALK_OFFLOAD=none on a GPU that holds the weights.")
    return Check("ram", "ok", detail)


def check_disk(data_dir: Path) -> Check:
    """Free space and write access where jobs, uploads and videos go."""
    existing = existing_ancestor(data_dir)
    shown = str(data_dir) if existing == data_dir.absolute() else f"{data_dir} (to be created in {existing})"
    if not os.access(existing, os.W_OK):
        return Check("disk", "fail", f"data dir {shown} is not writable by uid {os.getuid()}",
                     "Make it writable by this user (chown; in Docker, uid 1000) or set --data-dir / MULTITALK_DATA_DIR elsewhere.")
    free = shutil.disk_usage(existing).free
    detail = f"{_gb(free)} free for data dir {shown}"
    fix = f"Free space or point --data-dir / MULTITALK_DATA_DIR at a disk with at least {_gb(DATA_DISK_RECOMMENDED_BYTES)} free."
    if free < DATA_DISK_MIN_BYTES:
        return Check("disk", "fail", detail, fix)
    if free < DATA_DISK_RECOMMENDED_BYTES:
        return Check("disk", "warn", detail, fix)
    return Check("disk", "ok", detail)


# --- ffmpeg, weights, Redis, settings -----------------------------------------------------------

def check_ffmpeg() -> Check:
    """The ffmpeg binary inside the imageio-ffmpeg wheel, which writes every video; run once to prove it executes."""
    import imageio_ffmpeg

    fix = "Reinstall imageio-ffmpeg (pip install --force-reinstall imageio-ffmpeg) or set IMAGEIO_FFMPEG_EXE to an ffmpeg binary."
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
        done = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return Check("ffmpeg", "fail", f"no working ffmpeg: {exc}", fix)
    if done.returncode != 0:
        return Check("ffmpeg", "fail", f"{exe} -version exited with {done.returncode}", fix)
    version = done.stdout.split(" Copyright")[0].strip() or "ffmpeg"
    return Check("ffmpeg", "ok", f"{version} at {exe}")


def check_weights(weights: str) -> Check:
    """The checkpoint layout, read from file headers only (`multitalk weights check` in one line)."""
    if weights == "tiny":
        return Check("weights", "ok", "tiny demo weights: random (videos show noise), made on first use in the data dir")
    from model.weights.layout import inspect_weights

    report = inspect_weights(Path(weights))
    if report["ok"]:
        transformer = report["transformer"]
        return Check("weights", "ok", f"{report['layout']} layout at {weights}: transformer of "
                     f"{transformer['parameters']['total']:,} parameters ({', '.join(transformer['dtypes'])})")
    problems = report["problems"]
    more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
    return Check("weights", "fail", "; ".join(problems[:2]) + more,
                 f"Point --weights / MULTITALK_WEIGHTS (in Docker: the /weights mount) at the checkpoint folder, or fetch it "
                 f"with `multitalk weights download --dir {weights}`; `multitalk weights check {weights}` lists every missing file.")


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def check_redis(url: str | None) -> Check:
    """Reachability of the shared job store, when one is configured."""
    if not url:
        return Check("redis", "ok", "not used: jobs are kept in SQLite in the data dir")
    import redis

    shown = _without_password(url)
    fix = (f"Start Redis or correct MULTITALK_REDIS_URL (now {shown}); in docker-compose.yml it is "
           "redis://redis:6379/0, reachable from the api and worker services only.")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    except ValueError as exc:
        return Check("redis", "fail", f"invalid URL {shown}: {exc}", fix)
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("redis", "fail", f"{shown} unreachable: {exc}", fix)
    finally:
        client.close()
    return Check("redis", "ok", f"{shown} answers")


def check_settings(environ: Mapping[str, str]) -> Check:
    """Every MULTITALK_* variable parses and the combination is valid, as `serve` and `worker` will check."""
    try:
        load_settings(None, environ)
    except ValueError as exc:
        return Check("settings", "fail", str(exc), "Correct the variable named above (docs/configuration.md lists each setting).")
    names = sorted(option.env for option in OPTIONS if option.env in environ)
    return Check("settings", "ok", ("valid: " + ", ".join(names)) if names else "all defaults (no MULTITALK_* variables set)")


# --- the command --------------------------------------------------------------------------------

def doctor_settings(args: argparse.Namespace | None, environ: Mapping[str, str]) -> Settings:
    """The settings the checks look at, from doctor's flags and those settings' variables only, so
    that an invalid unrelated variable is reported by the settings check instead of stopping the doctor."""
    wanted = {option.env for option in OPTIONS if option.name in DOCTOR_SETTINGS}
    return load_settings(args, {key: value for key, value in environ.items() if key in wanted})


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    """A check that crashed is a failed check, so one broken component never hides the others."""
    try:
        return check()
    except Exception as exc:  # any error at all: it is the check's result
        return Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}",
                     "Fix the error above (a broken install?) and run multitalk doctor again.")


def run_checks(settings: Settings, environ: Mapping[str, str]) -> list[Check]:
    """Every check, in the order a person would fix things: interpreter and settings, GPU, memory, files, services."""
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("python", check_python),
        ("settings", lambda: check_settings(environ)),
        ("torch", check_torch),
        ("gpu", lambda: check_gpu(settings.device)),
        ("vram", lambda: check_vram(settings.weights, gpu_memory(settings.device), settings.weight_storage,
                                    settings.offload)),
        ("ram", lambda: check_ram(settings.weights, system_memory(), settings.weight_storage, settings.offload,
                                  (gpu_memory(settings.device) or (None, None))[1])),
        ("disk", lambda: check_disk(settings.data_path)),
        ("ffmpeg", check_ffmpeg),
        ("weights", lambda: check_weights(settings.weights)),
        ("redis", lambda: check_redis(settings.redis_url)),
    ]
    return [_guarded(name, check) for name, check in checks]


def render_text(checks: list[Check]) -> str:
    """One line a check, its fix indented below it, and a summary line last."""
    lines = []
    for check in checks:
        lines.append(f"{check.status.upper():4}  {check.name:8}  {check.detail}")
        if check.fix:
            lines.append(f"{'':16}fix: {check.fix}")
    failed = sum(check.status == "fail" for check in checks)
    warned = sum(check.status == "warn" for check in checks)
    lines.append(f"{failed} failed, {warned} warning(s)" if failed or warned else "all checks passed")
    return "\n".join(lines)


def run_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(doctor_settings(args, os.environ), os.environ)
    ok = all(check.status != "fail" for check in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [asdict(check) for check in checks]}, indent=2))
    else:
        print(render_text(checks))
    return 0 if ok else 1


def add_doctor_parser(commands) -> None:
    parser = commands.add_parser("doctor", help="check this machine: Python, torch, GPU, VRAM, RAM, disk, ffmpeg, weights, Redis")
    for option in OPTIONS:
        if option.name in DOCTOR_SETTINGS and option.flag:
            parser.add_argument(option.flag, dest=option.name, type=option.parse, default=None, help=f"{option.help} [env {option.env}]")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.set_defaults(handler=run_doctor)

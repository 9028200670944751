"""Every setting of `multitalk serve` and `multitalk worker`, defined once.

`OPTIONS` is the single table: each entry names the setting, its environment variable, its
command-line flag (if it has one), its type, default and help. The CLI flags, the environment
reading and the settings table in docs/configuration.md are all derived from it (a test checks
the docs against it), so they cannot drift apart. Precedence: flag, then environment, then default.
"""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from model.contract.errors import InputError
from model.contract.fields import FIELDS, FRAME_SIZE, STEPS, RequestField
from model.runtime.execution import OFFLOAD_MODES, WEIGHT_MODES, ExecutionOptions
from server.files.s3_store import parse_storage_url

MiB = 1024 * 1024


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none", "unlimited") else int(text)


def _word_set(text: str) -> frozenset[str]:
    """Comma- or space-separated words (API keys, host names)."""
    return frozenset(word for word in text.replace(",", " ").split() if word)


def _forced(field: RequestField) -> Callable[[str], Any]:
    """A request field forced on every job: parsed by the field itself; empty or `none` leaves it to the request."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("", "none") else field.parse(text)

    return parse


def _flag_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "multitalk"


@dataclass(frozen=True)
class Option:
    name: str  # attribute of Settings, which holds the default
    parse: Callable[[str], Any]
    help: str
    flag: str | None = None  # CLI flag, when the setting has one
    commands: tuple[str, ...] = ("serve", "worker")  # which commands it concerns

    @property
    def env(self) -> str:
        return f"MULTITALK_{self.name.upper()}"


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "Address the API listens on (0.0.0.0 in containers).", "--host", ("serve",)),
    Option("port", int, "Port the API listens on.", "--port", ("serve",)),
    Option("tls_cert", Path, "PEM certificate (chain) to serve https on the port itself, with the key of "
           "`--tls-key`; the server's own URLs become https (unset: plain http, e.g. behind a TLS proxy).",
           "--tls-cert", ("serve",)),
    Option("tls_key", Path, "PEM private key (unencrypted) of `--tls-cert`.", "--tls-key", ("serve",)),
    Option("weights", str, "Checkpoint folder, or `tiny` for the seeded tiny demo/test checkpoints "
           "(random weights, made on first use in the data dir).", "--weights"),
    Option("data_dir", Path, "Where jobs (SQLite), uploads, results and the tiny weights live "
           "(default: $XDG_DATA_HOME/multitalk or ~/.local/share/multitalk). Share it between the API "
           "and workers on other hosts.", "--data-dir"),
    Option("public_url", str, "Base URL clients reach this server at, for the `*_url`s in "
           "responses and webhooks (default: from each request's X-Forwarded-Proto/Host or Host header; "
           "workers and webhooks then use http(s)://HOST:PORT).", "--public-url"),
    Option("redis_url", str, "Redis job store shared by several workers or hosts, e.g. "
           "redis://redis:6379/0 (unset: SQLite in the data dir).", "--redis-url"),
    Option("storage_url", str, "S3 bucket (and prefix) for uploads, inputs and videos, e.g. s3://my-bucket/multitalk: "
           "hosts sharing it and the Redis job store need no shared disk (unset: files in the data dir). "
           "Credentials and region come from the usual AWS_* variables.", "--storage-url"),
    Option("storage_endpoint_url", str, "S3 API endpoint of a bucket not on AWS (MinIO, Cloudflare R2, GCS "
           "interoperability), e.g. http://minio:9000; addressed path-style.", None),
    Option("storage_presigned_urls", _flag_bool, "Result URLs are presigned bucket URLs instead of this server's "
           "/files/... (which streams from the bucket): valid 7 days, or as long as temporary credentials last, and "
           "naming the storage endpoint, which clients must reach.", None),
    Option("api_keys", _word_set, "Accepted API keys, comma-separated; requests must send "
           "`Authorization: Key <key>` (unset: no authentication).", None, ("serve",)),
    Option("max_queue", _optional_int, "Most jobs waiting in the queue; beyond it submits get 429 "
           "with Retry-After (`none`: unlimited).", "--max-queue", ("serve",)),
    Option("workers", int, "Workers embedded in the API process (0: API only, run `multitalk worker` "
           "processes instead).", "--workers", ("serve",)),
    Option("device", str, "Torch device for the pipeline: auto, cpu, cuda, cuda:1, ...", "--device",
           ("serve", "worker")),
    Option("lease_s", float, "Seconds a worker may go silent before its job is presumed lost and "
           "retried.", "--lease-s"),
    Option("max_attempts", int, "Runs a job gets when its workers keep dying, before it fails with "
           "WorkerLost.", None),
    Option("retention_s", float, "Seconds finished jobs, their results and stored files are "
           "kept before being deleted.", None, ("serve",)),
    Option("max_body_bytes", int, "Largest JSON request body (inline data URIs count).", None,
           ("serve",)),
    Option("max_upload_bytes", int, "Largest uploaded file.", None, ("serve",)),
    Option("fetch_allowed_hosts", _word_set, "Hosts or addresses input URLs and webhooks may "
           "reach although they are private or local (e.g. an internal media server).", None),
    Option("webhook_secret", str, "Secret for the HMAC-SHA256 signature header on webhooks "
           "(unset: webhooks are not signed).", None),
    Option("webhook_attempts", int, "Deliveries tried per webhook (exponential backoff).", None),
    Option("frame_size", _forced(FRAME_SIZE), "HEIGHTxWIDTH forced on every job (fast previews and CPU demos; "
           "unset: the resolution's bucket).", "--frame-size", ("serve", "worker")),
    Option("steps", _forced(STEPS), "Sampling steps forced on every job (previews, CPU demos; unset: "
           "the acceleration preset's).", "--steps", ("serve", "worker")),
    Option("attention", str, "Attention kernel: `auto` (FlashAttention 3, cuDNN, FlashAttention 2, then "
           "PyTorch SDPA: the first installed and usable; all exact) or a diffusers backend name such as "
           "`flash`, `_native_cudnn`, `native`, or `sage` (int8 q/k: faster, not exact).", "--attention",
           ("serve", "worker")),
    Option("weight_storage", _choice(WEIGHT_MODES), "Storage of the transformer's block weights: `bf16` "
           "(exact), `fp8` (float8 weights and activations, Hopper/Ada or newer, half the memory), `fp8-storage` "
           "(float8 storage computed in bf16, any GPU), `int8` (weight-only).", "--weight-storage",
           ("serve", "worker")),
    Option("offload", _choice(OFFLOAD_MODES), "`blocks`: keep the transformer blocks in CPU memory and "
           "stream them to the GPU overlapped with compute, and the text encoder in CPU memory between requests "
           "(480p on 24 GB GPUs; needs ~64 GB RAM); `none`: all on the GPU.", "--offload", ("serve", "worker")),
    Option("compile", _flag_bool, "Compile the transformer blocks with torch.compile and warm up at start "
           "(minutes at start; steps 1.24x faster on an H200).", "--compile", ("serve", "worker")),
    Option("log_json", _flag_bool, "Log one JSON object per line instead of text.", "--log-json"),
)


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    weights: str = "tiny"
    data_dir: Path | None = None
    public_url: str | None = None
    redis_url: str | None = None
    storage_url: str | None = None
    storage_endpoint_url: str | None = None
    storage_presigned_urls: bool = False
    api_keys: frozenset[str] = frozenset()
    max_queue: int | None = 100
    workers: int = 1
    device: str = "auto"
    lease_s: float = 60.0
    max_attempts: int = 2
    retention_s: float = 24 * 3600.0
    max_body_bytes: int = 32 * MiB
    max_upload_bytes: int = 100 * MiB
    fetch_allowed_hosts: frozenset[str] = frozenset()
    webhook_secret: str | None = None
    webhook_attempts: int = 10
    frame_size: tuple[int, int] | None = None
    steps: int | None = None
    attention: str = "auto"
    weight_storage: str = "bf16"
    offload: str = "none"
    compile: bool = False
    log_json: bool = False

    @property
    def data_path(self) -> Path:
        return self.data_dir or _default_data_dir()

    @property
    def base_url(self) -> str:
        """The configured public URL, else this process's own address (what workers and webhooks use),
        https when the server terminates TLS itself."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def request_overrides(self) -> dict[str, Any]:
        """The request fields forced on every job (`frame_size`, `steps`), when set."""
        return {name: value for name, value in ((FRAME_SIZE.name, self.frame_size), (STEPS.name, self.steps))
                if value is not None}

    @property
    def execution(self) -> ExecutionOptions:
        return ExecutionOptions(attention=self.attention, weights=self.weight_storage, offload=self.offload,
                                compile=self.compile)

    def check(self) -> None:
        """Refuse settings that cannot work, naming the setting, before anything starts."""
        problems = []
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.max_queue is not None and self.max_queue < 1:
            problems.append(f"max_queue must be >= 1 or none, got {self.max_queue}")
        for name in ("lease_s", "retention_s", "max_body_bytes", "max_upload_bytes", "max_attempts", "webhook_attempts"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            problems.append(f"public_url must start with http:// or https://, got {self.public_url!r}")
        if self.storage_url:
            try:
                parse_storage_url(self.storage_url)
            except ValueError as exc:
                problems.append(str(exc))
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together: set both or neither")
        elif self.tls_cert is not None and self.tls_key is not None:
            problems.extend(_tls_problems(self.tls_cert, self.tls_key))
        for name, value in self.request_overrides.items():
            try:
                FIELDS[name].check(value)
            except InputError as exc:
                problems.append(str(exc))
        try:  # ExecutionOptions refuse combinations that cannot work (compile with fp8-storage)
            _ = self.execution
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))


def _tls_problems(cert: Path, key: Path) -> list[str]:
    """Why uvicorn could not serve https with this certificate and key (empty when it can), found
    before start-up so that the message names the setting rather than an OpenSSL routine."""
    unreadable = []
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            path.read_bytes()
        except OSError as exc:
            unreadable.append(f"{name}: cannot read {path}: {exc.strerror}")
    if unreadable:
        return unreadable
    try:  # a password callback, so that an encrypted key fails here instead of prompting on a terminal
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        return [f"tls_cert/tls_key: {cert} and {key} are not a PEM certificate and its unencrypted private key "
                f"({exc.reason or exc})"]
    return []


assert {o.name for o in OPTIONS} == {f.name for f in fields(Settings)}, "OPTIONS and Settings must list the same settings"


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of `command`; each defaults to None so an absent flag falls through to the environment."""
    for option in OPTIONS:
        if not (option.flag and command in option.commands):
            continue
        help = f"{option.help} [env {option.env}]"
        if option.parse is _flag_bool:
            parser.add_argument(option.flag, dest=option.name, action="store_const", const=True, default=None, help=help)
        else:
            parser.add_argument(option.flag, dest=option.name, type=option.parse, default=None, help=help)


def load_settings(args: argparse.Namespace | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Settings from flags (when given), then MULTITALK_* variables, then defaults."""
    values = {}
    for option in OPTIONS:
        given = getattr(args, option.name, None) if args is not None else None
        if given is not None:
            values[option.name] = given
        elif option.env in environ:
            try:
                values[option.name] = option.parse(environ[option.env])
            except ValueError as exc:
                raise ValueError(f"{option.env}: {exc}") from None
    settings = Settings(**values)
    settings.check()
    return settings


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= MiB and value % MiB == 0:
        return f"{value // MiB} MiB"
    return str(value)


def settings_table() -> str:
    """The Markdown table of docs/configuration.md."""
    rows = ["| Environment variable | Flag | Default | Commands | Meaning |", "|---|---|---|---|---|"]
    defaults = Settings()
    for option in OPTIONS:
        default = getattr(defaults, option.name)
        shown = "—" if default in (None, frozenset()) else f"`{_shown(default)}`"
        flag = f"`{option.flag}`" if option.flag else "—"
        rows.append(f"| `{option.env}` | {flag} | {shown} | {', '.join(option.commands)} | {option.help} |")
    return "\n".join(rows) + "\n"

"""`multitalk serve` (the API, by default with one embedded worker) and `multitalk worker`."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Callable, TypeVar

from server.logging_setup import setup_logging
from server.settings import add_flags, load_settings

logger = logging.getLogger("multitalk")
T = TypeVar("T")


def _settings_or_exit(args: argparse.Namespace):
    try:
        return load_settings(args)
    except ValueError as exc:
        raise SystemExit(f"multitalk {args.command}: invalid setting: {exc}") from None


def _built_or_exit(args: argparse.Namespace, build: Callable[[], T]) -> T:
    """`build()`, or exit with the store's own message when its file is damaged or its bucket unusable (it says what to
    do), not a traceback."""
    from server.files.s3_store import UnusableBucket
    from server.jobs import DamagedJobStore

    try:
        return build()
    except (DamagedJobStore, UnusableBucket) as exc:
        raise SystemExit(f"multitalk {args.command}: {exc}") from None


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    settings = _settings_or_exit(args)
    setup_logging(args.verbose, settings.log_json)
    app = _built_or_exit(args, lambda: create_app(settings))
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=30, ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    return 0


def run_worker_command(args: argparse.Namespace) -> int:
    from server.services import Services
    from server.worker.runtime import run_worker

    settings = _settings_or_exit(args)
    setup_logging(args.verbose, settings.log_json)
    services = _built_or_exit(args, lambda: Services.from_settings(settings))
    stop = threading.Event()

    def request_stop(signum, frame) -> None:
        logger.info("signal %s: stopping after the current job", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        run_worker(settings, services, stop)
    finally:
        services.close()
    return 0


def add_server_parsers(commands) -> None:
    serve = commands.add_parser("serve", help="run the HTTP API (fal-compatible), with an embedded worker by default")
    add_flags(serve, "serve")
    serve.set_defaults(handler=run_serve)
    worker = commands.add_parser("worker", help="run one worker (one per GPU) on the shared job store")
    add_flags(worker, "worker")
    worker.set_defaults(handler=run_worker_command)

"""The FastAPI application: fal's `ai-avatar/multi` protocol on your own GPUs.

`create_app(settings)` wires the routes, middleware and error handlers around one `Services`; its
lifespan starts the housekeeping task and the embedded workers (threads that each load a pipeline
and serve the shared queue) and stops them on shutdown. With `workers=0` the process is API only
and `multitalk worker` processes do the generating.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api.errors import install_error_handlers
from server.api.middleware import BodySizeLimit, QueueHostRouting, RequestIdAndAccessLog
from server.api.routes import health, playground, queue, run, storage
from server.jobs.maintenance import run_maintenance
from server.services import Services
from server.settings import Settings
from server.worker.runtime import run_worker

logger = logging.getLogger("multitalk.api")

DESCRIPTION = """\
A self-hosted server for MultiTalk (audio-driven multi-person talking video) speaking the protocol
of the hosted `fal-ai/ai-avatar/multi` endpoint, so unmodified fal clients work against it.

* `POST /fal-ai/ai-avatar/multi` runs a request and waits for the video.
* `POST /queue/fal-ai/ai-avatar/multi` queues it (also on a `queue.` host without the prefix); follow
  the returned `status_url`, `response_url` and `cancel_url`.
* Upload media with `POST /storage/upload/initiate` + `PUT`, or pass `data:` URIs.
"""


class EmbeddedWorkers:
    """The worker threads of `multitalk serve`; stopping lets each finish the job in hand."""

    def __init__(self, settings: Settings, services: Services):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=run_worker, args=(settings, services, self.stop),
                                         name=f"worker-{i}", daemon=True) for i in range(settings.workers)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout_s: float) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("worker %s still busy at shutdown; its job will be retried after its lease",
                               thread.name)


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    services = services or Services.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        workers = EmbeddedWorkers(settings, services)
        workers.start()
        housekeeping = asyncio.create_task(run_maintenance(services))
        logger.info("api ready base_url=%s store=%s workers=%d auth=%s", settings.base_url,
                    "redis" if settings.redis_url else "sqlite", settings.workers, bool(settings.api_keys))
        try:
            yield
        finally:
            housekeeping.cancel()
            await asyncio.to_thread(workers.join, 30.0)
            services.close()

    app = FastAPI(title="MultiTalk server", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    for router in (run.router, queue.router, storage.router, health.router, playground.router):
        app.include_router(router)
    # Added innermost first: routing by host must happen before anything reads the path.
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestIdAndAccessLog)
    app.add_middleware(QueueHostRouting)
    return app

"""`mlp server`: the API plus a scheduler loop (cron, reaping, re-publishing).

Several replicas may run: every scheduling step is a guarded database transition and cron
ticks are unique in the database. Without REDIS_URL the server also runs an in-process worker,
so one process is a whole embedded platform.
"""

from __future__ import annotations

import logging
import threading

import uvicorn

from ml_platform.api import create_app
from ml_platform.config import Settings
from ml_platform.dispatch import Dispatcher
from ml_platform.service import Platform
from ml_platform.worker import TRANSIENT_ERRORS, Runtime, Worker, make_dispatcher, new_worker_id

log = logging.getLogger(__name__)


class SchedulerLoop(threading.Thread):
    """Fires cron schedules and runs scheduler passes until stopped."""

    def __init__(self, platform: Platform, runtime: Runtime) -> None:
        super().__init__(name="mlp-scheduler", daemon=True)
        self.platform = platform
        self.runtime = runtime
        self.stopping = threading.Event()

    def run(self) -> None:
        poll = self.platform.settings.poll_seconds
        while not self.stopping.is_set():
            try:
                for submitted in self.platform.fire_schedules():
                    self.runtime.dispatcher.publish(submitted.queued)
                self.runtime.tick()
            except TRANSIENT_ERRORS as exc:  # the database or Redis is away: /readyz says so; retry
                log.warning("scheduler pass failed, retrying: %s", exc)
                self.stopping.wait(poll)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        self.runtime.worker.hand_back("server shut down")
        self.runtime.worker.close()


def build(settings: Settings, concurrency: int) -> tuple[Platform, Dispatcher, SchedulerLoop]:
    platform = Platform(settings).start()
    worker_id = new_worker_id()
    dispatcher = make_dispatcher(platform, worker_id)
    # With Redis, workers are separate processes; this loop only schedules (concurrency 0
    # is expressed as a worker that never accepts work).
    worker = Worker(platform, dispatcher, concurrency=concurrency, worker_id=worker_id)
    if settings.redis_url:
        worker.draining = True
    return platform, dispatcher, SchedulerLoop(platform, Runtime(platform, dispatcher, worker))


def serve(settings: Settings, host: str, port: int, concurrency: int) -> None:
    """Run the API and the scheduler loop until SIGINT or SIGTERM."""
    platform, dispatcher, loop = build(settings, concurrency)
    app = create_app(settings, platform=platform, dispatcher=dispatcher)
    loop.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=True)
    finally:
        loop.stop()
        platform.close()

"""`mlp server`: the API plus a scheduler loop (cron, reaping, re-publishing).

Several replicas may run: every scheduling step is a guarded database transition and cron
ticks are unique in the database. Without REDIS_URL the server also runs an in-process worker,
so one process is a whole embedded platform.

SIGTERM stops the HTTP server, then drains the in-process worker (running attempts may finish
within MLP_DRAIN_SECONDS, the rest is handed back) and exits 0; a second SIGTERM or a SIGINT
hands back at once.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from ml_platform.api import create_app
from ml_platform.config import Settings
from ml_platform.dispatch import Dispatcher
from ml_platform.service import Platform
from ml_platform.worker import (
    TRANSIENT_ERRORS,
    Runtime,
    Shutdown,
    Worker,
    freeze_what_lasts,
    make_dispatcher,
    new_worker_id,
    run_until_shutdown,
)

log = logging.getLogger(__name__)


class SchedulerLoop(threading.Thread):
    """Fires cron schedules and runs scheduler passes until shut down, then drains.

    Task processes are started by this thread and are bound to it (they die when it ends),
    so it is this thread that drains, hands back and ends them.
    """

    def __init__(self, platform: Platform, runtime: Runtime, shutdown: Shutdown) -> None:
        super().__init__(name="mlp-scheduler", daemon=True)
        self.platform = platform
        self.runtime = runtime
        self.shutdown = shutdown
        self.verdict = ""
        self._last_fire = -float("inf")

    def run(self) -> None:
        self.verdict = run_until_shutdown(self.runtime, self.shutdown, self._fire_schedules)

    def _fire_schedules(self) -> None:
        # Once per poll, not once per pass: a busy loop makes hundreds of passes a second, and
        # cron's ticks are minutes apart.
        now = time.monotonic()
        if now - self._last_fire < self.platform.settings.poll_seconds:
            return
        self._last_fire = now
        try:
            for submitted in self.platform.fire_schedules():
                self.runtime.dispatcher.publish(submitted.queued)
        except TRANSIENT_ERRORS as exc:  # the database or Redis is away: /readyz says so; retry
            log.warning("scheduler pass failed, retrying: %s", exc)
            time.sleep(self.platform.settings.poll_seconds)

    def stop(self) -> None:
        """Ask for a drain (as a SIGTERM would) and wait for it, handling further signals."""
        if not self.shutdown.requested:
            self.shutdown.terms += 1
        while self.is_alive():
            self.join(timeout=0.2)  # short waits: this thread's signal handlers keep running


def build(
    settings: Settings, concurrency: int, shutdown: Shutdown | None = None
) -> tuple[Platform, Dispatcher, SchedulerLoop]:
    platform = Platform(settings).start()
    worker_id = new_worker_id()
    dispatcher = make_dispatcher(platform, worker_id)
    # With Redis, workers are separate processes; this loop only schedules (concurrency 0
    # is expressed as a worker that never accepts work).
    worker = Worker(platform, dispatcher, concurrency=concurrency, worker_id=worker_id)
    if settings.redis_url:
        worker.draining = True
    runtime = Runtime(platform, dispatcher, worker)
    return platform, dispatcher, SchedulerLoop(platform, runtime, shutdown or Shutdown())


def serve(settings: Settings, host: str, port: int, concurrency: int) -> None:
    """Run the API and the scheduler loop until SIGTERM or SIGINT; drain, then return."""
    shutdown = Shutdown()
    platform, dispatcher, loop = build(settings, concurrency, shutdown)
    app = create_app(settings, platform=platform, dispatcher=dispatcher)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    http = uvicorn.Server(config)
    # Ours before and after uvicorn's own: uvicorn restores these when it stops and re-raises
    # the signals it caught, which then reach this count instead of killing the process
    # before the drain.
    shutdown.on_signal = lambda: setattr(http, "should_exit", True)
    shutdown.install()
    freeze_what_lasts()
    loop.start()
    try:
        http.run()
    finally:
        loop.stop()
        log.info("scheduler loop stopped: %s", loop.verdict)
        platform.close()

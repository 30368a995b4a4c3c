"""The FastAPI application: services, error bodies, health and metrics endpoints."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from sqlalchemy import exc as db_errors
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ml_platform import __version__, ui
from ml_platform.accounts import Accounts, LoginLimiter, MemoryLoginLimiter, RedisLoginLimiter
from ml_platform.api.deps import ApiError, Services, add_routes
from ml_platform.api.edge import Edge
from ml_platform.api.metrics import PlatformCollector
from ml_platform.api.routes import router
from ml_platform.artifacts import ArtifactNotFound
from ml_platform.config import Settings
from ml_platform.dispatch import Dispatcher
from ml_platform.sdk import ParamError, WorkflowError
from ml_platform.security import TokenSigner, resolve_secret_key
from ml_platform.service import NotFound, Platform, ScheduleError

log = logging.getLogger(__name__)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


#: What a request meets when the database cannot be reached (refused, restarted, a connection
#: dropped, the pool exhausted, SQLite busy past its timeout) or Redis cannot: not a bug of
#: ours but a dependency away for a moment. 503 with Retry-After, one log line, no traceback.
UNAVAILABLE: dict[type[Exception], str] = {
    db_errors.OperationalError: "database",
    db_errors.InterfaceError: "database",
    db_errors.DisconnectionError: "database",
    db_errors.TimeoutError: "database",
    redis.ConnectionError: "redis",
    redis.TimeoutError: "redis",
}
_NAMED = {"database": "the database", "redis": "Redis"}


def _failed(exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)  # the details go to the log, never to the client
    return _error(500, "internal_error", "the server failed; the error was logged")


#: What SQLite says when its file is busy or cannot be reached; its other "operational"
#: errors (no such table, a syntax error) are bugs, answered 500 with the traceback logged.
_SQLITE_AWAY = ("locked", "busy", "unable to open", "disk i/o")
#: PostgreSQL's classes of errors that pass (SQLSTATE's first two characters): a connection
#: lost, a transaction to run again, resources short, the server stopping or a statement
#: cancelled, an I/O error. Another class (a value past a limit, say) is a bug: 500.
_POSTGRESQL_AWAY = ("08", "40", "53", "55", "57", "58")


def _is_away(exc: Exception) -> bool:
    """Whether a database error passes (asking again may succeed), by the driver's error."""
    orig = getattr(exc, "orig", None)
    if isinstance(orig, sqlite3.Error):
        return any(words in str(orig).lower() for words in _SQLITE_AWAY)
    sqlstate = getattr(orig, "sqlstate", None)  # None: no answer from the server at all
    return sqlstate is None or str(sqlstate)[:2] in _POSTGRESQL_AWAY


def _unavailable(service: str) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        if service == "database" and not _is_away(exc):
            return _failed(exc)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("%s %s: %s unavailable (%s)", request.method, request.url.path, service, reason)
        return _error(
            503,
            f"{service}_unavailable",
            f"{_NAMED[service]} did not answer; try again in a moment",
            {"Retry-After": "1"},
        )

    return handler


def _allowed_methods(app: FastAPI, request: Request) -> str:
    """Every method the path answers (Starlette names only the first route's in a 405)."""
    methods = []
    for method in ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            methods.append(method)
    return ", ".join(methods)


def create_app(
    settings: Settings,
    *,
    platform: Platform | None = None,
    dispatcher: Dispatcher | None = None,
) -> FastAPI:
    """Build the API. Refuses to start (ConfigurationError) with a weak production secret."""
    secret = resolve_secret_key(settings)
    platform = platform or Platform(settings)
    # A request is not the hot path of a task: its connection is tried before use (≈ 0.1 ms),
    # so that the first request after a database restart or failover gets a fresh one
    # instead of failing on a connection the server dropped.
    platform.db.ping_after = 0.0
    redis_client = redis.Redis.from_url(settings.redis_url) if settings.redis_url else None
    limiter: LoginLimiter
    if redis_client is not None:
        limiter = RedisLoginLimiter(
            redis_client,
            settings.redis_prefix,
            settings.login_attempts,
            settings.login_window_seconds,
        )
    else:
        limiter = MemoryLoginLimiter(settings.login_attempts, settings.login_window_seconds)
    services = Services(
        platform=platform,
        accounts=Accounts(platform.db, timedelta(days=settings.refresh_token_days)),
        signer=TokenSigner(secret, timedelta(minutes=settings.access_token_minutes)),
        limiter=limiter,
        dispatcher=dispatcher,
    )
    registry = CollectorRegistry()
    registry.register(PlatformCollector(platform, redis_client, settings.redis_prefix))
    # This process's answers by class; `instance` tells replicas apart behind one URL (the
    # deploy's watch window compares each replica with itself).
    responses = Counter(
        "mlp_http_responses",
        "HTTP responses of this server process, by status class.",
        ["instance", "status_class"],
        registry=registry,
    )
    instance = f"{socket.gethostname()}:{os.getpid()}"
    for status_class in ("2xx", "3xx", "4xx", "5xx"):
        responses.labels(instance, status_class)  # present from the first scrape, at 0

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        platform.start()
        yield

    # The API's map is for developers: outside development only when asked for (MLP_API_DOCS).
    docs = settings.environment == "development" or settings.api_docs
    app = FastAPI(
        title="ML Platform",
        version=__version__,
        description="Run ML pipelines as DAGs of Python tasks.",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    # Here, not at the top: the UI's views import the API's dependencies (a cycle otherwise).
    from ml_platform.ui.views import CSP as UI_CSP

    app.state.services = services
    add_routes(app, router)
    ui.install(app)
    app.add_middleware(
        Edge,
        ui_csp=UI_CSP,
        on_status=lambda status: responses.labels(instance, f"{status // 100}xx").inc(),
    )

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return _error(404, "not_found", str(exc))

    @app.exception_handler(ParamError)
    async def bad_params(_request: Request, exc: ParamError) -> JSONResponse:
        return _error(422, "invalid_params", str(exc))

    @app.exception_handler(WorkflowError)
    async def bad_workflow(_request: Request, exc: WorkflowError) -> JSONResponse:
        return _error(422, "invalid_workflow", str(exc))

    @app.exception_handler(ScheduleError)
    async def bad_schedule(_request: Request, exc: ScheduleError) -> JSONResponse:
        return _error(422, "invalid_schedule", str(exc))

    @app.exception_handler(ArtifactNotFound)
    async def missing_artifact(_request: Request, exc: ArtifactNotFound) -> JSONResponse:
        return _error(404, "not_found", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        return _error(422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(app, request)
        return _error(exc.status_code, code, str(exc.detail), headers)

    for error, service in UNAVAILABLE.items():
        app.add_exception_handler(error, _unavailable(service))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return _failed(exc)

    @app.get("/livez", tags=["health"])
    def livez() -> dict[str, str]:
        """The process is alive."""
        return {"status": "alive"}

    def readiness() -> JSONResponse:
        checks: dict[str, Any] = {}
        try:
            behind = platform.schema_behind()
            checks["database"] = "ok"
            checks["migrations"] = behind or "ok"
        except Exception as exc:  # any driver error means "not ready"
            checks["database"] = f"unreachable: {type(exc).__name__}"
        if redis_client is not None:
            try:
                redis_client.ping()
                checks["redis"] = "ok"
            except redis.RedisError as exc:
                checks["redis"] = f"unreachable: {type(exc).__name__}"
        ready = all(value == "ok" for value in checks.values()) and "migrations" in checks
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """The database and Redis answer and the schema is at the latest migration."""
        return readiness()

    @app.get("/healthz", tags=["health"])
    def healthz() -> JSONResponse:
        """Alias of /readyz for the deployment smoke tests."""
        return readiness()

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus metrics."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app

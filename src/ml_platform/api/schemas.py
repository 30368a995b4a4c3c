"""Request and response bodies of the API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Largest integer a request may carry (the database stores 32-bit integers).
MAX_INT = 2**31 - 1


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error: ``{"error": {"code": "…", "message": "…"}}``."""

    error: ErrorDetail


class LoginRequest(Body):
    username: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1000)


class RefreshRequest(Body):
    refresh_token: str = Field(min_length=1, max_length=1000)


class LogoutRequest(BaseModel):
    """Optionally a refresh token whose sign-in ends too (e.g. one kept by another client)."""

    model_config = ConfigDict(extra="forbid")
    refresh_token: str | None = Field(default=None, max_length=1000)


class TokenResponse(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class UserCreate(Body):
    username: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1000)
    is_admin: bool = False


class UserOut(BaseModel):
    id: int
    username: str
    is_admin: bool
    #: A disabled user cannot sign in; their sign-ins ended when they were disabled.
    disabled: bool = False


class Change(Body):
    """A PATCH's body: the fields to change, at least one of them."""

    @model_validator(mode="after")
    def _something(self) -> Change:
        fields = type(self).model_fields
        if all(getattr(self, name) is None for name in fields):
            raise ValueError("give at least one of " + ", ".join(fields))
        return self


class UserChange(Change):
    """What a platform admin changes about a user: disabling one (or setting a password)
    ends every sign-in they have."""

    disabled: bool | None = None
    is_admin: bool | None = None
    password: str | None = Field(default=None, min_length=1, max_length=1000)


class PasswordChange(Body):
    current_password: str = Field(min_length=1, max_length=1000)
    new_password: str = Field(min_length=1, max_length=1000)


class MemberOut(BaseModel):
    username: str
    role: str


class ProjectCreate(Body):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ProjectOut(BaseModel):
    name: str
    role: str


class MemberSet(Body):
    username: str = Field(min_length=1, max_length=100)
    role: Literal["viewer", "editor", "admin"]


class WorkflowRegister(Body):
    reference: str = Field(min_length=3, max_length=400, description="package.module:workflow")


class WorkflowOut(BaseModel):
    name: str
    version: int
    code_hash: str
    description: str
    params_schema: dict[str, Any]
    created_at: datetime


class RunCreate(Body):
    workflow: str = Field(min_length=3, max_length=400, description="package.module:workflow")
    params: dict[str, Any] = Field(default_factory=dict)
    max_concurrency: int | None = Field(default=None, ge=1, le=MAX_INT)


class RunOut(BaseModel):
    id: str
    workflow: str
    workflow_version: int
    state: str
    params: dict[str, Any]
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    retry_of: str | None = None
    #: The cron tick a schedule made this run for (null for a run submitted by hand).
    scheduled_for: datetime | None = None


class RetryRequest(Body):
    """Rerun from this task (it and everything downstream), reuse the rest's successes;
    ``latest``: with the workflow's code as it is now (tasks whose code changed rerun)."""

    from_task: str | None = Field(default=None, min_length=1, max_length=200)
    latest: bool = False


class RunPage(BaseModel):
    items: list[RunOut]
    limit: int
    offset: int


class AttemptOut(BaseModel):
    number: int
    state: str
    worker_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None


class TaskRunOut(BaseModel):
    node_id: str
    state: str
    upstream: list[str]
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    #: Attempts lost to the infrastructure (they never consume the task's retries).
    lost_attempts: int = 0
    attempts: list[AttemptOut]
    #: A mapped task (`task.map`): true; its elements are the task runs whose element_of
    #: names it, NAME[0], NAME[1], …
    mapped: bool = False
    element_of: str | None = None


class ProgressTaskOut(BaseModel):
    node_id: str
    started_at: datetime | None
    finished_at: datetime | None


class ProgressOut(BaseModel):
    """A run's task counts by state, and some of its running and failed tasks."""

    total: int
    counts: dict[str, int]
    running: list[ProgressTaskOut]
    failed: list[ProgressTaskOut]


class MetricOut(BaseModel):
    task: str
    name: str
    value: float
    step: int | None
    attempt: int


class MetricSummaryOut(BaseModel):
    """A task's metric of one name: the value logged last, how many were logged, and the
    least and greatest of them."""

    task: str
    name: str
    last: float
    points: int
    low: float
    high: float


class ArtifactOut(BaseModel):
    task: str
    name: str
    sha256: str
    size: int
    kind: str


class LogOut(BaseModel):
    """An attempt's output from ``offset`` on; ask again from ``next_offset`` for more while
    ``running``. Offsets count characters from the start of the whole output; the log keeps
    its last MiB, from ``kept_from``. An offset outside what is kept (cut away since, or past
    the end) answers from ``kept_from``: ``offset`` says where ``log`` begins."""

    task: str
    attempt: int
    state: str
    log: str
    offset: int = 0
    next_offset: int = 0
    kept_from: int = 0
    running: bool = False


class ScheduleCreate(Body):
    #: A path segment of its own (/schedules/{name}): letters, digits, ``.``, ``_``, ``-``.
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    workflow: str = Field(min_length=3, max_length=400)
    cron: str = Field(min_length=9, max_length=100, description="five-field cron, UTC")
    params: dict[str, Any] = Field(default_factory=dict)


class PoolSet(Body):
    slots: int = Field(ge=1, le=1_000_000, description="attempts of the pool that may run at once")


class PoolOut(BaseModel):
    name: str
    #: At most this many of its attempts run at once; null: no limit (its workers' slots).
    slots: int | None
    #: Its attempts queued or running now.
    busy: int


class ScheduleChange(Change):
    """Pause (``enabled: false``) or resume a schedule, or give it a new cron or params. A
    resumed schedule, or one with a new cron, fires next at its next tick from now."""

    enabled: bool | None = None
    cron: str | None = Field(
        default=None, min_length=9, max_length=100, description="five-field cron, UTC"
    )
    params: dict[str, Any] | None = None


class ScheduleOut(BaseModel):
    name: str
    workflow: str
    cron: str
    params: dict[str, Any]
    enabled: bool
    next_fire_at: datetime
    #: Why its last tick made no run; null once a tick makes one.
    last_error: str | None = None


_MEANING = {
    401: "not signed in, or the token is invalid, expired or revoked",
    403: "signed in, without the role this needs",
    404: "no such resource (another project's resources answer 404 too)",
    409: "it exists already",
    413: "the request body is too large",
    422: "the request is invalid (the message says what)",
    429: "too many failed logins (Retry-After says how long to wait)",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with the standard error body."""
    return {status: {"model": ErrorBody, "description": _MEANING[status]} for status in statuses}

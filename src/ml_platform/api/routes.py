"""The /api/v1 endpoints: auth, users, projects, workflows, runs, schedules."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.convertors import StringConvertor, register_url_convertor

from ml_platform.accounts import Conflict, LoginBlocked, Role, TokenPair
from ml_platform.api.deps import (
    ApiError,
    Editor,
    IdentityDep,
    ProjectAdmin,
    ServicesDep,
    SignInDep,
    Viewer,
)
from ml_platform.api.schemas import (
    MAX_INT,
    ArtifactOut,
    AttemptOut,
    LoginRequest,
    LogOut,
    LogoutRequest,
    MemberOut,
    MemberSet,
    MetricOut,
    MetricSummaryOut,
    PasswordChange,
    PoolOut,
    PoolSet,
    ProgressOut,
    ProgressTaskOut,
    ProjectCreate,
    ProjectOut,
    RefreshRequest,
    RetryRequest,
    RunCreate,
    RunOut,
    RunPage,
    ScheduleChange,
    ScheduleCreate,
    ScheduleOut,
    TaskRunOut,
    TokenResponse,
    UserChange,
    UserCreate,
    UserOut,
    WorkflowOut,
    WorkflowRegister,
    errors,
)
from ml_platform.artifacts import ArtifactNotFound
from ml_platform.engine.states import RunState
from ml_platform.security import AuthError
from ml_platform.service import RetryError, RunNotEnded, RunRow, ScheduleRow, WorkflowRow

# Every answer the API may give, declared once (the OpenAPI document is a contract: fuzzers
# and clients check responses against it).
router = APIRouter(prefix="/api/v1", responses=errors(401, 403, 404, 409, 413, 422, 429))


def _tokens(svc: ServicesDep, pair: TokenPair) -> TokenResponse:
    return TokenResponse(
        access_token=svc.access_token(pair),
        refresh_token=pair.refresh_token,
        expires_in=int(svc.signer.ttl.total_seconds()),
    )


def _admin(identity: IdentityDep, does: str) -> None:
    if not identity.is_admin:
        raise ApiError(403, "forbidden", f"only platform admins {does}")


@router.post("/auth/token", tags=["auth"])
def login(body: LoginRequest, request: Request, svc: ServicesDep) -> TokenResponse:
    """Exchange a username and password for an access token and a refresh token."""
    address = request.client.host if request.client else None
    try:
        identity = svc.accounts.login(svc.limiter, body.username, body.password, address)
    except LoginBlocked as exc:
        raise ApiError(429, exc.code, exc.message, {"Retry-After": str(exc.wait)}) from None
    except AuthError as exc:
        raise ApiError(401, exc.code, exc.message) from None
    return _tokens(svc, svc.accounts.issue_refresh(identity))


@router.post("/auth/refresh", tags=["auth"])
def refresh(body: RefreshRequest, svc: ServicesDep) -> TokenResponse:
    """Rotate a refresh token. A token used twice revokes its whole family."""
    try:
        pair = svc.accounts.rotate(body.refresh_token)
    except AuthError as exc:
        raise ApiError(401, exc.code, exc.message) from None
    return _tokens(svc, pair)


@router.post("/auth/logout", status_code=204, tags=["auth"])
def logout(sign_in: SignInDep, svc: ServicesDep, body: LogoutRequest | None = None) -> Response:
    """End this sign-in: its access token now, its refresh tokens (the whole family) too."""
    svc.accounts.logout(sign_in.claims, body.refresh_token if body else None)
    return Response(status_code=204)


@router.get("/users/me", tags=["users"])
def me(identity: IdentityDep) -> UserOut:
    return UserOut(id=identity.user_id, username=identity.username, is_admin=identity.is_admin)


@router.post("/users", status_code=201, tags=["users"])
def create_user(body: UserCreate, identity: IdentityDep, svc: ServicesDep) -> UserOut:
    """Create a user (platform admins only)."""
    _admin(identity, "create users")
    try:
        user = svc.accounts.create_user(body.username, body.password, is_admin=body.is_admin)
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    return UserOut(id=user.user_id, username=user.username, is_admin=user.is_admin)


@router.post("/users/me/password", status_code=204, tags=["users"])
def change_password(
    body: PasswordChange, request: Request, sign_in: SignInDep, svc: ServicesDep
) -> Response:
    """Set a new password, giving the current one (under the sign-in limits); every other
    sign-in of yours ends."""
    try:
        svc.accounts.change_own_password(
            svc.limiter,
            sign_in.claims,
            sign_in.identity,
            (body.current_password, body.new_password),
            request.client.host if request.client else None,
        )
    except LoginBlocked as exc:
        raise ApiError(429, exc.code, exc.message, {"Retry-After": str(exc.wait)}) from None
    except AuthError:
        raise ApiError(403, "wrong_password", "the current password is wrong") from None
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    return Response(status_code=204)


@router.get("/users", tags=["users"])
def list_users(identity: IdentityDep, svc: ServicesDep) -> list[UserOut]:
    """Every user (platform admins only)."""
    _admin(identity, "list users")
    return [
        UserOut(id=u.id, username=u.username, is_admin=u.is_admin, disabled=u.disabled)
        for u in svc.accounts.users()
    ]


class _OtherUser(StringConvertor):
    """A username in a path, never ``me``: /users/me is the caller's own (and no user may be
    named so), so that each path has one set of methods."""

    regex = "(?!me$)[^/]+"


register_url_convertor("other_user", _OtherUser())


@router.patch("/users/{username:other_user}", tags=["users"])
def change_user(
    username: str, body: UserChange, identity: IdentityDep, svc: ServicesDep
) -> UserOut:
    """Disable or enable a user, make or unmake a platform admin, set their password
    (platform admins only). Disabling a user or setting their password ends their sign-ins."""
    _admin(identity, "change users")
    try:
        user = svc.accounts.change_user(
            username,
            disabled=body.disabled,
            is_admin=body.is_admin,
            password=body.password,
            by=identity,
        )
    except LookupError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    return UserOut(
        id=user.id, username=user.username, is_admin=user.is_admin, disabled=user.disabled
    )


@router.get("/pools", tags=["pools"])
def list_pools(_identity: IdentityDep, svc: ServicesDep) -> list[PoolOut]:
    """Every pool with a limit or with work queued or running: its slots and how many are busy."""
    return [PoolOut(name=n, slots=s, busy=b) for n, s, b in svc.platform.pools()]


@router.put("/pools/{name}", tags=["pools"])
def set_pool(name: str, body: PoolSet, identity: IdentityDep, svc: ServicesDep) -> PoolOut:
    """Limit how many attempts of a pool run at once, across every project (platform admins
    only): pools are the cluster's, like the workers that serve them."""
    _admin(identity, "set pools")
    try:
        admitted = svc.platform.set_pool(name, body.slots)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    svc.publish_queued(admitted, f"pool {name} set")
    [pool] = [PoolOut(name=n, slots=s, busy=b) for n, s, b in svc.platform.pools() if n == name]
    return pool


@router.delete("/pools/{name}", status_code=204, tags=["pools"])
def remove_pool(name: str, identity: IdentityDep, svc: ServicesDep) -> Response:
    """Take a pool's limit away (platform admins only)."""
    _admin(identity, "set pools")
    svc.publish_queued(svc.platform.remove_pool(name), f"pool {name} removed")
    return Response(status_code=204)


@router.get("/projects", tags=["projects"])
def list_projects(identity: IdentityDep, svc: ServicesDep) -> list[ProjectOut]:
    return [ProjectOut(name=p.name, role=r.label) for p, r in svc.accounts.projects_of(identity)]


@router.post("/projects", status_code=201, tags=["projects"])
def create_project(body: ProjectCreate, identity: IdentityDep, svc: ServicesDep) -> ProjectOut:
    """Create a project; its creator becomes its admin."""
    try:
        project = svc.accounts.create_project(body.name, identity)
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return ProjectOut(name=project.name, role=Role.ADMIN.label)


@router.put("/projects/{project}/members", status_code=204, tags=["projects"])
def set_member(body: MemberSet, access: ProjectAdmin, svc: ServicesDep) -> Response:
    """Give a user a role in the project (project admins only)."""
    try:
        svc.accounts.set_member(access.project_id, body.username, Role.parse(body.role))
    except LookupError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return Response(status_code=204)


@router.get("/projects/{project}/members", tags=["projects"])
def list_members(access: Viewer, svc: ServicesDep) -> list[MemberOut]:
    return [
        MemberOut(username=name, role=role.label)
        for name, role in svc.accounts.members(access.project_id)
    ]


@router.delete("/projects/{project}/members/{username}", status_code=204, tags=["projects"])
def remove_member(username: str, access: ProjectAdmin, svc: ServicesDep) -> Response:
    """Take a user's role in the project away (project admins only)."""
    try:
        svc.accounts.remove_member(access.project_id, username)
    except LookupError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return Response(status_code=204)


def _workflow_out(row: WorkflowRow) -> WorkflowOut:
    return WorkflowOut(
        name=row.name,
        version=row.version,
        code_hash=row.code_hash,
        description=row.description,
        params_schema=row.params_schema,
        created_at=row.created_at,
    )


@router.post("/projects/{project}/workflows", status_code=201, tags=["workflows"])
def register_workflow(body: WorkflowRegister, access: Editor, svc: ServicesDep) -> WorkflowOut:
    """Register a workflow by reference; a changed module makes a new version."""
    row = svc.platform.register(svc.platform.trace(body.reference), access.project_id)
    return _workflow_out(row)


@router.get("/projects/{project}/workflows", tags=["workflows"])
def list_workflows(access: Viewer, svc: ServicesDep) -> list[WorkflowOut]:
    """The latest version of each workflow."""
    latest: dict[str, WorkflowRow] = {}
    for row in svc.platform.workflows(access.project_id):
        latest.setdefault(row.name, row)
    return [_workflow_out(row) for row in latest.values()]


@router.get("/projects/{project}/workflows/{name}/versions", tags=["workflows"])
def workflow_versions(name: str, access: Viewer, svc: ServicesDep) -> list[WorkflowOut]:
    rows = [r for r in svc.platform.workflows(access.project_id) if r.name == name]
    if not rows:
        raise ApiError(404, "not_found", f"no workflow {name!r}")
    return [_workflow_out(row) for row in rows]


def _run_out(run: RunRow, wf: WorkflowRow) -> RunOut:
    return RunOut(
        id=run.id,
        workflow=wf.name,
        workflow_version=wf.version,
        state=run.state,
        params=run.params,
        cancel_requested=run.cancel_requested,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        retry_of=run.retry_of,
        scheduled_for=run.scheduled_for,
    )


def _check_params(svc: ServicesDep, params: dict[str, object]) -> None:
    """Params are stored as JSON: at most MLP_MAX_PARAMS_BYTES of it."""
    limit = svc.platform.settings.max_params_bytes
    size = len(json.dumps(params).encode())
    if size > limit:
        raise ApiError(
            422, "invalid_params", f"params take {size} bytes, over MLP_MAX_PARAMS_BYTES={limit}"
        )


@router.post("/projects/{project}/runs", status_code=201, tags=["runs"])
def submit_run(body: RunCreate, access: Editor, svc: ServicesDep) -> RunOut:
    """Submit a run of a workflow with parameters (validated against its signature)."""
    _check_params(svc, body.params)
    submitted = svc.platform.submit(
        svc.platform.trace(body.workflow, body.params),
        max_concurrency=body.max_concurrency,
        project_id=access.project_id,
    )
    return _run_out(*svc.platform.run(svc.publish(submitted)))


@router.get("/projects/{project}/runs", tags=["runs"])
def list_runs(
    access: Viewer,
    svc: ServicesDep,
    state: Annotated[RunState | None, Query()] = None,
    workflow: Annotated[str | None, Query(max_length=400)] = None,
    schedule: Annotated[str | None, Query(min_length=1, max_length=100)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> RunPage:
    """Runs, newest first; ``schedule``: only the runs that schedule made (404 if none is
    so named)."""
    rows = svc.platform.runs(
        limit,
        state,
        project_id=access.project_id,
        workflow=workflow,
        offset=offset,
        schedule=schedule,
    )
    return RunPage(items=[_run_out(r, w) for r, w in rows], limit=limit, offset=offset)


def _run_id(svc: ServicesDep, access: Viewer, run_id: str) -> str:
    return svc.platform.resolve_run_id(run_id, access.project_id)


@router.get("/projects/{project}/runs/{run_id}", tags=["runs"])
def get_run(run_id: str, access: Viewer, svc: ServicesDep) -> RunOut:
    return _run_out(*svc.platform.run(_run_id(svc, access, run_id), access.project_id))


@router.post("/projects/{project}/runs/{run_id}/cancel", tags=["runs"])
def cancel_run(run_id: str, access: Editor, svc: ServicesDep) -> RunOut:
    """Cancel a run: pending tasks never start, running ones stop at their next heartbeat."""
    full_id = _run_id(svc, access, run_id)
    svc.platform.cancel(full_id)
    return _run_out(*svc.platform.run(full_id))


@router.delete("/projects/{project}/runs/{run_id}", status_code=204, tags=["runs"])
def delete_run(run_id: str, access: Editor, svc: ServicesDep) -> Response:
    """Delete an ended run: its tasks, attempts, logs, metrics and artifact rows (the files go
    at the next `mlp prune` unless another run names them); 409 while it runs."""
    try:
        svc.platform.delete_run(_run_id(svc, access, run_id))
    except RunNotEnded as exc:
        raise ApiError(409, "run_not_ended", str(exc)) from None
    return Response(status_code=204)


@router.post("/projects/{project}/runs/{run_id}/retry", status_code=201, tags=["runs"])
def retry_run(
    run_id: str, access: Editor, svc: ServicesDep, body: RetryRequest | None = None
) -> RunOut:
    """A new run of an ended run that reuses what succeeded there and runs the rest (with
    ``from_task``: that task and everything downstream of it too; ``latest``: with the
    workflow's code as it is now, rerunning the tasks whose code changed and what follows)."""
    full_id = _run_id(svc, access, run_id)
    try:
        submitted = svc.platform.retry(
            full_id,
            from_task=body.from_task if body else None,
            project_id=access.project_id,
            latest=body.latest if body else False,
        )
    except RetryError as exc:
        raise ApiError(409 if "once it ended" in str(exc) else 422, "cannot_retry", str(exc))
    return _run_out(*svc.platform.run(svc.publish(submitted)))


@router.get("/projects/{project}/runs/{run_id}/progress", tags=["runs"])
def run_progress(
    run_id: str,
    access: Viewer,
    svc: ServicesDep,
    show: Annotated[int, Query(ge=0, le=100)] = 10,
) -> ProgressOut:
    """Task counts by state and up to ``show`` running and failed tasks: one aggregate
    query, whatever the run's size (what `mlp run --server` polls for a large run)."""
    progress = svc.platform.progress(_run_id(svc, access, run_id), show)

    def tasks(rows: list[tuple[str, Any, Any]]) -> list[ProgressTaskOut]:
        return [ProgressTaskOut(node_id=n, started_at=s, finished_at=f) for n, s, f in rows]

    return ProgressOut(
        total=progress.total,
        counts=progress.counts,
        running=tasks(progress.running),
        failed=tasks(progress.failed),
    )


@router.get("/projects/{project}/runs/{run_id}/tasks", tags=["runs"])
def run_tasks(run_id: str, access: Viewer, svc: ServicesDep) -> list[TaskRunOut]:
    full_id = _run_id(svc, access, run_id)
    attempts: dict[int, list[AttemptOut]] = {}
    for a in svc.platform.attempts(full_id):
        attempts.setdefault(a.task_run_id, []).append(
            AttemptOut(
                number=a.number,
                state=a.state,
                worker_id=a.worker_id,
                started_at=a.started_at,
                finished_at=a.finished_at,
                error=a.error,
            )
        )
    return [
        TaskRunOut(
            node_id=t.node_id,
            state=t.state,
            upstream=t.upstream,
            error=t.error,
            started_at=t.started_at,
            finished_at=t.finished_at,
            lost_attempts=t.lost_attempts,
            attempts=attempts.get(t.id, []),
            mapped="map" in t.inputs,
            element_of=t.options.get("map_of"),
        )
        for t in svc.platform.task_runs(full_id)
    ]


@router.get("/projects/{project}/runs/{run_id}/tasks/{task}/logs", tags=["runs"])
def task_logs(
    run_id: str,
    task: str,
    access: Viewer,
    svc: ServicesDep,
    attempt: Annotated[int | None, Query(ge=1, le=MAX_INT)] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> LogOut:
    """An attempt's output (the latest attempt by default), also while it runs: its worker
    stores what it printed every MLP_LOG_SHIP_SECONDS. Follow it with ``offset``."""
    part = svc.platform.log_part(_run_id(svc, access, run_id), task, attempt, offset)
    return LogOut(
        task=task,
        attempt=part.attempt,
        state=part.state,
        log=part.text,
        offset=part.offset,
        next_offset=part.next_offset,
        kept_from=part.kept_from,
        running=part.running,
    )


@router.get("/projects/{project}/runs/{run_id}/metrics", tags=["runs"])
def run_metrics(
    run_id: str,
    access: Viewer,
    svc: ServicesDep,
    task: Annotated[str | None, Query(max_length=200)] = None,
    name: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
) -> list[MetricOut]:
    """The points the run's tasks logged (of one task or name, if given), in the order they
    were logged, at most ``limit`` from ``offset``: while a page is full, ask from
    ``offset + limit`` for more. A line per task and name: ``…/metrics/summary``."""
    found = svc.platform.metrics(
        _run_id(svc, access, run_id), task=task, name=name, limit=limit, offset=offset
    )
    return [
        MetricOut(task=node, name=m.name, value=m.value, step=m.step, attempt=m.attempt)
        for node, m in found
    ]


@router.get("/projects/{project}/runs/{run_id}/metrics/summary", tags=["runs"])
def run_metric_summaries(run_id: str, access: Viewer, svc: ServicesDep) -> list[MetricSummaryOut]:
    """Each task's metrics, one line per name: the value logged last, how many points, and
    their range."""
    full_id = _run_id(svc, access, run_id)
    return [
        MetricSummaryOut(**asdict(summary))
        for summary in svc.platform.metric_summaries([full_id])[full_id]
    ]


@router.get("/projects/{project}/runs/{run_id}/artifacts", tags=["runs"])
def run_artifacts(run_id: str, access: Viewer, svc: ServicesDep) -> list[ArtifactOut]:
    return [
        ArtifactOut(task=node, name=a.name, sha256=a.sha256, size=a.size, kind=a.kind)
        for node, a in svc.platform.artifacts_of(_run_id(svc, access, run_id))
    ]


@router.get(
    "/projects/{project}/runs/{run_id}/artifacts/{sha256}",
    tags=["runs"],
    response_class=FileResponse,
)
def download_artifact(run_id: str, sha256: str, access: Viewer, svc: ServicesDep) -> FileResponse:
    """The artifact's bytes; only artifacts of this run are served."""
    full_id = _run_id(svc, access, run_id)
    known = {a.sha256: a for _, a in svc.platform.artifacts_of(full_id)}
    if sha256 not in known:
        raise ApiError(404, "not_found", f"run {run_id} has no artifact {sha256}")
    path = svc.platform.artifacts.path(sha256)
    if not path.exists():
        raise ArtifactNotFound(f"artifact {sha256} is recorded but missing from the store")
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"{known[sha256].name}-{sha256[:12]}"
    )


@router.post("/projects/{project}/schedules", status_code=201, tags=["schedules"])
def create_schedule(body: ScheduleCreate, access: Editor, svc: ServicesDep) -> ScheduleOut:
    """Run a workflow at every tick of a cron expression (UTC)."""
    _check_params(svc, body.params)
    return _schedule_out(
        svc.platform.create_schedule(
            access.project_id, body.name, body.workflow, body.cron, body.params
        )
    )


@router.get("/projects/{project}/schedules", tags=["schedules"])
def list_schedules(access: Viewer, svc: ServicesDep) -> list[ScheduleOut]:
    return [_schedule_out(row) for row in svc.platform.schedules(access.project_id)]


@router.get("/projects/{project}/schedules/{name}", tags=["schedules"])
def get_schedule(name: str, access: Viewer, svc: ServicesDep) -> ScheduleOut:
    return _schedule_out(svc.platform.find_schedule(access.project_id, name))


@router.patch("/projects/{project}/schedules/{name}", tags=["schedules"])
def change_schedule(
    name: str, body: ScheduleChange, access: Editor, svc: ServicesDep
) -> ScheduleOut:
    """Pause (``enabled: false``) or resume a schedule, or change its cron or params. Once
    answered, no run of the schedule as it was is made; ticks missed while paused are not
    made up."""
    if body.params is not None:
        _check_params(svc, body.params)
    return _schedule_out(
        svc.platform.change_schedule(
            access.project_id, name, enabled=body.enabled, cron=body.cron, params=body.params
        )
    )


@router.delete("/projects/{project}/schedules/{name}", status_code=204, tags=["schedules"])
def delete_schedule(name: str, access: Editor, svc: ServicesDep) -> Response:
    """Delete a schedule; the runs it made stay (with ``scheduled_for``)."""
    svc.platform.delete_schedule(access.project_id, name)
    return Response(status_code=204)


def _schedule_out(row: ScheduleRow) -> ScheduleOut:
    return ScheduleOut(
        name=row.name,
        workflow=row.workflow_ref,
        cron=row.cron,
        params=row.params,
        enabled=row.enabled,
        next_fire_at=row.next_fire_at,
        last_error=row.last_error,
    )

"""Server-rendered pages: sign-in, runs, a run (DAG, timeline, metrics, artifacts, logs),
metric comparison, workflows. Same accounts, roles and project scoping as the API.

Sessions are the API's own tokens in cookies (HttpOnly, SameSite=Strict; Secure outside
development): a short-lived access token, renewed from the refresh token, whose rotation and
reuse detection are the API's. Every form that changes state carries a CSRF token that must
match the one in its cookie. Pages send a Content-Security-Policy that admits only the app's
own script and style sheet. The lists work without JavaScript; the script only refreshes
states while something runs.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import APIRouter, FastAPI, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from ml_platform.accounts import Identity, LoginBlocked, Role
from ml_platform.api.deps import Services, add_routes
from ml_platform.artifacts import ArtifactNotFound
from ml_platform.engine.states import RUN_TERMINAL, RunState
from ml_platform.sdk import WorkflowError
from ml_platform.security import AccessClaims, AuthError
from ml_platform.service import NotFound, RetryError
from ml_platform.ui import graphics

HERE = Path(__file__).parent
ACCESS_COOKIE, REFRESH_COOKIE, CSRF_COOKIE = "mlp_access", "mlp_refresh", "mlp_csrf"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/ui", include_in_schema=False)


class LoginNeeded(Exception):
    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class PageError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Session:
    identity: Identity
    claims: AccessClaims  # of the access token in use (the one just renewed, if so)
    csrf: str
    renewed: dict[str, str] | None = None  # cookies to set (a rotated token pair)


@dataclass
class Scope:
    session: Session
    project: str
    project_id: int
    role: Role

    @property
    def can_edit(self) -> bool:
        return self.role >= Role.EDITOR


def _services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def _secure(request: Request) -> bool:
    return bool(_services(request).platform.settings.environment != "development")


def _session(request: Request) -> Session:
    svc = _services(request)
    csrf = request.cookies.get(CSRF_COOKIE, "")
    token = request.cookies.get(ACCESS_COOKIE)
    if token and csrf:
        try:
            sign_in = svc.signed_in(token)
            return Session(sign_in.identity, sign_in.claims, csrf)
        except AuthError:
            pass
    refresh = request.cookies.get(REFRESH_COOKIE)
    if refresh and csrf:
        try:
            pair = svc.accounts.rotate(refresh)
        except AuthError:
            pair = None
        if pair is not None:
            access = svc.access_token(pair)
            renewed = {ACCESS_COOKIE: access, REFRESH_COOKIE: pair.refresh_token}
            return Session(pair.user, svc.signer.verify(access), csrf, renewed)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise LoginNeeded(target)


def _scope(request: Request, project: str, minimum: Role = Role.VIEWER) -> Scope:
    session = _session(request)
    found = _services(request).accounts.role_in(session.identity, project)
    if found is None:
        raise PageError(404, f"There is no project {project!r}, or it is not yours to see.")
    row, role = found
    if role < minimum:
        raise PageError(
            403, f"This needs the {minimum.label} role in {project}; you are " f"{role.label}."
        )
    return Scope(session, row.name, row.id, role)


def _check_csrf(request: Request, scope: Scope, token: str) -> None:
    if not token or not hmac.compare_digest(token, scope.session.csrf):
        raise PageError(403, "The form's security token did not match; reload and try again.")


def _set_cookies(request: Request, response: Response, cookies: dict[str, str]) -> None:
    svc = _services(request)
    lifetimes = {
        ACCESS_COOKIE: int(svc.signer.ttl.total_seconds()),
        REFRESH_COOKIE: int(svc.accounts.refresh_ttl.total_seconds()),
        CSRF_COOKIE: int(svc.accounts.refresh_ttl.total_seconds()),
    }
    for name, value in cookies.items():
        response.set_cookie(
            name,
            value,
            max_age=lifetimes[name],
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=_secure(request),
        )


def _page(
    request: Request, scope: Scope | None, template: str, status: int = 200, **context: Any
) -> HTMLResponse:
    response = templates.TemplateResponse(
        request,
        template,
        {"scope": scope, "color": graphics.color, **context},
        status_code=status,
    )
    if scope is not None and scope.session.renewed:
        _set_cookies(request, response, scope.session.renewed)
    return response


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _span(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return "—"
    seconds = ((end or datetime.now(UTC)) - start).total_seconds()
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


templates.env.filters["when"] = _ago
templates.env.globals["span"] = _span


def _dag_nodes(boxes: list[graphics.Box]) -> Markup:
    """The DAG's nodes as SVG, made here rather than by a template loop: a fan-out of
    10,000 is 10,000 nodes, which a Jinja loop takes half a second to write. Markup's ``%``
    escapes every value it puts in."""
    node = Markup(
        '<g class="node" data-node="%s" data-state="%s"><title>%s: %s%s</title>'
        '<rect x="%s" y="%s" width="%s" height="%s" rx="%s" fill="%s"/>%s</g>'
    )
    label = Markup('<text x="%s" y="%s" text-anchor="middle" class="label" fill="%s">%s</text>')
    return Markup("\n").join(
        node
        % (
            n.node_id,
            n.state,
            n.node_id,
            n.state,
            f" ({n.detail})" if n.detail else "",
            n.x,
            n.y,
            n.w,
            n.h,
            3 if n.compact else 6,
            n.fill,
            "" if n.compact else label % (n.x + n.w / 2, n.y + n.h / 2 + 4, n.ink, n.label),
        )
        for n in boxes
    )


templates.env.globals["dag_nodes"] = _dag_nodes


# -- sign-in --------------------------------------------------------------------------------


@router.get("/login")
def login_form(request: Request, next: str = "/ui/") -> HTMLResponse:
    return _page(request, None, "login.html", next=_local(next), error=None)


def _local(target: str) -> str:
    """Only paths of this UI may be a redirect target (no open redirect)."""
    return target if target.startswith("/ui/") and not target.startswith("//") else "/ui/"


def _same_origin(request: Request) -> bool:
    """Whether a form was posted from this site: browsers send Origin (or Sec-Fetch-Site) with
    every POST; a client that sends neither is no browser and cannot be led by another site."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc == request.headers.get("host", "")


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form(max_length=100)],
    password: Annotated[str, Form(max_length=1000)],
    next: Annotated[str, Form(max_length=2000)] = "/ui/",
) -> Response:
    if not _same_origin(request):
        # Login CSRF: another site must not sign a visitor in to an account of its choosing.
        raise PageError(403, "Sign in from this site's own sign-in page.")
    svc = _services(request)
    address = request.client.host if request.client else None
    try:
        identity = svc.accounts.login(svc.limiter, username, password, address)
    except LoginBlocked as exc:
        error = f"Too many failed sign-ins; try again in {exc.wait} s."
        return _page(request, None, "login.html", 429, next=_local(next), error=error)
    except AuthError:
        error = "Wrong username or password."
        return _page(request, None, "login.html", 401, next=_local(next), error=error)
    pair = svc.accounts.issue_refresh(identity)
    response = RedirectResponse(_local(next), status_code=303)
    _set_cookies(
        request,
        response,
        {
            ACCESS_COOKIE: svc.access_token(pair),
            REFRESH_COOKIE: pair.refresh_token,
            CSRF_COOKIE: secrets.token_urlsafe(32),
        },
    )
    return response


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
    """End the sign-in on the server (the same as the API's logout), then drop the cookies."""
    session = _session(request)
    if not csrf or not hmac.compare_digest(csrf, session.csrf):
        raise PageError(403, "The form's security token did not match; reload and try again.")
    _services(request).accounts.logout(session.claims, request.cookies.get(REFRESH_COOKIE))
    response = RedirectResponse("/ui/login", status_code=303)
    for name in (ACCESS_COOKIE, REFRESH_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name, path="/ui")
    return response


@router.get("/")
def home(request: Request) -> Response:
    session = _session(request)
    projects = _services(request).accounts.projects_of(session.identity)
    if not projects:
        raise PageError(404, "You are not a member of any project yet; ask a project admin.")
    return RedirectResponse(f"/ui/p/{quote(projects[0][0].name)}/runs", status_code=303)


# -- runs -----------------------------------------------------------------------------------


def _day(value: str | None, field: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise PageError(400, f"{field} must be a date like 2026-11-26, not {value!r}.") from None


@router.get("/p/{project}/runs")
def runs(
    request: Request,
    project: str,
    workflow: Annotated[str | None, Query(max_length=400)] = None,
    state: Annotated[str | None, Query(max_length=20)] = None,
    day: Annotated[str | None, Query(max_length=10)] = None,
    fragment: bool = False,
) -> HTMLResponse:
    scope = _scope(request, project)
    if state and state not in {s.value for s in RunState}:
        raise PageError(400, f"unknown state {state!r}")
    since = _day(day, "day")
    platform = _services(request).platform
    rows = platform.runs(
        200,
        state or None,
        project_id=scope.project_id,
        workflow=workflow or None,
        created_from=since,
        created_before=since + timedelta(days=1) if since else None,
    )
    names = sorted({w.name for w in platform.workflows(scope.project_id)})
    live = any(r.state not in RUN_TERMINAL for r, _ in rows)
    return _page(
        request,
        scope,
        "runs_rows.html" if fragment else "runs.html",
        rows=rows,
        names=names,
        workflow=workflow or "",
        state=state or "",
        day=day or "",
        states=[s.value for s in RunState],
        live=live,
    )


def _run_of(request: Request, scope: Scope, run_id: str) -> tuple[Any, Any]:
    platform = _services(request).platform
    try:
        full = platform.resolve_run_id(run_id, scope.project_id)
        return platform.run(full, scope.project_id)
    except NotFound:
        raise PageError(404, f"There is no run {run_id!r} in {scope.project}.") from None


@router.get("/p/{project}/runs/{run_id}")
def run_page(request: Request, project: str, run_id: str, fragment: bool = False) -> HTMLResponse:
    scope = _scope(request, project)
    run, wf = _run_of(request, scope, run_id)
    platform = _services(request).platform
    tasks = platform.task_rows(run.id)
    by_task = {t.id: t.node_id for t in tasks}
    # Read after the tasks: an attempt of a task run made in between (a map expanding) is
    # left for the next refresh, with its task.
    attempts = [a for a in platform.attempts(run.id) if a.task_run_id in by_task]
    dag = graphics.layout_dag(
        graphics.mapped_nodes(
            [(t.node_id, t.upstream, t.state, t.options.get("map_of")) for t in tasks]
        )
    )
    # A large run's timeline and table show the tasks a person looks for first -- failed,
    # running, queued -- then the rest in order, up to ROWS_SHOWN: the DAG shows them all.
    shown = tasks
    if len(tasks) > ROWS_SHOWN:
        first = {"failed": 0, "running": 1, "queued": 2, "upstream_failed": 3}
        shown = sorted(tasks, key=lambda t: (first.get(t.state, 9), t.position))[:ROWS_SHOWN]
        shown.sort(key=lambda t: t.position)
        kept = {t.id for t in shown}
        attempts = [a for a in attempts if a.task_run_id in kept]
    timeline = graphics.layout_timeline(
        [
            graphics.AttemptSpan(
                by_task[a.task_run_id],
                a.number,
                a.state,
                _aware(a.started_at),
                _aware(a.finished_at),
                a.error,
            )
            for a in attempts
        ],
        now=datetime.now(UTC),
    )
    attempts_of: dict[str, list[Any]] = {}
    for a in attempts:
        attempts_of.setdefault(by_task[a.task_run_id], []).append(a)
    return _page(
        request,
        scope,
        "run_body.html" if fragment else "run.html",
        run=run,
        wf=wf,
        tasks=shown,
        total_tasks=len(tasks),
        attempts_of=attempts_of,
        dag=dag,
        timeline=timeline,
        metrics=platform.metric_summaries([run.id])[run.id],
        artifacts=platform.artifacts_of(run.id),
        live=run.state not in RUN_TERMINAL,
    )


#: Rows of a run page's timeline and task table; a larger run shows the ones that matter.
ROWS_SHOWN = 300


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive UTC datetimes; PostgreSQL aware ones."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@router.get("/p/{project}/runs/{run_id}/tasks/{task}/log")
def task_log(
    request: Request,
    project: str,
    run_id: str,
    task: str,
    attempt: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> HTMLResponse:
    scope = _scope(request, project)
    run, _ = _run_of(request, scope, run_id)
    try:
        part = _services(request).platform.log_part(run.id, task, attempt)
    except NotFound as exc:
        raise PageError(404, str(exc)) from None
    return _page(request, scope, "log.html", run=run, task=task, log=part)


@router.get("/p/{project}/runs/{run_id}/tasks/{task}/log.json")
def task_log_part(
    request: Request,
    project: str,
    run_id: str,
    task: str,
    attempt: Annotated[int, Query(ge=1, le=2**31 - 1)],
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> JSONResponse:
    """What an attempt printed from ``offset`` on: the log page follows a running attempt."""
    scope = _scope(request, project)
    run, _ = _run_of(request, scope, run_id)
    try:
        part = _services(request).platform.log_part(run.id, task, attempt, offset)
    except NotFound as exc:
        raise PageError(404, str(exc)) from None
    return JSONResponse(
        {
            "state": part.state,
            "text": part.text,
            "offset": part.offset,
            "next_offset": part.next_offset,
            "running": part.running,
        }
    )


@router.get("/p/{project}/runs/{run_id}/artifacts/{sha256}")
def artifact(request: Request, project: str, run_id: str, sha256: str) -> FileResponse:
    scope = _scope(request, project)
    run, _ = _run_of(request, scope, run_id)
    platform = _services(request).platform
    names = {a.sha256: a.name for _, a in platform.artifacts_of(run.id)}
    if sha256 not in names:
        raise PageError(404, "This run has no such artifact.")
    try:
        path = platform.artifacts.path(sha256)
    except ArtifactNotFound:
        raise PageError(404, "The artifact's file is gone from the store.") from None
    if not path.exists():
        raise PageError(404, "The artifact's file is gone from the store.")
    return FileResponse(path, filename=names[sha256], media_type="application/octet-stream")


@router.post("/p/{project}/runs/{run_id}/cancel")
def cancel(
    request: Request, project: str, run_id: str, csrf: Annotated[str, Form()] = ""
) -> Response:
    scope = _scope(request, project, Role.EDITOR)
    _check_csrf(request, scope, csrf)
    run, _ = _run_of(request, scope, run_id)
    _services(request).platform.cancel(run.id)
    return RedirectResponse(f"/ui/p/{quote(scope.project)}/runs/{run.id}", status_code=303)


@router.post("/p/{project}/schedules/{name}/pause")
def pause_schedule(
    request: Request, project: str, name: str, csrf: Annotated[str, Form()] = ""
) -> Response:
    return _set_schedule(request, project, name, csrf, enabled=False)


@router.post("/p/{project}/schedules/{name}/resume")
def resume_schedule(
    request: Request, project: str, name: str, csrf: Annotated[str, Form()] = ""
) -> Response:
    return _set_schedule(request, project, name, csrf, enabled=True)


def _set_schedule(request: Request, project: str, name: str, csrf: str, enabled: bool) -> Response:
    scope = _scope(request, project, Role.EDITOR)
    _check_csrf(request, scope, csrf)
    try:
        _services(request).platform.change_schedule(scope.project_id, name, enabled=enabled)
    except NotFound:
        raise PageError(404, "This project has no such schedule.") from None
    return RedirectResponse(f"/ui/p/{quote(scope.project)}/workflows", status_code=303)


@router.post("/p/{project}/runs/{run_id}/rerun")
def rerun(
    request: Request, project: str, run_id: str, csrf: Annotated[str, Form()] = ""
) -> Response:
    scope = _scope(request, project, Role.EDITOR)
    _check_csrf(request, scope, csrf)
    run, wf = _run_of(request, scope, run_id)
    svc = _services(request)
    try:
        submitted = svc.platform.submit(
            svc.platform.trace(wf.name, run.params), project_id=scope.project_id
        )
    except WorkflowError as exc:
        raise PageError(422, f"Cannot re-run {wf.name}: {exc}") from None
    return RedirectResponse(
        f"/ui/p/{quote(scope.project)}/runs/{svc.publish(submitted)}", status_code=303
    )


@router.post("/p/{project}/runs/{run_id}/retry")
def retry(
    request: Request, project: str, run_id: str, csrf: Annotated[str, Form()] = ""
) -> Response:
    """A new run that reuses what succeeded in this one and runs the rest."""
    scope = _scope(request, project, Role.EDITOR)
    _check_csrf(request, scope, csrf)
    run, _ = _run_of(request, scope, run_id)
    svc = _services(request)
    try:
        submitted = svc.platform.retry(run.id, project_id=scope.project_id)
    except RetryError as exc:
        raise PageError(409, f"Cannot retry this run: {exc}") from None
    return RedirectResponse(
        f"/ui/p/{quote(scope.project)}/runs/{svc.publish(submitted)}", status_code=303
    )


# -- comparison and workflows ---------------------------------------------------------------


@router.get("/p/{project}/compare")
def compare(
    request: Request,
    project: str,
    workflow: Annotated[str | None, Query(max_length=400)] = None,
    metric: Annotated[str | None, Query(max_length=200)] = None,
) -> HTMLResponse:
    scope = _scope(request, project)
    platform = _services(request).platform
    names = sorted({w.name for w in platform.workflows(scope.project_id)})
    # By default the workflow whose metrics were logged last: a page with something on it.
    workflow = workflow or platform.latest_workflow_with_metrics(scope.project_id)
    workflow = workflow or (names[0] if names else None)
    runs_ = []
    if workflow:
        runs_ = list(
            reversed(
                platform.runs(
                    50, RunState.SUCCEEDED, project_id=scope.project_id, workflow=workflow
                )
            )
        )
    metrics_of = platform.metric_summaries(run.id for run, _ in runs_)
    metric_names = sorted({m.name for found in metrics_of.values() for m in found})
    if metric not in metric_names:
        preferred = [n for n in metric_names if "auc" in n] + metric_names
        metric = preferred[0] if preferred else None
    table = [
        (run, {m.task: m.last for m in metrics_of[run.id] if m.name == metric}) for run, _ in runs_
    ]
    columns = sorted({node for _, row in table for node in row})
    # Series named by the task and the params it logged that differ between the tasks.
    logged = platform.task_params(run.id for run, _ in runs_)
    params_of: dict[str, dict[str, Any]] = {}
    for (_, node), params in logged.items():
        if node in columns:
            params_of.setdefault(node, params)
    names_of = graphics.series_names(columns, params_of)
    values = [(run.id[:8], names_of[node], v) for run, row in table for node, v in row.items()]
    chart = graphics.metric_chart([r.id[:8] for r, _ in runs_], values)
    return _page(
        request,
        scope,
        "compare.html",
        names=names,
        workflow=workflow or "",
        metric=metric or "",
        metric_names=metric_names,
        chart=chart,
        table=table,
        columns=columns,
        column_names=names_of,
    )


@router.get("/p/{project}/workflows")
def workflows(request: Request, project: str) -> HTMLResponse:
    scope = _scope(request, project)
    platform = _services(request).platform
    versions: dict[str, list[Any]] = {}
    for row in platform.workflows(scope.project_id):
        versions.setdefault(row.name, []).append(row)
    schedules: dict[str, list[Any]] = {}
    for schedule in platform.schedules(scope.project_id):
        schedules.setdefault(schedule.workflow_ref, []).append(schedule)
    return _page(request, scope, "workflows.html", versions=versions, schedules=schedules)


# -- wiring ---------------------------------------------------------------------------------


def install(app: FastAPI) -> None:
    """Add the UI's pages, static files and error pages to ``app`` (headers: api/edge.py)."""
    add_routes(app, router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    def no_such_page(rest: str) -> Response:
        raise PageError(404, "There is no such page here.")

    # Last, after every page and the static files: any other /ui address is an HTML 404.
    app.add_api_route("/ui/{rest:path}", no_such_page, methods=["GET"], include_in_schema=False)

    @app.exception_handler(LoginNeeded)
    async def login_needed(_request: Request, exc: LoginNeeded) -> Response:
        return RedirectResponse(f"/ui/login?{urlencode({'next': exc.next_url})}", status_code=303)

    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> Response:
        return templates.TemplateResponse(
            request,
            "error.html",
            {"scope": None, "status": exc.status, "message": exc.message},
            status_code=exc.status,
        )

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse("/ui/", status_code=307)

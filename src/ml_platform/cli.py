"""``mlp``: run ML pipelines and look at their runs from the terminal."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ml_platform.engine.states import RUN_TERMINAL, RunState

# Deferred to the commands that use them: `mlp --help` must not pay for SQLAlchemy, Alembic,
# Redis, FastAPI or pydantic (see tests/unit/test_cli_imports.py).
if TYPE_CHECKING:
    from ml_platform.accounts import Accounts
    from ml_platform.client import Client
    from ml_platform.dispatch import Dispatch
    from ml_platform.service import Platform, Submitted

DEMO_WORKFLOW = "ml_platform.examples.classifier:training_pipeline"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: Seconds between two reads of a followed log (`mlp logs -f`).
FOLLOW_SECONDS = 0.5

# Plain help (rich_markup_mode=None): Typer's rich help formatter alone costs ≈ 0.2 s to
# import, most of what `mlp --help` took.
app = typer.Typer(
    help="ML Platform: run ML pipelines as DAGs of Python tasks, reliably.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(db_app, name="db")
users_app = typer.Typer(help="Users of the API.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(users_app, name="users")
schedules_app = typer.Typer(
    help="Cron schedules (UTC): make, list, pause, resume, delete. `mlp server` fires them.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(schedules_app, name="schedules")
pools_app = typer.Typer(
    help="Pools: how many attempts of tasks with @task(pool=NAME) run at once, across runs.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(pools_app, name="pools")


def _print_version(asked: bool) -> None:
    if asked:
        from ml_platform import __version__

        print(f"mlp (ml-platform) {__version__}")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """ML Platform: run ML pipelines as DAGs of Python tasks, reliably."""


console = Console(highlight=False)
STATE_STYLE = {
    "succeeded": "green",
    "cached": "cyan",
    "reused": "cyan",
    "running": "yellow",
    "queued": "blue",
    "pending": "dim",
    "failed": "red",
    "lost": "red",
    "upstream_failed": "red",
    "cancelled": "magenta",
    "skipped": "dim",
}


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    # Escaped: messages name tasks like train[0] and extras like [examples], not markup.
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


@contextmanager
def _platform() -> Iterator[Platform]:
    from ml_platform.config import load_settings
    from ml_platform.sdk import WorkflowError
    from ml_platform.service import NotFound, Platform
    from ml_platform.store.db import DatabaseUnavailable

    platform = Platform(load_settings())
    try:
        platform.start()
        yield platform
    except (WorkflowError, NotFound, DatabaseUnavailable, ValueError) as exc:
        _fail(str(exc))
    finally:
        platform.close()


def _styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def _seconds(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return ""
    finish = end or datetime.now(start.tzinfo)
    return f"{(finish - start).total_seconds():.1f} s"


@dataclass
class TaskView:
    """One row of a run's task table, from the database or from the API."""

    node_id: str
    state: str
    attempts: list[str]
    started_at: datetime | None
    finished_at: datetime | None
    metrics: list[str]
    #: A mapped task: how many elements it expanded into (None for other tasks).
    elements: int | None = None


def _element_counts(rows: list[tuple[str, bool, str | None]]) -> dict[str, int]:
    """Elements per mapped task, from (node id, is mapped, mapped task it belongs to)."""
    counts = {node_id: 0 for node_id, mapped, _ in rows if mapped}
    for _, _, parent in rows:
        if parent in counts:
            counts[parent] += 1
    return counts


def _local_tasks(platform: Platform, run_id: str) -> list[TaskView]:
    attempts: dict[int, list[str]] = {}
    for attempt in platform.attempts(run_id):
        attempts.setdefault(attempt.task_run_id, []).append(attempt.state)
    metrics: dict[str, list[str]] = {}
    for summary in platform.metric_summaries([run_id])[run_id]:
        metrics.setdefault(summary.task, []).append(_metric(asdict(summary)))
    tasks = platform.task_runs(run_id)
    elements = _element_counts(
        [(t.node_id, "map" in t.inputs, t.options.get("map_of")) for t in tasks]
    )
    return [
        TaskView(
            t.node_id,
            t.state,
            attempts.get(t.id, []),
            t.started_at,
            t.finished_at,
            metrics.get(t.node_id, []),
            elements.get(t.node_id),
        )
        for t in tasks
    ]


def _remote_tasks(client: Client, run_id: str) -> list[TaskView]:
    metrics: dict[str, list[str]] = {}
    for summary in client.metric_summaries(run_id):
        metrics.setdefault(summary["task"], []).append(_metric(summary))
    tasks = client.tasks(run_id)
    elements = _element_counts(
        [(t["node_id"], t.get("mapped", False), t.get("element_of")) for t in tasks]
    )
    return [
        TaskView(
            t["node_id"],
            t["state"],
            [a["state"] for a in t["attempts"]],
            _when(t["started_at"]),
            _when(t["finished_at"]),
            metrics.get(t["node_id"], []),
            elements.get(t["node_id"]),
        )
        for t in tasks
    ]


def _metric(summary: dict[str, Any]) -> str:
    """A task's metric of one name: its last value, and how many points if more than one."""
    shown = f"{summary['name']}={summary['last']:.4g}"
    points = summary["points"]
    return shown if points == 1 else f"{shown} (last of {points:,})"


def _when(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _tasks_table(views: list[TaskView]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for column in ("task", "state", "attempts", "duration", "metrics"):
        table.add_column(column)
    for view in views:
        tries = view.attempts
        if view.elements is not None:
            tried = f"map ×{view.elements}"  # the elements are the rows that follow
        else:
            tried = " ".join(_styled(s) for s in tries) if len(tries) > 1 else str(len(tries))
        table.add_row(
            escape(view.node_id),
            _styled(view.state),
            tried,
            _seconds(view.started_at, view.finished_at),
            escape(" ".join(view.metrics)),  # names the task's author chose: text, not markup
        )
    return table


#: Runs with more tasks than this show counts by state and their running and failed tasks
#: while they run, instead of a row per task (which would cost O(tasks) per redraw).
SCREENFUL = 30
SHOWN = 8


def _compact(
    counts: dict[str, int], running: list[tuple[str, Any, Any]], failed: list[tuple[str, Any, Any]]
) -> RenderableType:
    """A large run's progress: its counts by state and a few running and failed tasks."""
    total = sum(counts.values())
    line = f"{total:,} tasks: " + ", ".join(
        f"{n:,} {_styled(state)}" for state, n in sorted(counts.items(), key=lambda c: -c[1])
    )
    table = Table(show_edge=False, header_style="bold")
    for column in ("task", "state", "duration"):
        table.add_column(column)
    for state, rows, count in (
        ("running", running, counts.get("running", 0)),
        ("failed", failed, counts.get("failed", 0)),
    ):
        for node_id, started, finished in rows:
            table.add_row(node_id, _styled(state), _seconds(started, finished))
        if count > len(rows):
            table.add_row(f"… {count - len(rows):,} more", _styled(state), "")
    return Group(line, table) if table.row_count else Group(line)


def _local_view(platform: Platform, run_id: str) -> RenderableType:
    progress = platform.progress(run_id, SHOWN)
    if progress.total <= SCREENFUL:
        return _tasks_table(_local_tasks(platform, run_id))
    return _compact(progress.counts, progress.running, progress.failed)


def _remote_view(client: Client, run_id: str) -> RenderableType:
    progress = client.progress(run_id, SHOWN)
    if progress["total"] <= SCREENFUL:
        return _tasks_table(_remote_tasks(client, run_id))

    def rows(items: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
        return [(t["node_id"], _when(t["started_at"]), _when(t["finished_at"])) for t in items]

    return _compact(progress["counts"], rows(progress["running"]), rows(progress["failed"]))


def _summary(views: list[TaskView]) -> str:
    states = Counter(v.state for v in views)
    line = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    if states.get("cached"):
        line += f" ({states['cached']} of {len(views)} tasks reused from cache)"
    return line


def _verdict(platform: Platform, run_id: str) -> str:
    run, wf = platform.run(run_id)
    return (
        f"run {run_id[:8]} of {wf.name} v{wf.version} {_styled(run.state)} "
        f"in {_seconds(run.started_at or run.created_at, run.finished_at)}: "
        + _summary(_local_tasks(platform, run_id))
    )


def _execute(platform: Platform, run_id: str, queued: list[Dispatch], concurrency: int) -> RunState:
    """Drive one run to its end in this process, showing progress; Ctrl-C cancels it.

    Ctrl-C only sets a flag that the loop reads between two passes, so it never interrupts a
    database transaction (an interrupted SQLite transaction would hold the write lock).
    """
    from ml_platform.dispatch import InProcessDispatcher
    from ml_platform.worker import Runtime, Worker

    dispatcher = InProcessDispatcher()
    dispatcher.publish(queued)
    worker = Worker(platform, dispatcher, concurrency=concurrency)
    runtime = Runtime(platform, dispatcher, worker, only_run=run_id)
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: interrupted.set())
    try:
        with Live(_local_view(platform, run_id), console=console, refresh_per_second=4) as live:
            # A large run (also one that grew: a map expanded) shows no line per task event:
            # thousands of them would cost more than its tasks.
            large = threading.Event()

            def on_event(message: str) -> None:
                if not large.is_set():
                    live.console.print(f"  {message}", style="dim")

            def on_progress() -> None:
                view = _local_view(platform, run_id)
                if not isinstance(view, Table):
                    large.set()
                live.update(view)

            worker.on_event = on_event
            try:
                state = runtime.drive(run_id, on_progress=on_progress, stop=interrupted.is_set)
                if state is not None:
                    return state
                platform.cancel(run_id)
                worker.stop_all("cancelled by Ctrl-C")
                platform.schedule(run_id)
                live.update(_local_view(platform, run_id))
                raise KeyboardInterrupt
            finally:
                worker.on_event = lambda _message: None
    finally:
        worker.close()
        signal.signal(signal.SIGINT, previous)
        console.line()  # after the live table's last render: the verdict starts a new line


def _run_and_report(
    platform: Platform, reference: str, raw_params: dict[str, str], concurrency: int
) -> str:
    from ml_platform.store.db import safe_url
    from ml_platform.tracer import load_workflow

    wf = load_workflow(reference)
    submitted = platform.submit(wf, wf.parse_cli_params(raw_params))
    console.print(
        f"run [bold]{submitted.run_id[:8]}[/] of {wf.name} v{submitted.workflow_version} "
        f"submitted ({safe_url(platform.settings.database_url)})"
    )
    return _drive_and_report(platform, submitted, concurrency)


def _drive_and_report(platform: Platform, submitted: Submitted, concurrency: int) -> str:
    """Run a submitted run here to its end with live progress; exit 1 unless it succeeded."""
    try:
        state = _execute(platform, submitted.run_id, submitted.queued, concurrency)
    except KeyboardInterrupt:
        console.print(f"[magenta]run {submitted.run_id[:8]} cancelled by Ctrl-C[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    console.print(_verdict(platform, submitted.run_id))
    if state is not RunState.SUCCEEDED:
        for task_run in platform.task_runs(submitted.run_id):
            if task_run.state == "failed":
                console.print(
                    f"  [red]{escape(task_run.node_id)}[/]: {escape(task_run.error or '')}"
                )
        raise typer.Exit(EXIT_FAILED)
    return submitted.run_id


def _reference(text: str) -> str:
    """A workflow reference as workers import it (``package.module:function``), also from a
    module's path as people write it (``pipes/train.py:pipeline`` -> ``pipes.train:pipeline``)
    when that file is under the current directory, whose modules workers import."""
    module, sep, attr = text.partition(":")
    if not sep or not (module.endswith(".py") or "/" in module or os.sep in module):
        return text
    path = Path(module)
    if not path.is_file():
        _fail(f"{module} is not a file; give package.module:workflow_name")
    here = Path.cwd().resolve()
    try:
        relative = path.resolve().relative_to(here)
    except ValueError:
        _fail(
            f"{module} is not under the current directory ({here}), from which workflows are "
            "imported: run from the directory that holds it"
        )
    return f"{'.'.join(relative.with_suffix('').parts)}:{attr}"


def _parse_pairs(pairs: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"parameter {pair!r} must look like key=value")
        values[key.strip()] = value
    return values


Server = Annotated[
    str | None,
    typer.Option("--server", envvar="MLP_SERVER", help="Use this API server (see `mlp login`)."),
]
ProjectName = Annotated[
    str, typer.Option("--project", envvar="MLP_PROJECT", help="Project on the server.")
]
RunId = Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input.")
]


@contextmanager
def _client(server: str, project: str) -> Iterator[Client]:
    from ml_platform.client import ApiClientError, Client, Credentials
    from ml_platform.config import load_settings

    settings = load_settings()
    credentials = Credentials(settings.home)
    saved = credentials.get(server)
    if saved is None:
        _fail(f"not logged in to {server}; run: mlp login --server {server} --username NAME")
    client = Client(
        server,
        token=saved["access_token"],
        refresh_token=saved["refresh_token"],
        project=project,
        on_tokens=lambda access, refresh: credentials.save(server, access, refresh),
        on_wait=lambda line: console.print(f"  {server}: {line}", style="dim"),
    )
    try:
        yield client
    except ApiClientError as exc:
        _fail(str(exc), EXIT_USAGE if 400 <= exc.status < 500 else EXIT_FAILED)
    finally:
        client.close()


def _watch_remote(client: Client, run_id: str) -> str:
    """Show a remote run's progress until it ends; Ctrl-C cancels it on the server."""
    try:
        with Live(_tasks_table([]), console=console, refresh_per_second=4) as live:
            try:
                while True:
                    run = client.run(run_id)
                    live.update(_remote_view(client, run_id))
                    if run["state"] in {s.value for s in RUN_TERMINAL}:
                        return str(run["state"])
                    time.sleep(0.5)
            except KeyboardInterrupt:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                client.cancel(run_id)
                raise
    finally:
        console.line()  # after the live table's last render: the verdict starts a new line


def _json_values(params: dict[str, str]) -> dict[str, object]:
    """``key=value`` strings as a workflow that is not imported here takes them: JSON where
    it parses (the receiving side checks them against the workflow's signature)."""
    values: dict[str, object] = {}
    for key, text in params.items():
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    return values


def _remote_run(client: Client, workflow: str, params: dict[str, str]) -> None:
    run = client.submit(workflow, _json_values(params))
    console.print(
        f"run [bold]{run['id'][:8]}[/] of {run['workflow']} v{run['workflow_version']} "
        f"submitted to {client.url} (project {client.project})"
    )
    try:
        state = _watch_remote(client, run["id"])
    except KeyboardInterrupt:
        console.print(f"[magenta]run {run['id'][:8]} cancelled by Ctrl-C[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    views = _remote_tasks(client, run["id"])
    console.print(f"run {run['id'][:8]} of {run['workflow']} {_styled(state)}: {_summary(views)}")
    if state != RunState.SUCCEEDED:
        for task in client.tasks(run["id"]):
            if task["state"] == "failed":
                console.print(f"  [red]{escape(task['node_id'])}[/]: {escape(task['error'])}")
        raise typer.Exit(EXIT_FAILED)


Concurrency = Annotated[
    int, typer.Option("--concurrency", "-c", min=1, help="Attempts run at once.")
]


@app.command()
def demo(concurrency: Concurrency = max(2, os.cpu_count() or 2)) -> None:
    """Run the example ML pipeline: data, split, a training grid, evaluation, model registry."""
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        _fail(
            "the example pipeline needs scikit-learn, which this installation leaves out: "
            "pip install 'ml-platform[examples]' (from a clone, `uv run mlp demo` has it)"
        )
    with _platform() as platform:
        run_id = _run_and_report(platform, DEMO_WORKFLOW, {}, concurrency)
        for node_id, artifact in platform.artifacts_of(run_id):
            console.print(f"artifact {artifact.name} from {node_id}: sha256 {artifact.sha256[:12]}")


@app.command()
def run(
    workflow: Annotated[
        str,
        typer.Argument(help="package.module:workflow_name (or path/to/module.py:workflow_name)"),
    ],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="A run parameter, key=value.")
    ] = None,
    concurrency: Concurrency = max(2, os.cpu_count() or 2),
    server: Server = None,
    project: ProjectName = "default",
) -> None:
    """Submit a run and show its live progress; exit non-zero unless it succeeds.

    Without --server the run executes here (embedded); with it, on the server's workers.
    """
    workflow = _reference(workflow)
    params = _parse_pairs(param or [])
    if server:
        with _client(server, project) as client:
            _remote_run(client, workflow, params)
        return
    sys.path.insert(0, os.getcwd())
    with _platform() as platform:
        _run_and_report(platform, workflow, params, concurrency)


@app.command()
def runs(
    state: Annotated[RunState | None, typer.Option(help="Only runs in this state.")] = None,
    workflow: Annotated[
        str | None, typer.Option(help="Only runs of this workflow (module:function).")
    ] = None,
    schedule: Annotated[str | None, typer.Option(help="Only runs this schedule made.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 20,
    server: Server = None,
    project: ProjectName = "default",
) -> None:
    """List recent runs."""
    table = Table(show_edge=False, header_style="bold")
    for column in ("run", "workflow", "state", "created", "duration"):
        table.add_column(column)

    def row(
        run_id: str, workflow: str, state_: str, created: datetime, *span: datetime | None
    ) -> None:
        table.add_row(
            run_id[:8],
            workflow,
            _styled(state_),
            created.strftime("%Y-%m-%d %H:%M:%S"),
            _seconds(*span),
        )

    if server:
        with _client(server, project) as client:
            for item in client.runs(state=state, limit=limit, workflow=workflow, schedule=schedule):
                row(
                    item["id"],
                    f"{item['workflow']} v{item['workflow_version']}",
                    item["state"],
                    datetime.fromisoformat(item["created_at"]),
                    _when(item["started_at"]),
                    _when(item["finished_at"]),
                )
    else:
        with _platform() as platform:
            for run_row, wf in platform.runs(
                limit=limit, state=state, workflow=workflow, schedule=schedule
            ):
                row(
                    run_row.id,
                    f"{wf.name} v{wf.version}",
                    run_row.state,
                    run_row.created_at,
                    run_row.started_at,
                    run_row.finished_at,
                )
    console.print(table)


@app.command()
def show(
    run_id: RunId,
    server: Server = None,
    project: ProjectName = "default",
) -> None:
    """Show a run's tasks with their states, attempts, durations and metrics."""
    if server:
        with _client(server, project) as client:
            run_ = client.run(run_id)
            console.print(f"params: {escape(str(run_['params']))}")
            _provenance(run_["retry_of"], _when(run_.get("scheduled_for")))
            views = _remote_tasks(client, run_["id"])
            console.print(_tasks_table(views))
            for task in client.tasks(run_["id"]):
                for attempt in task["attempts"]:
                    if attempt["error"]:
                        console.print(
                            f"  {escape(task['node_id'])} attempt {attempt['number']} "
                            f"({_styled(attempt['state'])}): {escape(attempt['error'])}"
                        )
            for kept in client.artifacts(run_["id"]):
                console.print(
                    f"  artifact {escape(kept['name'])} from {escape(kept['task'])}: "
                    f"{kept['kind']}, {kept['size']} bytes, sha256 {kept['sha256']}"
                )
            console.print(
                f"run {run_['id'][:8]} of {run_['workflow']} v{run_['workflow_version']} "
                f"{_styled(run_['state'])}: {_summary(views)}"
            )
        return
    with _platform() as platform:
        full_id = platform.resolve_run_id(run_id)
        run_row, _ = platform.run(full_id)
        console.print(f"params: {escape(str(run_row.params))}")
        _provenance(run_row.retry_of, run_row.scheduled_for)
        console.print(_tasks_table(_local_tasks(platform, full_id)))
        node_of = {t.id: t.node_id for t in platform.task_runs(full_id)}
        for attempt in platform.attempts(full_id):
            # A task run made after node_of was read (a map expanding) is shown next time.
            if attempt.error and attempt.task_run_id in node_of:
                console.print(
                    f"  {node_of[attempt.task_run_id]} attempt {attempt.number} "
                    f"({_styled(attempt.state)}): {escape(attempt.error)}"
                )
        for node_id, artifact in platform.artifacts_of(full_id):
            console.print(
                f"  artifact {escape(artifact.name)} from {escape(node_id)}: {artifact.kind}, "
                f"{artifact.size} bytes, sha256 {artifact.sha256}"
            )
        console.print(_verdict(platform, full_id))


def _provenance(retry_of: str | None, scheduled_for: datetime | None) -> None:
    """Where a run came from, when not from a person's submission."""
    if retry_of:
        console.print(f"retries run {retry_of[:8]}")
    if scheduled_for is not None:
        console.print(f"made by a schedule for its tick of {scheduled_for:%Y-%m-%d %H:%M} UTC")


@app.command()
def logs(
    run_id: RunId,
    task: Annotated[str, typer.Argument(help="Task id, as `mlp show` lists it.")],
    attempt: Annotated[
        int | None, typer.Option(help="Attempt number; the latest by default.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the attempt ends.")
    ] = False,
    server: Server = None,
    project: ProjectName = "default",
) -> None:
    """Print the output of a task's attempt (with -f, as it is written)."""
    if server:
        with _client(server, project) as client:
            _print_log(lambda offset: client.logs(run_id, task, attempt, offset), task, follow)
        return
    with _platform() as platform:
        full_id = platform.resolve_run_id(run_id)

        def read(offset: int) -> dict[str, Any]:
            part = platform.log_part(full_id, task, attempt, offset)
            return {**asdict(part), "log": part.text}

        _print_log(read, task, follow)


#: In a task's output shown on a terminal: colours and styles (SGR) pass; any other escape
#: sequence or control character is shown, not obeyed.
_SGR = re.compile(r"\x1b\[[0-9;]*m")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """``text`` as a terminal may be given it: a task's output is anyone's, and escape
    sequences other than colours can retitle the window, write the clipboard (OSC 52: a
    command to paste) or move the cursor over what was printed. Each ESC that does not start
    a colour becomes "␛", every other control character but newline, carriage return and
    tab "�"."""
    kept: list[str] = []
    end = 0
    for match in _SGR.finditer(text):
        kept.append(_CONTROL.sub(_shown, text[end : match.start()]))
        kept.append(match.group())
        end = match.end()
    kept.append(_CONTROL.sub(_shown, text[end:]))
    return "".join(kept)


def _shown(match: re.Match[str]) -> str:
    return "␛" if match.group() == "\x1b" else "\ufffd"


def _print_log(read: Callable[[int], dict[str, Any]], task: str, follow: bool) -> None:
    """Print a log; following, poll for more until the attempt ends (Ctrl-C stops). Says so
    where output was not kept: before the kept part, or cut away between two looks. On a
    terminal, as ``terminal_safe`` makes it; into a pipe or a file, as it was printed."""
    safe = terminal_safe if sys.stdout.isatty() else str
    offset = 0
    body = read(offset)
    console.print(f"[dim]{task} attempt {body['attempt']} ({body['state']})[/]")
    number = body["attempt"]
    while True:
        missed = body["offset"] - offset
        if missed > 0:
            console.print(
                f"[dim]… ({missed:,} characters of output not kept: a log keeps its last MiB)[/]"
            )
        sys.stdout.write(safe(body["log"]))
        sys.stdout.flush()
        if not follow or not body.get("running"):
            break
        try:
            time.sleep(FOLLOW_SECONDS)
        except KeyboardInterrupt:
            return
        offset = body["next_offset"]
        body = read(offset)
        if body["attempt"] != number:
            break
    if follow:
        console.print(f"[dim]{task} attempt {body['attempt']} ended: {body['state']}[/]")


@app.command()
def retry(
    run_id: RunId,
    from_task: Annotated[
        str | None,
        typer.Option("--from", help="Also rerun this task and everything downstream of it."),
    ] = None,
    latest: Annotated[
        bool,
        typer.Option(
            "--latest",
            help="Use the workflow's code as it is now: tasks whose code changed rerun, "
            "and everything after them.",
        ),
    ] = False,
    concurrency: Concurrency = max(2, os.cpu_count() or 2),
    server: Server = None,
    project: ProjectName = "default",
) -> None:
    """Run an ended run again: reuse what succeeded there, run the rest (and watch it)."""
    if server:
        with _client(server, project) as client:
            body = client.retry(run_id, from_task, latest)
            console.print(f"run {body['id'][:8]} retries {run_id[:8]}")
            state = _watch_remote(client, body["id"])
        raise typer.Exit(0 if state == RunState.SUCCEEDED else EXIT_FAILED)
    from ml_platform.sdk import WorkflowError
    from ml_platform.service import RetryError

    sys.path.insert(0, os.getcwd())
    with _platform() as platform:
        try:
            submitted = platform.retry(
                platform.resolve_run_id(run_id), from_task=from_task, latest=latest
            )
        except (RetryError, WorkflowError) as exc:
            _fail(str(exc))
        reused = sum(t.state == "reused" for t in platform.task_runs(submitted.run_id))
        console.print(
            f"run [bold]{submitted.run_id[:8]}[/] retries {run_id[:8]}: {reused} task(s) reused"
        )
        _drive_and_report(platform, submitted, concurrency)


@app.command()
def cancel(
    run_id: RunId,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until the run has stopped.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most.", min=0)] = 30.0,
    server: Server = None,
    project: ProjectName = "default",
) -> None:
    """Cancel a run: pending tasks never start, running ones are stopped; waits for the end."""
    if server:
        with _client(server, project) as client:
            before = client.run(run_id)
            full_id = before["id"]
            if before["state"] in RUN_TERMINAL:
                console.print(f"run {full_id[:8]} had already ended: {_styled(before['state'])}")
                return
            client.cancel(full_id)

            def remote() -> tuple[str, list[str]]:
                tasks = client.tasks(full_id)
                running = [t["node_id"] for t in tasks if t["state"] == "running"]
                return client.run(full_id)["state"], running

            _until_stopped(full_id, remote, wait, timeout)
        return
    with _platform() as platform:
        full_id = platform.resolve_run_id(run_id)
        ended, _ = platform.run(full_id)
        if ended.state in RUN_TERMINAL:
            console.print(f"run {full_id[:8]} had already ended: {_styled(ended.state)}")
            return
        platform.cancel(full_id)

        def local() -> tuple[str, list[str]]:
            running = [t.node_id for t in platform.task_runs(full_id) if t.state == "running"]
            return platform.run(full_id)[0].state, running

        _until_stopped(full_id, local, wait, timeout)


@app.command()
def delete(
    run_id: RunId,
    server: Server = None,
    project: ProjectName = "default",
) -> None:
    """Delete an ended run with its tasks, logs, metrics and artifact rows (`mlp prune`
    removes the files nothing else names)."""
    if server:
        with _client(server, project) as client:
            full_id = client.run(run_id)["id"]
            client.delete_run(full_id)
    else:
        with _platform() as platform:
            full_id = platform.resolve_run_id(run_id)
            platform.delete_run(full_id)
    console.print(f"run {full_id[:8]} deleted")


def _until_stopped(
    run_id: str, read: Callable[[], tuple[str, list[str]]], wait: bool, timeout: float
) -> None:
    """Show the cancelling run until it has ended (or the timeout); say how it ended."""
    state, running = read()
    if not wait or state in RUN_TERMINAL:
        console.print(f"run {run_id[:8]} {_styled(state)}" + ("" if wait else " (not waiting)"))
        return
    deadline = time.monotonic() + timeout
    with console.status(f"cancelling run {run_id[:8]}") as status:
        while state not in RUN_TERMINAL and time.monotonic() < deadline:
            names = ", ".join(running[:5]) + (" …" if len(running) > 5 else "")
            status.update(f"cancelling run {run_id[:8]}: stopping {names or 'its tasks'}")
            time.sleep(0.5)
            state, running = read()
    if state in RUN_TERMINAL:
        console.print(f"run {run_id[:8]} {_styled(state)}")
    else:
        console.print(
            f"run {run_id[:8]} is still stopping after {timeout:.0f} s "
            f"(running: {', '.join(running) or 'none'}); its worker stops them when it next "
            "looks (each second), or their leases expire"
        )


# Options and help are the worker's own (`mlp worker --help`): a worker process parses them
# without typer, rich or pydantic (ml_platform/__main__.py sends it there first).
@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def worker(ctx: typer.Context) -> None:
    """Run scheduled work until stopped: SIGTERM drains, a second SIGTERM hands work back."""
    from ml_platform.worker import main as run_worker

    raise typer.Exit(run_worker(ctx.args))


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    concurrency: Concurrency = max(2, os.cpu_count() or 2),
) -> None:
    """Serve the REST API (/api/v1, /docs) with the scheduler loop.

    Without REDIS_URL the server also runs tasks itself (--concurrency at once); with it,
    `mlp worker` processes do. Refuses to start with a missing or weak SECRET_KEY when
    ENVIRONMENT is staging or production.
    """
    from ml_platform.config import load_settings
    from ml_platform.security import ConfigurationError
    from ml_platform.server import serve

    sys.path.insert(0, os.getcwd())
    try:
        serve(load_settings(), host, port, concurrency)
    except ConfigurationError as exc:
        _fail(str(exc))


@app.command()
def login(
    server: Annotated[str, typer.Option("--server", envvar="MLP_SERVER", help="API server URL.")],
    username: Annotated[str, typer.Option("--username", "-u")],
    password_stdin: PasswordStdin = False,
) -> None:
    """Log in to a server; the tokens are kept in $ML_PLATFORM_HOME/credentials.json (0600)."""
    from ml_platform.client import ApiClientError, Client, Credentials
    from ml_platform.config import load_settings

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True)
    credentials = Credentials(load_settings().home)
    client = Client(
        server, on_tokens=lambda access, refresh: credentials.save(server, access, refresh)
    )
    try:
        client.login(username, password)
    except ApiClientError as exc:
        _fail(str(exc))
    finally:
        client.close()
    console.print(f"logged in to {server} as {username}")


@app.command()
def logout(
    server: Annotated[str, typer.Option("--server", envvar="MLP_SERVER", help="API server URL.")],
) -> None:
    """End the sign-in on the server (its tokens stop working everywhere) and forget them here."""
    from ml_platform.client import ApiClientError, Client, Credentials
    from ml_platform.config import load_settings

    credentials = Credentials(load_settings().home)
    saved = credentials.get(server)
    if saved is None:
        console.print(f"not logged in to {server}")
        return
    client = Client(
        server,
        token=saved["access_token"],
        refresh_token=saved["refresh_token"],
        on_tokens=lambda access, refresh: credentials.save(server, access, refresh),
    )
    try:
        client.logout()
        done = f"logged out of {server}: the sign-in has ended on the server"
    except ApiClientError as exc:
        if exc.status != 401:  # unreachable or failing: keep the tokens, so a retry can end it
            _fail(f"{exc}; still logged in, try again")
        done = f"logged out of {server} (the server had already ended that sign-in)"
    finally:
        client.close()
    credentials.forget(server)
    console.print(done)


@users_app.command("create")
def users_create(
    username: Annotated[str, typer.Argument(help="Login name.")],
    admin: Annotated[bool, typer.Option("--admin", help="A platform admin.")] = False,
    password_stdin: PasswordStdin = False,
) -> None:
    """Create a user (the way to bootstrap the first admin: there are no default credentials)."""
    from ml_platform.accounts import Accounts

    password = _read_password(password_stdin)
    with _platform() as platform:
        accounts = Accounts(platform.db, timedelta(days=platform.settings.refresh_token_days))
        try:
            user = accounts.create_user(username, password, is_admin=admin)
        except ValueError as exc:
            _fail(str(exc))
        from ml_platform.store.db import safe_url

        console.print(
            f"user {user.username} created"
            + (" (admin)" if user.is_admin else "")
            + f" in {safe_url(platform.settings.database_url)}"
        )


def _artifact_rows(
    run_id: str, server: str | None, project: str
) -> tuple[str, list[dict[str, Any]]]:
    """The run's full id and its artifacts (task, name, sha256, size, kind)."""
    if server:
        with _client(server, project) as client:
            full_id = client.run(run_id)["id"]
            return full_id, client.artifacts(full_id)
    with _platform() as platform:
        full_id = platform.resolve_run_id(run_id)
        return full_id, [
            {"task": node, "name": a.name, "sha256": a.sha256, "size": a.size, "kind": a.kind}
            for node, a in platform.artifacts_of(full_id)
        ]


def _chosen(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The artifact named ``name`` (or ``task/name``), or whose sha256 starts with it."""
    found = [
        row
        for row in rows
        if name in (row["name"], f"{row['task']}/{row['name']}")
        or (len(name) >= 6 and row["sha256"].startswith(name))
    ]
    if len({row["sha256"] for row in found}) > 1:
        options = ", ".join(f"{r['task']}/{r['name']} ({r['sha256'][:12]})" for r in found)
        _fail(f"{len(found)} artifacts match {name!r}: {options}; give one of these")
    if not found:
        known = ", ".join(f"{r['task']}/{r['name']}" for r in rows) or "none"
        _fail(f"the run has no artifact {name!r} (it has: {known})")
    return found[0]


@app.command()
def artifacts(
    run_id: Annotated[str, typer.Argument(help="The run (its first 4+ characters).")],
    name: Annotated[
        str | None,
        typer.Argument(help="Download this one: its name, TASK/NAME or a sha256 prefix."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="A file or directory to write it to (NAME-SHA12); - for standard output.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    server: Server = None,
    project: ProjectName = "default",
) -> None:
    """List a run's artifacts, or download one: its bytes as stored (a value a task saved
    with save_artifact is a pickle; load it with pickle.load), checked against its sha256."""
    full_id, rows = _artifact_rows(run_id, server, project)
    if name is None:
        if not rows:
            console.print(f"run {full_id[:8]} has no artifacts")
            return
        table = Table(show_edge=False, header_style="bold")
        for column in ("task", "artifact", "kind", "bytes", "sha256"):
            table.add_column(column, no_wrap=True)
        for row in rows:
            table.add_row(
                escape(row["task"]),
                escape(row["name"]),
                row["kind"],
                f"{row['size']:,}",
                row["sha256"][:12],
            )
        console.print(table)
        return
    row = _chosen(rows, name)
    sha256 = row["sha256"]
    if output is not None and str(output) == "-":
        _to_stdout(full_id, sha256, server, project)
        return
    default = f"{row['name']}-{sha256[:12]}".replace(os.sep, "_")
    target = output or Path(default)
    if target.is_dir():  # -o DIRECTORY: the default name in it
        target = target / default
    if target.exists() and not target.is_file():
        # A device, a pipe, a socket: --force would put a file in its place (as root,
        # /dev/null's own), which no one asking for a download means.
        _fail(f"{target} is not a regular file; nothing written. Give a file's path")
    if target.exists() and not force:
        _fail(f"{target} exists; give another --output, or --force to replace it")
    _download(full_id, sha256, target, server, project)
    what = escape(f"{row['task']}/{row['name']}")
    console.print(
        f"artifact {what} ({row['size']:,} bytes, sha256 {sha256[:12]}) written to "
        + escape(str(target))
    )


def _partial_prefix(target: Path) -> str:
    """How the partial files of downloads to ``target`` by processes of this host and PID
    namespace are named, before the downloading process's pid: ``.NAME.<host>-<ns>.``."""
    from ml_platform.worker import pid_space

    return f".{target.name}.{pid_space()}."


def _remove_abandoned(directory: Path, target: Path) -> None:
    """Remove the partial files that downloads to ``target`` left when they were killed (a
    SIGKILL, a machine that stopped): those of this host and PID namespace whose process is
    gone, this user's. A download still running keeps its own."""
    from ml_platform.worker import alive

    prefix = _partial_prefix(target)
    try:
        entries = list(directory.iterdir())
    except OSError:
        return  # not listable: the download's own file will fail with a clear error
    for entry in entries:
        # <pid>.<mkstemp's eight characters>
        pid, dot, rest = entry.name.removeprefix(prefix).partition(".")
        if not entry.name.startswith(prefix) or not pid.isdigit() or not dot or "." in rest:
            continue
        try:
            mine = entry.is_file() and not entry.is_symlink() and entry.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and not alive(int(pid)):
            entry.unlink(missing_ok=True)


def _download(run_id: str, sha256: str, target: Path, server: str | None, project: str) -> None:
    """Write the artifact to a file beside ``target`` while hashing it, then move it there:
    an interrupted or corrupted download leaves nothing at ``target``, and what a killed one
    left beside it is removed by the next download to ``target``."""
    import tempfile

    directory = target.resolve().parent
    if not directory.is_dir():
        _fail(f"{directory} is not a directory")
    _remove_abandoned(directory, target)
    try:
        fd, temporary = tempfile.mkstemp(
            dir=directory, prefix=f"{_partial_prefix(target)}{os.getpid()}."
        )
    except OSError as exc:  # read-only, full, or no place for files (/proc)
        _fail(f"cannot write a file in {directory}: {exc.strerror}; nothing written")
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(run_id, sha256, server, project, out.write)
        if digest != sha256:
            _fail(f"artifact {sha256[:12]} arrived changed (sha256 {digest[:12]}); nothing written")
        umask = os.umask(0)  # a file as any other the user makes (mkstemp's is 0600)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, target)
    except _StoreFailed as exc:
        _fail(f"{exc}; nothing written")
    except OSError as exc:  # the target's disk full, or the file not movable into place
        _fail(f"the download to {target} failed: {exc.strerror or exc}; nothing written")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class _StoreFailed(Exception):
    """The artifact store cannot give an artifact the database records: its bytes are gone,
    or reading them failed (a disk's I/O error, a file that became a folder)."""


def _fetch(
    run_id: str, sha256: str, server: str | None, project: str, write: Callable[[bytes], object]
) -> str:
    """Give the artifact's bytes to ``write``, a chunk at a time; the sha256 of what came."""
    import hashlib

    hasher = hashlib.sha256()

    def both(chunk: bytes) -> None:
        hasher.update(chunk)
        write(chunk)

    if server:
        with _client(server, project) as client:
            client.download_artifact(run_id, sha256, both)
        return hasher.hexdigest()
    with _platform() as platform:
        path = platform.artifacts.path(sha256)
        try:
            source = path.open("rb")
        except FileNotFoundError:
            raise _StoreFailed(
                f"artifact {sha256} is recorded but gone from the artifact store"
            ) from None
        except OSError as exc:
            raise _StoreFailed(f"the artifact store cannot open {path}: {exc.strerror}") from None
        with source:
            # Only the store's reads: an error of ``write`` (a full disk, a reader gone) is
            # the caller's to tell.
            while True:
                try:
                    chunk = source.read(1 << 20)
                except OSError as exc:
                    raise _StoreFailed(
                        f"the artifact store failed to read {path}: {exc.strerror}"
                    ) from None
                if not chunk:
                    break
                both(chunk)
    return hasher.hexdigest()


def _to_stdout(run_id: str, sha256: str, server: str | None, project: str) -> None:
    """``-o -``: the artifact's bytes to standard output, for the program it is piped to. They
    are checked as they go, so a changed artifact is known only once written: the command
    then says so on standard error and exits 2, as curl does -- the reader checks the exit
    status (``set -o pipefail``). A reader that stops early (``| head``) is Click's to
    handle: exit 1, no traceback."""
    errors = Console(stderr=True, highlight=False)
    if sys.stdout.isatty():
        errors.print("[red]error:[/red] standard output is a terminal: pipe it, or give -o FILE")
        raise typer.Exit(EXIT_USAGE)
    out = sys.stdout.buffer
    try:
        digest = _fetch(run_id, sha256, server, project, out.write)
        out.flush()
    except _StoreFailed as exc:
        errors.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    if digest != sha256:
        errors.print(
            f"[red]error:[/red] artifact {sha256[:12]} arrived changed (sha256 {digest[:12]}): "
            "the bytes written are not the artifact"
        )
        raise typer.Exit(EXIT_USAGE)


@pools_app.command("list")
def pools_list(server: Server = None, project: ProjectName = "default") -> None:
    """Pools with a limit or with work: their slots and how many hold one now."""
    if server:
        with _client(server, project) as client:
            rows = [(p["name"], p["slots"], p["busy"]) for p in client.pools()]
    else:
        with _platform() as platform:
            rows = platform.pools()
    if not rows:
        console.print("no pools have a limit or work")
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("pool", "slots", "queued or running"):
        table.add_column(column)
    for name, slots, busy in rows:
        table.add_row(escape(name), "no limit" if slots is None else str(slots), str(busy))
    console.print(table)


PoolName = Annotated[str, typer.Argument(help="The pool's name, as in @task(pool=NAME).")]


@pools_app.command("set")
def pools_set(
    name: PoolName,
    slots: Annotated[int, typer.Argument(min=1, help="Attempts of the pool that may run at once.")],
    server: Server = None,
    project: ProjectName = "default",
) -> None:
    """Limit a pool (a larger limit admits the tasks waiting for it at once)."""
    if server:
        with _client(server, project) as client:
            client.set_pool(name, slots)
    else:
        with _platform() as platform:
            platform.set_pool(name, slots)
    console.print(f"pool {escape(name)}: at most {slots} at once")


@pools_app.command("delete")
def pools_delete(name: PoolName, server: Server = None, project: ProjectName = "default") -> None:
    """Take a pool's limit away."""
    if server:
        with _client(server, project) as client:
            client.remove_pool(name)
    else:
        with _platform() as platform:
            platform.remove_pool(name)
    console.print(f"pool {escape(name)}: no limit")


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return str(typer.prompt("password", hide_input=True, confirmation_prompt=True))


@contextmanager
def _accounts() -> Iterator[Accounts]:
    from ml_platform.accounts import Accounts

    with _platform() as platform:
        try:
            yield Accounts(platform.db, timedelta(days=platform.settings.refresh_token_days))
        except (LookupError, ValueError) as exc:
            _fail(str(exc))


@users_app.command("list")
def users_list() -> None:
    """Every user of the database DATABASE_URL names, admins and disabled ones marked."""
    with _accounts() as accounts:
        users = accounts.users()
    table = Table(show_edge=False, header_style="bold")
    for column in ("user", "platform admin", "state", "created"):
        table.add_column(column)
    for user in users:
        table.add_row(
            escape(user.username),
            "yes" if user.is_admin else "",
            "[red]disabled[/]" if user.disabled else "active",
            f"{user.created_at:%Y-%m-%d %H:%M}",
        )
    console.print(table if users else "no users")


Username = Annotated[str, typer.Argument(help="Login name.")]


@users_app.command("disable")
def users_disable(username: Username) -> None:
    """Disable a user: they cannot sign in, and every sign-in they have ends now."""
    with _accounts() as accounts:
        accounts.change_user(username, disabled=True)
    console.print(f"user {escape(username)} disabled; their sign-ins have ended")


@users_app.command("enable")
def users_enable(username: Username) -> None:
    """Enable a disabled user again (they sign in afresh)."""
    with _accounts() as accounts:
        accounts.change_user(username, disabled=False)
    console.print(f"user {escape(username)} enabled")


@users_app.command("password")
def users_password(
    username: Username,
    password_stdin: PasswordStdin = False,
) -> None:
    """Set a user's password (a forgotten one, a leaked one): their sign-ins end."""
    password = _read_password(password_stdin)
    with _accounts() as accounts:
        accounts.change_user(username, password=password)
    console.print(f"password of {escape(username)} set; their sign-ins have ended")


def _schedules_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for column in ("schedule", "workflow", "cron (UTC)", "state", "next tick"):
        table.add_column(column, no_wrap=column != "workflow")
    failed = any(row["last_error"] for row in rows)
    if failed:
        table.add_column("last tick")
    for row in rows:
        table.add_row(
            escape(row["name"]),
            escape(row["workflow"]),
            escape(row["cron"]),
            "[green]active[/]" if row["enabled"] else "[yellow]paused[/]",
            f"{row['next_fire_at']:%Y-%m-%d %H:%M}" if row["enabled"] else "-",
            *([escape(f"made no run: {row['last_error']}") if row["last_error"] else ""] * failed),
        )
    return table


def _schedule_fields(row: Any) -> dict[str, Any]:
    """A schedule row of the embedded database as the API shows it."""
    return {
        "name": row.name,
        "workflow": row.workflow_ref,
        "cron": row.cron,
        "enabled": row.enabled,
        "next_fire_at": row.next_fire_at,
        "last_error": row.last_error,
    }


def _from_api(row: dict[str, Any]) -> dict[str, Any]:
    return row | {"next_fire_at": datetime.fromisoformat(row["next_fire_at"])}


ScheduleName = Annotated[str, typer.Argument(help="The schedule's name.")]


@schedules_app.command("list")
def schedules_list(server: Server = None, project: ProjectName = "default") -> None:
    """The schedules, with their next tick and why the last one made no run, if it did not."""
    if server:
        with _client(server, project) as client:
            rows = [_from_api(row) for row in client.schedules()]
    else:
        with _platform() as platform:
            rows = [_schedule_fields(r) for r in platform.schedules(platform.default_project_id())]
    if not rows:
        console.print("no schedules")
        return
    console.print(_schedules_table(rows))


@schedules_app.command("create")
def schedules_create(
    name: ScheduleName,
    workflow: Annotated[str, typer.Argument(help="package.module:workflow_name")],
    cron: Annotated[str, typer.Argument(help="Five-field cron, UTC, e.g. '0 2 * * *'.")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="A run parameter, key=value.")
    ] = None,
    server: Server = None,
    project: ProjectName = "default",
) -> None:
    """Run WORKFLOW with these params at every tick of CRON (checked now, as a run would be)."""
    workflow = _reference(workflow)
    params = _json_values(_parse_pairs(param or []))
    if server:
        with _client(server, project) as client:
            row = _from_api(client.create_schedule(name, workflow, cron, params))
    else:
        with _platform() as platform:
            made = platform.create_schedule(
                platform.default_project_id(), name, workflow, cron, params
            )
            row = _schedule_fields(made)
    where = "" if server else " (an `mlp server` on this database fires it)"
    console.print(
        f"schedule {escape(name)} made: next tick {row['next_fire_at']:%Y-%m-%d %H:%M} UTC{where}"
    )


def _change_schedule(name: str, server: str | None, project: str, **change: Any) -> dict[str, Any]:
    if server:
        with _client(server, project) as client:
            return _from_api(client.change_schedule(name, **change))
    with _platform() as platform:
        changed = platform.change_schedule(platform.default_project_id(), name, **change)
        return _schedule_fields(changed)


@schedules_app.command("pause")
def schedules_pause(
    name: ScheduleName, server: Server = None, project: ProjectName = "default"
) -> None:
    """Stop a schedule's ticks: once this returns, it makes no run until resumed."""
    _change_schedule(name, server, project, enabled=False)
    console.print(f"schedule {escape(name)} paused")


@schedules_app.command("resume")
def schedules_resume(
    name: ScheduleName, server: Server = None, project: ProjectName = "default"
) -> None:
    """Start a paused schedule again, from its next tick (missed ticks are not made up)."""
    row = _change_schedule(name, server, project, enabled=True)
    console.print(
        f"schedule {escape(name)} resumed: next tick {row['next_fire_at']:%Y-%m-%d %H:%M} UTC"
    )


@schedules_app.command("delete")
def schedules_delete(
    name: ScheduleName, server: Server = None, project: ProjectName = "default"
) -> None:
    """Delete a schedule; the runs it made stay."""
    if server:
        with _client(server, project) as client:
            client.delete_schedule(name)
    else:
        with _platform() as platform:
            platform.delete_schedule(platform.default_project_id(), name)
    console.print(f"schedule {escape(name)} deleted")


_AGE = re.compile(r"(\d+)([wdhm])")
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60}


@app.command()
def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="An age: 90d, 12w, 36h (at least 1h).")
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; remove nothing.")
    ] = False,
) -> None:
    """Remove the runs that ended more than an age ago (their tasks, attempts, logs, metrics
    and artifact rows) and the artifact files nothing refers to any more. Runs not ended,
    workflows, schedules and users stay."""
    match = _AGE.fullmatch(older_than.strip())
    seconds = int(match[1]) * _UNITS[match[2]] if match else 0
    if seconds < 3600:
        _fail(f"--older-than {older_than!r}: give an age of at least 1h, such as 90d or 12w")
    before = datetime.now(UTC) - timedelta(seconds=seconds)
    with _platform() as platform:
        done = platform.prune(before, dry_run=dry_run)
    order = ("task_runs", "attempts", "log_parts", "metrics", "metric_series", "params")
    rows = ", ".join(
        f"{table} {done.rows[table]:,}"
        for table in (*order, "artifacts", "refresh_tokens")
        if done.rows.get(table)
    )
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{verb} {done.runs:,} runs that ended before {before:%Y-%m-%d %H:%M} UTC"
        + (f" ({rows})" if rows else "")
        + f" and {done.blobs:,} artifact files nothing refers to ({done.blob_bytes:,} bytes)"
    )


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations (the embedded database is upgraded on first use too)."""
    from ml_platform.config import load_settings
    from ml_platform.store.db import safe_url

    settings = load_settings()
    with _platform() as platform:
        where = safe_url(settings.database_url)
        if ahead := platform.schema_ahead():
            console.print(
                f"database at {where} is {ahead}: a newer release migrated it; nothing to do"
            )
        else:
            console.print(f"database at {where} is at the latest schema")


def main() -> None:
    from ml_platform.errors import SettingsError

    try:
        app()
    except SettingsError as exc:  # raised before any command could act
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(EXIT_USAGE)

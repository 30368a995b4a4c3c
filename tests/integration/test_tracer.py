"""Tracing by reference in a zygote's fresh child (ml_platform.tracer), against hostile modules:
what a module does at import never reaches the requester, and nothing it starts outlives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ml_platform import tracer
from ml_platform.sdk import WorkflowError
from ml_platform.tracer import trace_in_subprocess

pytestmark = pytest.mark.integration

WORKFLOW = """
from ml_platform.sdk import task, workflow

@task
def step(value: int) -> int:
    return value

@workflow
def flow(value: int = 1) -> None:
    step(value)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory, the working directory: its modules are importable by reference."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _module(project: Path, name: str, before: str, after: str = WORKFLOW) -> str:
    (project / f"{name}.py").write_text(textwrap.dedent(before) + after)
    return f"{name}:flow"


def _gone(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_what_a_module_prints_never_reaches_the_answer(project: Path) -> None:
    reference = _module(
        project,
        "noisy",
        """
        import sys
        print("x" * 1_000_000)  # more than any socket buffer holds
        print("{\\"traced\\": null}", file=sys.stderr)
        """,
    )
    traced = trace_in_subprocess(reference, {"value": 2}, timeout=30)
    assert [spec.node_id for spec in traced.specs] == ["step"]


def test_a_module_that_exits_or_dies_at_import_is_an_error_with_its_last_words(
    project: Path,
) -> None:
    exits = _module(project, "exits", "import sys\nsys.exit(3)\n")
    with pytest.raises(WorkflowError, match="SystemExit"):
        trace_in_subprocess(exits, None, timeout=30)
    dies = _module(
        project,
        "dies",
        "import os, sys\nprint('last words', file=sys.stderr)\n"
        "sys.stderr.flush()\nos._exit(7)\n",
    )
    with pytest.raises(WorkflowError, match="without an answer: last words"):
        trace_in_subprocess(dies, None, timeout=30)


def test_a_module_that_hangs_is_stopped_at_the_timeout_with_all_it_started(
    project: Path,
) -> None:
    pids = project / "pids"
    reference = _module(
        project,
        "hangs",
        f"""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(60)
        """,
    )
    started = time.monotonic()
    with pytest.raises(WorkflowError, match="took longer than 1 s"):
        trace_in_subprocess(reference, None, timeout=1)
    assert time.monotonic() - started < 10
    module_pid, sleep_pid = (int(p) for p in pids.read_text().split())
    assert _gone(module_pid) and _gone(sleep_pid)


def test_what_a_traced_module_starts_ends_with_its_trace(project: Path) -> None:
    pids = project / "pids"
    reference = _module(
        project,
        "spawns",
        f"""
        import subprocess
        child = subprocess.Popen(["sleep", "60"])
        open({str(pids)!r}, "w").write(str(child.pid))
        """,
    )
    trace_in_subprocess(reference, None, timeout=30)
    assert _gone(int(pids.read_text()))


def test_each_trace_sees_the_code_the_environment_and_the_directory_of_now(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = trace_in_subprocess(_module(project, "changes", ""), {}, timeout=30)
    # The same module, changed on disk, and told by the environment set after the zygote began.
    _module(
        project,
        "changes",
        """
        import os
        assert os.environ["MLP_TRACER_CHECK"] == "now", os.environ.get("MLP_TRACER_CHECK")
        assert os.getcwd() == {cwd!r}
        """.format(cwd=str(project)),
        WORKFLOW.replace("step(value)", "step(value)\n    step(value + 1)"),
    )
    monkeypatch.setenv("MLP_TRACER_CHECK", "now")
    second = trace_in_subprocess("changes:flow", {}, timeout=30)
    assert second.code_hash != first.code_hash and len(second.specs) == 2


def test_a_killed_zygote_is_started_again(project: Path) -> None:
    reference = _module(project, "plain", "")
    trace_in_subprocess(reference, {}, timeout=30)
    zygote = tracer._ZYGOTE._process
    assert zygote is not None
    os.kill(zygote.pid, signal.SIGKILL)
    zygote.wait()
    traced = trace_in_subprocess(reference, {}, timeout=30)
    assert [spec.node_id for spec in traced.specs] == ["step"]
    assert tracer._ZYGOTE._process is not None and tracer._ZYGOTE._process.pid != zygote.pid


def test_the_zygote_and_a_hanging_trace_end_when_their_requester_is_killed(
    project: Path,
) -> None:
    pid_file = project / "pid"
    reference = _module(
        project,
        "hangs_on",
        f"""
        import os, time
        if os.environ.get("HANG"):
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(60)
        """,
    )
    requester = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from ml_platform import tracer\n"
            f"tracer.trace_in_subprocess({reference!r}, None, timeout=30)\n"
            "print(tracer._ZYGOTE._process.pid, flush=True)\n"
            "import os; os.environ['HANG'] = '1'\n"
            f"tracer.trace_in_subprocess({reference!r}, None, timeout=60)\n",
        ],
        cwd=project,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert requester.stdout is not None
    zygote = int(requester.stdout.readline())
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):  # the second trace hangs
        assert time.monotonic() < deadline and requester.poll() is None
        time.sleep(0.05)
    requester.kill()
    requester.wait()
    assert _gone(zygote)
    assert _gone(int(pid_file.read_text()))


FORKS_AFTER_TRACING = """
import json, os, sys, time
from ml_platform import tracer

reference = sys.argv[1]
tracer.trace_in_subprocess(reference, {}, timeout=30)
parents = tracer._ZYGOTE._process
read, write = os.pipe()
go_on = os.pipe()
child = os.fork()
if child == 0:  # the copy: wait until the parent has let its zygote go, then trace
    code = 1
    try:
        os.read(go_on[0], 1)
        tracer.trace_in_subprocess(reference, {}, timeout=30)
        os.write(write, str(tracer._ZYGOTE._process.pid).encode())
        tracer._ZYGOTE.stop(5.0)
        code = 0
    finally:
        os._exit(code)
started = time.monotonic()
try:
    tracer._ZYGOTE.stop(5.0)
    stopped_in = time.monotonic() - started
finally:
    os.write(go_on[1], b"x")  # the copy goes on whatever happened here
    served_by = int(os.read(read, 64) or b"0")
    status = os.waitpid(child, 0)[1]
print(json.dumps({"returncode": parents.returncode, "stopped_in": stopped_in,
                  "status": status, "parents": parents.pid, "served_by": served_by}))
"""


def test_a_forked_copy_of_the_requester_lets_the_parents_zygote_end_with_the_parent(
    project: Path,
) -> None:
    """A process that forks after tracing (a preloading server, say): the copy does not hold
    the parent's zygote open -- it ends by itself when the parent lets it go, while the copy
    still lives -- and the copy traces through a zygote of its own. (In a process of its own:
    forking this test process, with its threads, is not something to do.)"""
    reference = _module(project, "forked", "")
    done = subprocess.run(
        [sys.executable, "-c", FORKS_AFTER_TRACING, reference],
        cwd=project,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["returncode"] == 0  # it ended by itself (killed would be -9) ...
    assert seen["stopped_in"] < 2.5  # ... at once, while the copy still lived
    assert seen["status"] == 0 and seen["served_by"] not in (0, seen["parents"])


def test_a_namespace_package_of_the_project_is_loaded_and_nothing_from_elsewhere(
    project: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory without __init__.py is a package too (a namespace package), and `mlp run`
    takes its modules: the server refused them ("no flows.py or flows/__init__.py there").
    It takes them now, and only what the import would take from the project: not a module of
    the same namespace in another directory on the path, nor a regular package elsewhere
    that Python prefers to the project's directory of that name. Nothing of those is run."""
    for module in ("flows/train.py", "flows/deep/nested.py", "shadow/train.py"):
        (project / module).parent.mkdir(parents=True, exist_ok=True)
        (project / module).write_text(WORKFLOW)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    marker = elsewhere / "imported"
    planted = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n{WORKFLOW}"
    for module in ("flows/planted.py", "shadow/__init__.py", "shadow/train.py"):
        (elsewhere / module).parent.mkdir(parents=True, exist_ok=True)
        (elsewhere / module).write_text(planted)
    monkeypatch.syspath_prepend(str(elsewhere))  # e.g. site-packages: on the path, after cwd
    for allowed in ("flows.train:flow", "flows.deep.nested:flow"):
        tracer.check_allowed(allowed, [], project)
        traced = trace_in_subprocess(allowed, {}, timeout=30)
        assert [spec.node_id for spec in traced.specs] == ["step"]
    for refused, why in [
        ("flows.planted:flow", "flows.planted would be imported from outside it"),
        ("shadow.train:flow", "shadow would be imported from outside it"),
        ("flows.missing:flow", "no module flows.missing there"),
        ("flows.train.step:flow", "flows.train is a module, not a package"),
        ("nowhere.train:flow", "no nowhere.py, nowhere/__init__.py or nowhere/ there"),
        ("sys:exit", "sys is built into Python"),
    ]:
        with pytest.raises(WorkflowError, match="not among those workflows") as refusal:
            tracer.check_allowed(refused, [], project)
        assert f"({why})" in str(refusal.value)
    assert not marker.exists()

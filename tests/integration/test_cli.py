"""The ``mlp`` command as users run it: real worker, real child processes, SQLite."""

from __future__ import annotations

import os
import pickle
import pty
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text, update
from typer.testing import CliRunner

from ml_platform import cli
from ml_platform.api import create_app
from ml_platform.cli import app
from ml_platform.config import load_settings
from ml_platform.service import Platform
from ml_platform.store.db import head_from_files
from ml_platform.store.models import LogPart, Run, utcnow
from tests import workflows
from tests.forked import ZYGOTE, Forked
from tests.helpers import wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SECRET = "k3y-for-tests-only-7f0c4e2a9b1d8e6f5a4c3b2a1908f7e6"  # pragma: allowlist secret


@pytest.fixture
def cli_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Short leases and polls so that fault tests end quickly; wide tables."""
    monkeypatch.setenv("MLP_LEASE_SECONDS", "1.5")
    monkeypatch.setenv("MLP_POLL_SECONDS", "0.1")
    monkeypatch.setenv("COLUMNS", "200")
    # The CLI's console may have fixed its width at import (in an xdist worker, say).
    monkeypatch.setattr(cli.console, "width", 200)
    monkeypatch.chdir(ROOT)
    return dict(os.environ)


@pytest.fixture
def platform(cli_env: dict[str, str]) -> Iterator[Platform]:
    platform = Platform(load_settings()).start()
    yield platform
    platform.close()


def mlp(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def run_id_of(output: str) -> str:
    match = re.search(r"run ([0-9a-f]{8}) ", output)
    assert match, output
    return match.group(1)


def spawn(*args: str) -> Forked:
    """`mlp ARGS` with this process's environment, forked from a warm copy (tests/forked.py)."""
    return ZYGOTE.spawn(list(args), dict(os.environ))


def test_a_runs_artifacts_are_listed_and_downloaded_checked_against_their_digest(
    cli_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registered model was only a sha256 in `mlp show`: the CLI gives it to its owner,
    whole or not at all."""
    code, output = mlp("run", "tests.workflows:two_models")
    assert code == 0, output
    run_id = run_id_of(output)
    code, listed = mlp("artifacts", run_id)
    assert code == 0 and len(re.findall(r"fit\[\d\] +│ model +│ pickle", listed)) == 2, listed
    code, output = mlp("artifacts", run_id, "model")
    assert code == 2 and "2 artifacts match 'model'" in output, output
    platform = Platform(load_settings()).start()
    try:
        # In the order they were stored: the two tasks ran side by side.
        kept = platform.artifacts_of(platform.resolve_run_id(run_id))
        [(first, one), (second, two)] = sorted(kept, key=lambda pair: pair[0])  # fit[0], fit[1]
        store = platform.artifacts.path(two.sha256)
    finally:
        platform.close()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    monkeypatch.chdir(downloads)
    code, output = mlp("artifacts", run_id, f"{first}/model")
    written = downloads / f"model-{one.sha256[:12]}"
    assert code == 0 and pickle.loads(written.read_bytes())["seed"] == 1, output
    code, output = mlp("artifacts", run_id, f"{first}/model")
    assert code == 2 and "exists; give another --output, or --force" in output
    assert mlp("artifacts", run_id, f"{second}/model", "-o", str(tmp_path))[0] == 0
    assert (tmp_path / f"model-{two.sha256[:12]}").exists()  # -o DIRECTORY
    assert mlp("artifacts", run_id, two.sha256[:8], "-o", "m.pkl")[0] == 0
    assert pickle.loads((downloads / "m.pkl").read_bytes())["seed"] == 2
    code, output = mlp("artifacts", run_id, "weights")
    assert code == 2 and "it has: " in output
    assert f"{first}/model" in output and f"{second}/model" in output

    # A blob changed in the store is refused, and leaves nothing behind.
    store.write_bytes(store.read_bytes()[:-1] + b"!")
    code, output = mlp("artifacts", run_id, two.sha256, "-o", "changed.pkl", "--force")
    assert code == 2 and "arrived changed" in output
    assert sorted(p.name for p in downloads.iterdir()) == ["m.pkl", written.name]


def _a_stored_artifact() -> tuple[str, Any, Path]:
    """A run of two_models made by `mlp run`: its id, its first artifact and that artifact's
    file in the store."""
    code, output = mlp("run", "tests.workflows:two_models")
    assert code == 0, output
    run_id = run_id_of(output)
    platform = Platform(load_settings()).start()
    try:
        artifact = platform.artifacts_of(platform.resolve_run_id(run_id))[0][1]
        return run_id, artifact, platform.artifacts.path(artifact.sha256)
    finally:
        platform.close()


def _feed_when_read(fifo: Path, reader: Forked, timeout: float = 30.0) -> int:
    """Open ``fifo`` for writing once ``reader`` has opened it to read (never blocking: if
    the reader died first, fail instead of waiting for ever); the write end's descriptor."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody reads it yet
            assert reader.poll() is None, "the download ended before it read the artifact"
            assert time.monotonic() < deadline, "the download never read the artifact"
            time.sleep(0.02)


def test_a_download_killed_midway_leaves_a_partial_file_the_next_download_removes(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """A SIGKILL gives `mlp artifacts` no chance to clean up: its partial file stays beside the
    target, hidden, until the next download to that target removes it. A partial file whose
    download still runs is left alone."""
    from ml_platform.worker import pid_space

    run_id, artifact, blob = _a_stored_artifact()
    kept = blob.read_bytes()
    # The store's file becomes a pipe that this test feeds: the download stalls in it.
    blob.unlink()
    os.mkfifo(blob)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    target = downloads / "model.pkl"
    stalled = spawn("artifacts", run_id, artifact.sha256, "-o", str(target))
    try:
        feed = _feed_when_read(blob, stalled)
        os.write(feed, kept[:16])
        stalled.kill()
        assert stalled.wait(timeout=30) == -signal.SIGKILL
        os.close(feed)
    finally:
        stalled.kill()
    [partial] = [p.name for p in downloads.iterdir()]
    assert partial.startswith(f".model.pkl.{pid_space()}.{stalled.pid}."), partial
    # Another download to the same target, still running (this process stands for it).
    running = downloads / f".model.pkl.{pid_space()}.{os.getpid()}.k3ptlive"
    running.write_bytes(b"half")
    blob.unlink()
    blob.write_bytes(kept)

    code, output = mlp("artifacts", run_id, artifact.sha256, "-o", str(target))

    assert code == 0 and target.read_bytes() == kept, output
    assert sorted(p.name for p in downloads.iterdir()) == sorted([running.name, "model.pkl"])


def test_a_download_never_puts_a_file_in_place_of_a_pipe_or_a_device(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """`--force` replaces a file the user names. A pipe (or a device: as root, `-o /dev/null
    --force` replaced /dev/null's own node with the pickle) is refused and left as it is; a
    folder where no file can be made is a clear error, not a traceback."""
    code, output = mlp("run", "tests.workflows:two_models")
    assert code == 0, output
    run_id = run_id_of(output)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)

    code, output = mlp("artifacts", run_id, "fit[0]/model", "-o", str(pipe), "--force")

    assert code == 2 and "is not a regular file; nothing written" in output, output
    assert pipe.is_fifo()
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == ["pipe"]
    code, output = mlp("artifacts", run_id, "fit[0]/model", "-o", "/proc/self/model.pkl")
    assert code == 2 and "cannot write a file in /proc/" in output, output


def test_a_download_to_standard_output_is_the_artifact_for_the_next_program(
    cli_env: dict[str, str],
) -> None:
    """`-o -` pipes a model into the program that loads it: only its bytes on standard output.
    A changed one is told on standard error, with exit 2, once its bytes are out."""
    run_id, artifact, blob = _a_stored_artifact()

    piped = CliRunner().invoke(app, ["artifacts", run_id, artifact.sha256, "-o", "-"])

    assert piped.exit_code == 0 and piped.stderr == "", piped.output
    assert piped.stdout_bytes == blob.read_bytes()
    assert pickle.loads(piped.stdout_bytes)["seed"] in (1, 2)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    changed = CliRunner().invoke(app, ["artifacts", run_id, artifact.sha256, "-o", "-"])
    assert changed.exit_code == 2 and "arrived changed" in changed.stderr, changed.output
    assert "arrived changed" not in changed.stdout


def test_a_download_to_standard_output_ends_cleanly_when_its_reader_is_gone_or_a_terminal(
    cli_env: dict[str, str],
) -> None:
    """Real `mlp` processes: one whose pipe's reader has gone (`| head` that ended) fails
    without a traceback; one whose standard output is a terminal writes nothing to it (a
    pickle would garble it) and says why."""
    run_id, artifact, _ = _a_stored_artifact()
    argv = [sys.executable, "-m", "ml_platform", "artifacts", run_id, artifact.sha256, "-o", "-"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        gone = subprocess.run(
            argv, stdout=write_end, stderr=subprocess.PIPE, env=cli_env, timeout=60, check=False
        )
    finally:
        os.close(write_end)
    assert gone.returncode != 0, gone.stderr
    assert b"Traceback" not in gone.stderr and b"Exception ignored" not in gone.stderr, gone.stderr
    primary, secondary = pty.openpty()
    try:
        shown = subprocess.run(
            argv, stdout=secondary, stderr=subprocess.PIPE, env=cli_env, timeout=60, check=False
        )
        assert shown.returncode == 2 and b"standard output is a terminal" in shown.stderr
        os.set_blocking(primary, False)
        with pytest.raises(BlockingIOError):
            os.read(primary, 1024)  # nothing was written to the terminal
    finally:
        os.close(secondary)
        os.close(primary)


def test_a_store_that_cannot_give_the_artifact_is_a_clear_error_for_either_download(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """The store's file fails as it is read (an I/O error: here /proc/self/mem, whose first
    page cannot be read), or cannot be opened (a folder in its place): both downloads name
    the store and its error, write nothing, and exit 2; `-o -` was a traceback."""
    run_id, artifact, blob = _a_stored_artifact()
    target = tmp_path / "model.pkl"
    blob.unlink()
    blob.symlink_to("/proc/self/mem")

    code, output = mlp("artifacts", run_id, artifact.sha256, "-o", str(target))
    piped = CliRunner().invoke(app, ["artifacts", run_id, artifact.sha256, "-o", "-"])

    assert code == 2, output
    said = " ".join(output.split())  # as wrapped to the terminal's width
    assert f"the artifact store failed to read {blob}: Input/output error" in said, output
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == []
    assert piped.exit_code == 2 and piped.stdout_bytes == b"", piped.output
    assert "the artifact store failed to read" in " ".join(piped.stderr.split())
    blob.unlink()
    blob.mkdir()
    code, output = mlp("artifacts", run_id, artifact.sha256, "-o", str(target))
    piped = CliRunner().invoke(app, ["artifacts", run_id, artifact.sha256, "-o", "-"])
    assert code == 2 and f"cannot open {blob}: Is a directory" in " ".join(output.split())
    assert piped.exit_code == 2 and "cannot open" in piped.stderr, piped.output
    assert not target.exists()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a file system of one 4 KiB page (a tmpfs mounted for the test: root only)."""
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_download_to_a_disk_that_fills_up_is_a_clear_error_and_leaves_nothing(
    cli_env: dict[str, str], full_disk: Path
) -> None:
    """A model larger than the room left: an error naming the cause, not a traceback, and no
    partial file taking what room there was."""
    code, output = mlp("run", "tests.workflows:two_models")
    assert code == 0, output
    target = full_disk / "model.pkl"

    code, output = mlp("artifacts", run_id_of(output), "fit[1]/model", "-o", str(target))

    assert code == 2, output
    assert f"the download to {target} failed: No space left on device" in output, output
    assert list(full_disk.iterdir()) == []


def test_an_operator_disables_enables_and_resets_a_user_from_the_cli(
    cli_env: dict[str, str],
) -> None:
    """The CLI is how the first admin is made, and how an operator with the database reaches
    an account when no admin can sign in."""
    from ml_platform.accounts import Accounts
    from ml_platform.security import AuthError

    password = "correct horse battery"  # pragma: allowlist secret
    result = CliRunner().invoke(app, ["users", "create", "bob", "--password-stdin"], input=password)
    assert result.exit_code == 0, result.output
    assert mlp("users", "disable", "bob") == (0, "user bob disabled; their sign-ins have ended\n")
    code, output = mlp("users", "list")
    assert code == 0 and re.search(r"bob .*│ disabled", output), output
    platform = Platform(load_settings()).start()
    accounts = Accounts(platform.db, timedelta(days=1))
    try:
        with pytest.raises(AuthError):
            accounts.authenticate("bob", password)
        assert mlp("users", "enable", "bob")[0] == 0
        accounts.authenticate("bob", password)
        reset = "velvet harbour quantum lemon"  # pragma: allowlist secret
        result = CliRunner().invoke(
            app, ["users", "password", "bob", "--password-stdin"], input=reset
        )
        assert result.exit_code == 0 and "their sign-ins have ended" in result.output
        accounts.authenticate("bob", reset)
        weak = CliRunner().invoke(
            app, ["users", "password", "bob", "--password-stdin"], input="bob"
        )
        assert weak.exit_code == 2 and "at least 12 characters" in weak.output
    finally:
        platform.close()
    assert mlp("users", "disable", "nobody") == (2, "error: no user 'nobody'\n")


def test_show_prints_what_tasks_wrote_as_text_never_as_markup(cli_env: dict[str, str]) -> None:
    """A task's error is the task author's text: `mlp show` printed it through rich's markup
    on --server (a `[link=…]` or a style swallowed or changed what the reader saw)."""
    code, output = mlp(
        "run", "tests.workflows:failing_with", "-p", "message=[bold]not markup[/bold]"
    )
    assert code == 1 and "explode: RuntimeError: [bold]not markup[/bold]" in output, output
    code, shown = mlp("show", run_id_of(output))
    assert "RuntimeError: [bold]not markup[/bold]" in shown, shown


def test_a_workflow_is_also_named_by_its_modules_path(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """`mlp run pipes/train.py:pipeline` was refused ("must look like package.module:…"):
    a path under the current directory is the module workers import."""
    code, output = mlp("run", "tests/workflows.py:arithmetic", "-p", "n=2")
    assert code == 0 and "of tests.workflows:arithmetic v1 succeeded" in output, output
    outside = tmp_path / "train.py"
    outside.write_text("")
    code, output = mlp("run", f"{outside}:pipeline")
    assert code == 2 and "is not under the current directory" in output
    code, output = mlp("run", "tests/nope.py:pipeline")
    assert code == 2 and "tests/nope.py is not a file" in output


def test_prune_removes_what_ended_before_an_age(cli_env: dict[str, str]) -> None:
    code, output = mlp("run", "tests.workflows:arithmetic", "-p", "n=2")
    assert code == 0, output
    code, output = mlp("prune", "--older-than", "30m")
    assert code == 2 and "give an age of at least 1h" in output
    assert "would remove 0 runs" in mlp("prune", "--older-than", "1h", "--dry-run")[1]
    platform = Platform(load_settings()).start()
    try:
        with platform.db.session() as session:
            session.execute(update(Run).values(finished_at=utcnow() - timedelta(days=40)))
    finally:
        platform.close()
    code, output = mlp("prune", "--older-than", "4w", "--dry-run")
    assert code == 0 and re.search(r"would remove 1 runs .*\(task_runs 3, attempts 3", output)
    code, output = mlp("prune", "--older-than", "4w")
    assert code == 0 and output.startswith("removed 1 runs"), output
    code, output = mlp("run", "tests.workflows:arithmetic", "-p", "n=2")
    made = run_id_of(output)
    assert mlp("delete", made) == (0, f"run {made} deleted\n")
    code, output = mlp("delete", made)
    assert code == 2 and f"no run with id {made}" in output
    assert "arithmetic" not in mlp("runs")[1]


def test_pools_are_limited_listed_and_freed_from_the_cli(cli_env: dict[str, str]) -> None:
    assert mlp("pools", "list") == (0, "no pools have a limit or work\n")
    assert mlp("pools", "set", "gpu", "2") == (0, "pool gpu: at most 2 at once\n")
    code, output = mlp("pools", "set", "gpu", "0")
    assert code == 2 and "greater than or equal to 1" in output
    code, output = mlp("pools", "list")
    assert code == 0 and re.search(r"gpu +│ 2 +│ 0", output), output
    assert mlp("pools", "delete", "gpu") == (0, "pool gpu: no limit\n")
    code, output = mlp("pools", "delete", "gpu")
    assert code == 2 and "no pool named 'gpu' has a limit" in output


def test_schedules_are_made_listed_paused_resumed_and_deleted_from_the_cli(
    cli_env: dict[str, str],
) -> None:
    code, output = mlp("schedules", "list")
    assert code == 0 and "no schedules" in output
    code, output = mlp(
        "schedules", "create", "nightly", "tests.workflows:arithmetic", "0 2 * * *", "-p", "n=4"
    )
    assert code == 0 and re.search(r"next tick \d{4}-\d\d-\d\d 02:00 UTC", output), output
    assert "an `mlp server` on this database fires it" in output
    code, output = mlp("schedules", "create", "x", "tests.workflows:arithmetic", "every day")
    assert code == 2 and "not a valid five-field cron expression" in output
    code, output = mlp("schedules", "create", "[b]x", "tests.workflows:arithmetic", "0 2 * * *")
    assert code == 2 and "schedule name '[b]x'" in output
    code, output = mlp("schedules", "create", "bad", "tests.workflows:arithmetic", "0 2 * * *",
                       "-p", "n=four")  # fmt: skip
    assert code == 2 and "parameter 'n'" in output
    assert mlp("schedules", "pause", "nightly") == (0, "schedule nightly paused\n")
    code, output = mlp("schedules", "list")
    assert re.search(r"nightly .*│ 0 2 \* \* \* .*│ paused", output), output
    code, output = mlp("schedules", "resume", "nightly")
    assert code == 0 and "resumed: next tick" in output
    code, output = mlp("run", "tests.workflows:arithmetic", "-p", "n=4")  # by hand
    assert code == 0, output
    platform = Platform(load_settings()).start()
    try:
        due = platform.find_schedule(platform.default_project_id(), "nightly").next_fire_at
        [made] = platform.fire_schedules(due + timedelta(minutes=1))
    finally:
        platform.close()
    code, output = mlp("runs", "--schedule", "nightly")
    assert code == 0 and made.run_id[:8] in output and len(re.findall(r"queued", output)) == 1
    tick = f"{due:%Y-%m-%d %H:%M}"
    assert f"made by a schedule for its tick of {tick} UTC" in mlp("show", made.run_id)[1]
    code, output = mlp("runs", "--workflow", "tests.workflows:arithmetic")
    assert len(re.findall(r"tests\.workflows:arithmetic v1", output)) == 2, output
    assert "tests.workflows" not in mlp("runs", "--workflow", "tests.workflows:nope")[1]
    assert mlp("schedules", "delete", "nightly") == (0, "schedule nightly deleted\n")
    code, output = mlp("schedules", "pause", "nightly")
    assert code == 2 and "no schedule named 'nightly'" in output


def test_a_task_that_fails_twice_then_succeeds_shows_three_attempts(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    counter = tmp_path / "calls"
    code, output = mlp("run", "tests.workflows:flaky_pipeline", "-p", f"counter={counter}")
    assert code == 0, output
    assert re.search(r"flaky\s+│ succeeded │ failed failed succeeded", output), output
    run_id = run_id_of(output)
    code, shown = mlp("show", run_id)
    assert code == 0
    assert "attempt 1 (failed): ConnectionError: transient failure 1" in shown
    code, log = mlp("logs", run_id, "flaky", "--attempt", "1")
    assert code == 0
    assert "flaky call 1" in log and "ConnectionError: transient failure 1" in log
    code, log = mlp("logs", run_id, "flaky")
    assert "attempt 3 (succeeded)" in log and "flaky call 3" in log
    code, listing = mlp("runs")
    assert run_id in listing and "tests.workflows:flaky_pipeline v1" in listing


def test_a_failed_run_exits_non_zero_and_names_the_failure(cli_env: dict[str, str]) -> None:
    code, output = mlp("run", "tests.workflows:failing_pipeline")
    assert code == 1, output
    assert "explode: RuntimeError: boom" in output
    assert re.search(r"echo\s+│ upstream_failed", output)


def test_a_mapped_task_shows_its_element_count_and_each_element_as_a_row(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    code, output = mlp("run", "tests.workflows:mapped", "-p", "n=3", "-p", f"folder={tmp_path}")
    assert code == 0, output
    assert re.search(r"shard_work\s+│ succeeded │ map ×3", output), output
    for index in range(3):
        assert f"shard_work[{index}]" in output


def test_a_task_past_its_timeout_is_killed_and_retried(cli_env: dict[str, str]) -> None:
    started = time.monotonic()
    code, output = mlp("run", "tests.workflows:overrun_pipeline", "-p", "seconds=30")
    assert code == 1, output
    assert time.monotonic() - started < 20
    assert "TimeoutError: task exceeded its 1 s timeout" in output
    assert re.search(r"overrun\s+│ failed\s+│ failed failed", output), output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no_such_module:wf"], "cannot import module 'no_such_module'"),
        # a module that runs as a script at import (argparse, sys.exit): not a silent exit 3
        (["run", "tests.exiting_module:wf"], "it exited while being imported (SystemExit: 3)"),
        (["run", "tests.workflows:nope"], "has no attribute 'nope'"),
        (["run", "tests.workflows:not_a_workflow"], "is a Task, not a workflow"),
        (["run", "tests.workflows"], "must look like 'package.module:workflow_name'"),
        (["run", "tests.workflows:arithmetic", "-p", "n=x"], "parameter 'n': Input should be"),
        (["run", "tests.workflows:arithmetic", "-p", "m=1"], "unknown parameter 'm'"),
        (["run", "tests.workflows:arithmetic", "-p", "n"], "must look like key=value"),
        (["run", "tests.workflows:flaky_pipeline"], "missing parameter 'counter'"),
        (["show", "abcdef12"], "no run with id abcdef12"),
        (["cancel", "abcdef12"], "no run with id abcdef12"),
    ],
)
def test_bad_input_gets_a_clear_error(
    cli_env: dict[str, str], args: list[str], message: str
) -> None:
    code, output = mlp(*args)
    assert code == 2, output
    assert message in output
    assert "Traceback" not in output


def test_an_unreachable_database_is_a_clear_error(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody:secret@127.0.0.1:1/none")
    code, output = mlp("runs")
    assert code == 2
    assert "cannot open the database at postgresql+psycopg://nobody:***@127.0.0.1:1/none" in output
    assert "secret" not in output


def test_ctrl_c_cancels_the_run_and_stops_its_tasks(
    cli_env: dict[str, str], platform: Platform, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    process = spawn("run", "tests.workflows:long_pipeline", "-p", f"marker={marker}")
    wait_for(lambda: marker.exists())
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 130, output
    assert "cancelled by Ctrl-C" in output
    [(run, _)] = platform.runs()
    assert run.state == "cancelled"
    assert {t.state for t in platform.task_runs(run.id)} == {"cancelled"}
    assert [a.state for a in platform.attempts(run.id)] == ["cancelled"]
    time.sleep(0.5)
    assert "finished" not in marker.read_text()


def test_mlp_cancel_stops_a_long_run(
    cli_env: dict[str, str], platform: Platform, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    process = spawn("run", "tests.workflows:long_pipeline", "-p", f"marker={marker}")
    wait_for(lambda: marker.exists())
    [(run, _)] = platform.runs()
    code, output = mlp("cancel", run.id[:8])  # waits until the run has stopped
    assert code == 0 and f"run {run.id[:8]} cancelled" in output, output
    assert platform.run(run.id)[0].state == "cancelled"  # already, when cancel returns
    final, _ = process.communicate(timeout=30)
    assert process.returncode == 1, final
    assert re.search(r"long_step\s+│ cancelled", final), final
    code, output = mlp("cancel", run.id[:8])
    assert code == 0 and "had already ended: cancelled" in output


def test_a_killed_worker_loses_its_attempt_and_another_worker_retries_it(
    cli_env: dict[str, str], platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the lost attempt printed before its worker died stays with it (it says why, often)."""
    monkeypatch.setenv("MLP_LOG_SHIP_SECONDS", "0.2")  # the workers below inherit it
    marker = tmp_path / "marker"
    submitted = platform.submit(workflows.crash_pipeline, {"marker": str(marker)})
    first = spawn("worker", "--concurrency", "1")
    wait_for(
        lambda: "attempt 1 began" in platform.log_part(submitted.run_id, "slow_first_attempt").text,
        what="the first attempt's output in the database",
    )
    first.kill()  # SIGKILL: no chance to clean up
    first.communicate(timeout=10)
    second = spawn("worker", "--concurrency", "1")
    try:
        wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded", timeout=60)
        # The pieces the killed worker shipped: made the lost attempt's log, then swept by a
        # scheduler pass of the live worker; nothing of that output is left behind.
        wait_for(lambda: _log_parts_left(platform) == 0, what="the shipped pieces swept")
    finally:
        second.send_signal(signal.SIGTERM)
        output, _ = second.communicate(timeout=30)
    assert second.returncode == 0 and "stopped" in output
    attempts = platform.attempts(submitted.run_id)
    assert [a.state for a in attempts] == ["lost", "succeeded"]
    assert "lease expired" in (attempts[0].error or "")
    assert attempts[0].log == "attempt 1 began\n" and attempts[1].log == "attempt 2 began\n"
    code, shown = mlp("show", submitted.run_id[:8])
    assert "slow_first_attempt attempt 1 (lost): lease expired" in shown, shown
    # The first attempt's process died with its worker: it never finished.
    assert marker.read_text().splitlines() == ["started 1", "started 2", "finished 2"]


def test_a_task_with_a_point_per_step_shows_one_line_per_metric(cli_env: dict[str, str]) -> None:
    """3,000 loss points: the run's table says the last and how many, not 3,000 values."""
    code, output = mlp("run", "tests.workflows:curve", "-p", "steps=3000")
    assert code == 0, output
    assert "loss=0.0003333 (last of 3,000) accuracy=0.75" in output, output
    code, shown = mlp("show", run_id_of(output))
    assert code == 0 and shown.count("loss=") == 1, shown


def test_a_tasks_output_on_a_terminal_keeps_its_colours_and_obeys_nothing_else(
    cli_env: dict[str, str], platform: Platform
) -> None:
    """`mlp logs` on a terminal (a pty here): a task's escape sequences other than colours
    (the clipboard's OSC 52, a screen clear) are shown, not sent to the terminal as they
    are; into a pipe the output is as printed."""
    code, output = mlp("run", "tests.workflows:hostile")
    assert code == 0, output
    run_id = run_id_of(output)
    primary, secondary = pty.openpty()
    try:
        shown = subprocess.run(
            [sys.executable, "-m", "ml_platform", "logs", run_id, "hostile_output"],
            stdout=secondary,
            stderr=subprocess.STDOUT,
            env=cli_env,
            timeout=60,
        )
        os.close(secondary)
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the other end closed: all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(primary)
    text = seen.decode()
    assert shown.returncode == 0, text
    assert "\x1b[31mred\x1b[0m then ␛]52;c;cm0gLXJmIH4=\ufffd and ␛[2J" in text, repr(text)
    assert "\x1b]52" not in text and "\x1b[2J" not in text
    piped = subprocess.run(
        [sys.executable, "-m", "ml_platform", "logs", run_id, "hostile_output"],
        capture_output=True,
        env=cli_env,
        timeout=60,
    )
    assert b"\x1b]52;c;cm0gLXJmIH4=\x07" in piped.stdout


def test_runs_in_a_state_that_does_not_exist_is_refused_naming_the_states(
    cli_env: dict[str, str],
) -> None:
    code, output = mlp("runs", "--state", "sucess")
    assert code == 2 and "'sucess' is not one of 'queued', 'running', 'succeeded'" in output


def _log_parts_left(platform: Platform) -> int:
    with platform.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(LogPart)) or 0)


def test_the_demo_runs_and_a_second_run_reuses_the_cache(cli_env: dict[str, str]) -> None:
    code, output = mlp("demo", "-c", "1")  # one task process: scikit-learn imported once
    assert code == 0, output
    assert "succeeded" in output and "roc_auc=" in output
    assert "artifact model from register_model" in output
    code, again = mlp("demo", "-c", "1")
    assert code == 0, again
    assert "10 of 15 tasks reused from cache" in again
    assert re.search(r"evaluate\[0\]\s+│ cached\s+│ 0\s+│[^│]*│ accuracy=", again), again
    code, shown = mlp("show", run_id_of(again.splitlines()[0]))
    assert code == 0 and "artifact model from register_model: pickle" in shown
    code, upgraded = mlp("db", "upgrade")
    assert code == 0 and "latest schema" in upgraded


def test_a_release_runs_on_a_database_a_newer_release_migrated(
    cli_env: dict[str, str], home: Path
) -> None:
    """After a deploy whose migration ran, the release before still runs on the newer
    schema: the rolling update's old pods until they are replaced, and every pod after a
    rollback (a rollback does not undo migrations). It refused: a server or worker failed to
    start ("Can't locate revision") and /readyz said 503 ("not head") -- a rollback past a
    migration took the whole platform down. It starts, is ready, and says where it is."""
    code, output = mlp("db", "upgrade")
    assert code == 0 and "latest schema" in output, output
    newer = "0099"  # a migration of a release after this one: no file here names it
    with Platform(load_settings()).db.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": newer})
    code, output = mlp("db", "upgrade")
    assert code == 0, output
    assert f"is at migration {newer}, newer than this release's {head_from_files()}" in output
    code, output = mlp("run", "tests.workflows:arithmetic", "-p", "n=2")
    assert code == 0 and "succeeded" in output, output
    platform = Platform(load_settings()).start()
    try:
        assert platform.schema_behind() is None
        platform.settings.secret_key = SECRET
        with TestClient(create_app(platform.settings, platform=platform)) as client:
            ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["migrations"] == "ok"
    finally:
        platform.close()


def test_logs_follow_shows_what_a_task_prints_while_it_runs(
    cli_env: dict[str, str], platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlp logs -f` prints a running task's first line before the task ends, then the rest,
    then says how the attempt ended."""
    monkeypatch.setenv("MLP_LOG_SHIP_SECONDS", "0.2")  # the worker below inherits it
    submitted = platform.submit(workflows.chatty_pipeline, {"seconds": 3.0})
    worker = spawn("worker", "--concurrency", "1")
    follower = spawn("logs", submitted.run_id[:8], "chatty", "-f")
    try:
        assert follower.stdout is not None
        seen = []
        for line in follower.stdout:
            seen.append(line)
            if "first line" in line:
                break
        [attempt] = platform.attempts(submitted.run_id)
        assert attempt.state == "running", seen  # printed while the task still ran
        rest, _ = follower.communicate(timeout=60)
        assert follower.returncode == 0
        assert "second line" in rest and "chatty attempt 1 ended: succeeded" in rest, rest
    finally:
        for process in (follower, worker):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)


def test_logs_follow_a_task_printing_more_than_a_log_keeps_without_a_gap(
    cli_env: dict[str, str], platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task prints 2.4 MB (a log keeps its last MiB): `mlp logs -f`, following it from its
    first line, prints every line once and in order; `mlp logs` afterwards says how much of
    the output was not kept and begins at a whole line."""
    monkeypatch.setenv("MLP_LOG_SHIP_SECONDS", "0.2")  # the worker below inherits it
    lines = 30_000
    submitted = platform.submit(workflows.numbered_lines, {"lines": lines, "seconds": 2.5})
    worker = spawn("worker", "--concurrency", "1")
    try:
        wait_for(
            lambda: "line 00000000" in platform.log_part(submitted.run_id, "numbered").text,
            what="the task's first lines in the database",
        )
        follower = spawn("logs", submitted.run_id[:8], "numbered", "-f")
        followed, _ = follower.communicate(timeout=60)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    assert follower.returncode == 0 and "numbered attempt 1 ended: succeeded" in followed
    numbers = [int(n) for n in re.findall(r"^line (\d{8}) x{66}$", followed, re.MULTILINE)]
    assert numbers == list(range(lines)), "not every line once, in order"
    assert "not kept" not in followed
    code, shown = mlp("logs", submitted.run_id[:8], "numbered")
    assert code == 0
    kept = [int(n) for n in re.findall(r"^line (\d{8}) x{66}$", shown, re.MULTILINE)]
    assert kept == list(range(lines - len(kept), lines)) and 12_900 < len(kept) <= 12_945
    dropped = (lines - len(kept)) * 81  # a line: 80 characters and its end
    assert f"({dropped:,} characters of output not kept: a log keeps its last MiB)" in shown


def test_mlp_retry_reruns_only_what_did_not_succeed(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "fail").write_text("3")
    code, output = mlp("run", "tests.workflows:five_steps", "-p", f"folder={marks}")
    assert code == 1, output
    failed = run_id_of(output)
    (marks / "fail").unlink()
    code, output = mlp("retry", failed)
    assert code == 0, output
    assert f"retries {failed}: 2 task(s) reused" in output and "2 reused" in output
    retried = re.search(r"run ([0-9a-f]{8}) retries", output)
    assert retried, output
    assert f"retries run {failed}" in mlp("show", retried.group(1))[1]
    assert sorted(p.name.split("-")[0] for p in marks.iterdir()) == [
        "step1",
        "step2",
        "step3",
        "step3",
        "step4",
        "step5",
    ]
    code, output = mlp("retry", "ffffffff")
    assert code == 2 and "no run" in output
    # --latest with unchanged code: the same version, everything that succeeded reused.
    code, output = mlp("retry", retried.group(1), "--latest")
    assert code == 0, output
    assert "5 task(s) reused" in output and "five_steps v1" in output


def test_demo_without_the_examples_extra_says_how_to_add_it(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a)
    )
    code, output = mlp("demo")
    assert code == 2 and "pip install 'ml-platform[examples]'" in output


def test_the_readme_pipeline_runs_as_written(cli_env: dict[str, str], tmp_path: Path) -> None:
    """README.md's "Your own pipeline": its file and its first command, taken literally."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(# my_pipeline\.py\n.*?)```", readme, re.S)
    assert block, "README.md lost its my_pipeline.py example"
    (tmp_path / "my_pipeline.py").write_text(block.group(1))
    command = re.search(r"^uv run (mlp run my_pipeline:pipeline [^#\n]*?)\s+#", readme, re.M)
    assert command, "README.md lost its `mlp run my_pipeline:pipeline` command"
    argv = [a.strip("'") for a in command.group(1).split()[1:]]
    env = {**cli_env, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "ml_platform", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"train\[2\]\s+│ succeeded │ map ×3", result.stdout), result.stdout
    assert "succeeded in" in result.stdout


def test_a_large_run_shows_counts_by_state_not_a_row_per_task(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    code, output = mlp("run", "tests.workflows:mapped", "-p", "n=60", "-p", f"folder={tmp_path}")
    assert code == 0, output
    assert "63 tasks: 63 succeeded" in output  # the live view's last state
    assert "shard_work[59]" not in output.split("63 tasks:")[1]  # no row per task after it
    platform = Platform(load_settings()).start()
    try:
        run_id = platform.runs(1)[0][0].id
        progress = platform.progress(run_id, 2)
        assert progress.total == 63 and progress.counts == {"succeeded": 63}
        assert progress.running == [] and progress.failed == []
    finally:
        platform.close()
    view = cli._compact(
        {"succeeded": 90, "running": 5, "failed": 3},
        [(f"t[{i}]", None, None) for i in range(2)],
        [("bad", None, None)],
    )
    from rich.console import Console

    text = Console(width=100, record=True)
    text.print(view)
    shown = text.export_text()
    assert "98 tasks: 90 succeeded, 5 running, 3 failed" in shown
    assert "… 3 more" in shown and "… 2 more" in shown and "bad" in shown

"""Distributed mode: PostgreSQL + Redis Streams + several `mlp worker` processes."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select, text

from ml_platform.service import Platform
from ml_platform.store.models import Attempt
from ml_platform.worker import make_dispatcher
from tests import workflows
from tests.conftest import RedisTarget, throwaway_database
from tests.forked import ZYGOTE, Forked
from tests.helpers import wait_for
from tests.integration.conftest import platform_on

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(distributed_env: dict[str, str]) -> dict[str, str]:
    return distributed_env


@pytest.fixture
def platform(distributed_platform: Platform) -> Platform:
    return distributed_platform


@pytest.fixture
def workers(env: dict[str, str]) -> Iterator[Callable[[int], list[Forked]]]:
    """`mlp worker --concurrency 2` processes, forked from a warm copy (tests/forked.py)."""
    started: list[Forked] = []

    def start(count: int) -> list[Forked]:
        for _ in range(count):
            started.append(ZYGOTE.spawn(["worker", "--concurrency", "2"], env))
        return started[-count:]

    yield start
    _stop(started)


def _stop(processes: list[Forked]) -> None:
    """SIGTERM (a drain), then SIGKILL what has not ended 30 s later."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


def test_two_workers_share_a_fan_out_and_run_each_task_once(
    platform: Platform, workers: Callable[[int], list[Forked]]
) -> None:
    for process in workers(2):
        assert process.stdout is not None
        assert "ready" in process.stdout.readline()  # both listen before the run exists
    submitted = platform.submit(workflows.naps, {"n": 8, "seconds": 0.5})
    wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded")
    attempts = platform.attempts(submitted.run_id)
    assert len(attempts) == 9 and {a.state for a in attempts} == {"succeeded"}
    # 8 naps of 0.5 s on 2 slots per worker: one worker alone could not take them all at once.
    assert len({a.worker_id for a in attempts}) == 2
    total = next(t for t in platform.task_runs(submitted.run_id) if t.node_id == "total")
    assert total.result == {"value": 28}


#: What a newer release's migration may do to the schema (docs/operations.md: a migration
#: adds; it never drops or renames what a release before reads), and its revision.
_A_NEWER_RELEASES_MIGRATION = [
    "ALTER TABLE runs ADD COLUMN future_labels jsonb NOT NULL DEFAULT '{}'",
    "ALTER TABLE task_runs ADD COLUMN future_note text NOT NULL DEFAULT ''",
    "ALTER TABLE attempts ADD COLUMN future_cost double precision",
    "CREATE INDEX ix_task_runs_future_note ON task_runs (future_note)",
    "CREATE TABLE future_things (id bigserial PRIMARY KEY,"
    " run_id varchar(32) NOT NULL REFERENCES runs (id) ON DELETE CASCADE)",
    "UPDATE alembic_version SET version_num = '0099'",
]


def test_workers_of_the_release_before_run_on_a_schema_a_newer_release_migrated(
    distributed_env: dict[str, str],
) -> None:
    """A rollback does not undo migrations: after it, this release's workers run on the schema
    the newer release made, with its columns, index and table. They claim, run and finish a
    chain (its one-statement steps and end) and a fan-out/fan-in on it; the rows they make
    take the new columns' defaults; `mlp db upgrade` leaves the schema as it is."""
    with throwaway_database() as url:
        env = dict(distributed_env, DATABASE_URL=url)
        started: list[Forked] = []
        # This release's schema, then the newer one's.
        with platform_on(env) as platform:
            try:
                _runs_on_the_newer_schema(platform, env, started)
            finally:
                _stop(started)


def _runs_on_the_newer_schema(
    platform: Platform, env: dict[str, str], started: list[Forked]
) -> None:
    with platform.db.engine.begin() as connection:
        for statement in _A_NEWER_RELEASES_MIGRATION:
            connection.execute(text(statement))
    upgrade = ZYGOTE.spawn(["db", "upgrade"], env)
    said, _ = upgrade.communicate(timeout=60)
    assert upgrade.returncode == 0 and "newer than this release" in said, said
    for _ in range(2):
        started.append(ZYGOTE.spawn(["worker", "--concurrency", "2"], env))
        assert started[-1].stdout is not None
        notice = started[-1].stdout.readline()
        assert "at migration 0099, newer than this release knows" in notice, notice
        assert "ready" in started[-1].stdout.readline()

    chain = platform.submit(workflows.relay, {"n": 5})
    fan = platform.submit(workflows.spread, {"n": 6})

    def ended(run_id: str) -> bool:
        return platform.run(run_id)[0].state == "succeeded"

    wait_for(lambda: ended(chain.run_id) and ended(fan.run_id))
    ends = {t.node_id: t.result for t in platform.task_runs(chain.run_id)}
    assert {"value": 32.0} in ends.values(), ends  # 1 doubled five times
    [total] = [t for t in platform.task_runs(fan.run_id) if t.node_id == "total"]
    assert total.result == {"value": 24.0}  # six times double(double(1))
    with platform.db.engine.connect() as connection:
        notes = connection.execute(text("SELECT DISTINCT future_note FROM task_runs"))
        assert notes.scalars().all() == [""]
        version = connection.execute(text("SELECT version_num FROM alembic_version"))
        assert version.scalar() == "0099"


def test_kill_9_of_a_worker_mid_task_redelivers_and_commits_once(
    platform: Platform, workers: Callable[[int], list[Forked]], tmp_path: Path
) -> None:
    pool = workers(2)
    marker = tmp_path / "marker"
    submitted = platform.submit(workflows.crash_pipeline, {"marker": str(marker)})
    wait_for(marker.exists)
    [running] = [a for a in platform.attempts(submitted.run_id) if a.state == "running"]
    holder_pid = int((running.worker_id or "").split(":")[1])
    holder = next(p for p in pool if p.pid == holder_pid)
    holder.kill()
    holder.communicate(timeout=10)
    wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded")
    attempts = platform.attempts(submitted.run_id)
    assert [a.state for a in attempts] == ["lost", "succeeded"]
    assert attempts[1].worker_id != running.worker_id
    assert marker.read_text().splitlines() == ["started 1", "started 2", "finished 2"]
    [task_run] = platform.task_runs(submitted.run_id)
    assert task_run.result == {"value": 2}  # the second attempt's result, committed once


def test_a_worker_killed_while_it_runs_an_attempt_it_continued_to_loses_nothing(
    platform: Platform, workers: Callable[[int], list[Forked]], tmp_path: Path
) -> None:
    """An attempt a finish claimed for its own worker was never published: when that worker
    dies, the lease runs out, the reaper retries it, and another worker commits it once."""
    [holder] = workers(1)  # alone, so that the short steps run in its warm task process
    marker = tmp_path / "marker"
    submitted = platform.submit(workflows.short_steps_then_a_crash, {"marker": str(marker)})
    wait_for(marker.exists)
    [other] = workers(1)
    assert other.stdout is not None
    assert "ready" in other.stdout.readline()
    before, running = platform.attempts(submitted.run_id)[1:]
    assert running.state == "running"
    assert running.started_at == before.finished_at  # claimed in the commit that ended before
    assert running.worker_id == before.worker_id
    assert int((running.worker_id or "").split(":")[1]) == holder.pid
    holder.kill()
    holder.communicate(timeout=10)
    wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded")
    last = [a for a in platform.attempts(submitted.run_id) if a.task_run_id == running.task_run_id]
    assert [a.state for a in last] == ["lost", "succeeded"]
    assert last[1].worker_id != running.worker_id
    assert marker.read_text().splitlines() == ["started 1", "started 2", "finished 2"]


def test_a_worker_killed_holding_claims_made_ahead_loses_none_of_them(
    platform: Platform, workers: Callable[[int], list[Forked]], tmp_path: Path
) -> None:
    """Brief tasks: a worker holds, beside the attempts it runs, claims made ahead for the
    slots they will free (leased to it, started by no process yet). kill -9 of that worker:
    the leases of both kinds run out, the reaper retries them, another worker commits every
    task once."""
    [holder] = workers(1)  # two slots
    params = {"path": str(tmp_path / "ends"), "n": 16, "seconds": 0.3}
    submitted = platform.submit(workflows.stamped_naps, params)
    held = f":{holder.pid}:"

    def holds_more_than_it_runs() -> bool:
        running = [a for a in platform.attempts(submitted.run_id) if a.state == "running"]
        return sum(held in (a.worker_id or "") for a in running) > 2

    wait_for(holds_more_than_it_runs)
    holder.kill()
    holder.communicate(timeout=10)
    workers(1)
    wait_for(lambda: platform.run(submitted.run_id)[0].state in ("succeeded", "failed"))
    assert platform.run(submitted.run_id)[0].state == "succeeded"
    tasks = platform.task_runs(submitted.run_id)
    attempts = platform.attempts(submitted.run_id)
    lost = [a for a in attempts if a.state == "lost"]
    assert len(lost) >= 3 and all("lease expired" in (a.error or "") for a in lost)
    assert {a.state for a in attempts} == {"succeeded", "lost"}
    assert sum(a.state == "succeeded" for a in attempts) == len(tasks)  # each committed once


def _running_held_by(platform: Platform, held: str, states: tuple[str, ...] = ("running",)) -> int:
    """How many attempts in ``states`` the worker whose id contains ``held`` holds."""
    with platform.db.session() as session:
        running = session.scalar(
            select(func.count())
            .select_from(Attempt)
            .where(Attempt.state.in_(states), Attempt.worker_id.contains(held))
        )
    return running or 0


def _connections_of(platform: Platform, pid: int) -> int:
    """How many PostgreSQL backends still serve process ``pid`` (named by store.db)."""
    with platform.db.session() as session:
        count = session.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
            {"name": f"ml-platform pid {pid}"},
        )
    return count or 0


def test_a_worker_killed_holding_a_batch_of_short_attempts_loses_none_of_them(
    platform: Platform, workers: Callable[[int], list[Forked]]
) -> None:
    """Tasks shorter than a commit: a worker claims them a batch ahead and holds their
    outcomes until the batch commits. kill -9 of that worker mid-batch: what it ran but had
    not committed and what it had claimed but not run are retried once their leases run out,
    and another worker commits every task once."""
    [holder] = workers(1)
    submitted = platform.submit(workflows.arithmetic, {"n": 600})
    held = f":{holder.pid}:"
    for _ in range(50):  # caught holding a batch: frozen, what it holds is what it loses
        wait_for(lambda: _running_held_by(platform, held) > 4, interval=0.005)
        holder.send_signal(signal.SIGSTOP)
        time.sleep(0.1)  # a commit it had sent ends without it
        holding = _running_held_by(platform, held)
        if holding > 4:
            break
        holder.send_signal(signal.SIGCONT)  # it committed most of it meanwhile: again
    holder.kill()
    holder.communicate(timeout=10)
    # A statement it had sent before it froze runs to its end without it (a claim commits on
    # a loaded machine well after the 0.1 s above): what it holds is known once its backends
    # are gone. Leases it let expire meanwhile are lost already, and count as held.
    wait_for(lambda: _connections_of(platform, holder.pid) == 0, interval=0.01)
    holding = _running_held_by(platform, held, ("running", "lost"))
    [other] = workers(1)
    # A line per task: read them as they come, or its pipe fills and the worker blocks.
    assert other.stdout is not None
    drain = threading.Thread(target=other.stdout.read, daemon=True)
    drain.start()
    wait_for(lambda: platform.run(submitted.run_id)[0].state in ("succeeded", "failed"))
    other.send_signal(signal.SIGTERM)
    drain.join(timeout=30)
    other.wait(timeout=30)
    assert platform.run(submitted.run_id)[0].state == "succeeded"
    tasks = platform.task_runs(submitted.run_id)
    attempts = platform.attempts(submitted.run_id)
    lost = [a for a in attempts if a.state == "lost"]
    assert len(lost) == holding > 4 and all("lease expired" in (a.error or "") for a in lost)
    assert {a.state for a in attempts} == {"succeeded", "lost"}
    assert sum(a.state == "succeeded" for a in attempts) == len(tasks)  # each committed once
    results = {t.node_id: t.result for t in tasks}
    assert results["total"] == {"value": float(sum(2 * i for i in range(600)))}


def test_sigterm_to_a_worker_holding_a_batch_of_short_attempts_commits_or_hands_back_all(
    platform: Platform, workers: Callable[[int], list[Forked]]
) -> None:
    """SIGTERM while a worker holds a batch of short attempts (claimed ahead, outcomes not yet
    committed): the drain commits what ran, hands back what did not (charging nothing), and
    exits 0 holding nothing; another worker runs the rest, every task committed once."""
    [holder] = workers(1)
    assert holder.stdout is not None
    drain = threading.Thread(target=holder.stdout.read, daemon=True)
    drain.start()
    submitted = platform.submit(workflows.arithmetic, {"n": 600})
    held = f":{holder.pid}:"
    wait_for(lambda: _running_held_by(platform, held) > 4, interval=0.005)  # a batch
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=30) == 0
    drain.join(timeout=30)
    mine = [a for a in platform.attempts(submitted.run_id) if held in (a.worker_id or "")]
    assert mine and not [a for a in mine if a.state == "running"]
    handed = [a for a in mine if a.state == "lost"]
    assert all(a.error == "handed back: draining" for a in handed)
    [other] = workers(1)
    assert other.stdout is not None
    threading.Thread(target=other.stdout.read, daemon=True).start()
    wait_for(lambda: platform.run(submitted.run_id)[0].state in ("succeeded", "failed"))
    assert platform.run(submitted.run_id)[0].state == "succeeded"
    tasks = platform.task_runs(submitted.run_id)
    assert {t.lost_attempts for t in tasks} == {0}  # a hand-back is not a loss
    attempts = platform.attempts(submitted.run_id)
    assert sum(a.state == "succeeded" for a in attempts) == len(tasks)  # each committed once
    other.send_signal(signal.SIGTERM)
    other.wait(timeout=30)


def _utc(moment: datetime | None) -> datetime:
    assert moment is not None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def test_sigterm_to_a_worker_holding_claims_made_ahead_hands_them_back_unrun(
    platform: Platform, workers: Callable[[int], list[Forked]], tmp_path: Path
) -> None:
    """SIGTERM while a worker holds claims made ahead: the drain hands them back at once,
    unrun and charging nothing, lets its running attempts finish, and exits 0; another worker
    runs the rest, every task committed once."""
    [holder] = workers(1)
    params = {"path": str(tmp_path / "ends"), "n": 16, "seconds": 0.3}
    submitted = platform.submit(workflows.stamped_naps, params)
    held = f":{holder.pid}:"

    def mine() -> list[Any]:
        return [a for a in platform.attempts(submitted.run_id) if held in (a.worker_id or "")]

    wait_for(lambda: sum(a.state == "running" for a in mine()) > 2)
    signalled = datetime.now(UTC)
    holder.send_signal(signal.SIGTERM)
    output, _ = holder.communicate(timeout=30)
    assert holder.returncode == 0, output
    left = mine()
    assert not [a for a in left if a.state == "running"], output
    handed = [a for a in left if a.state == "lost"]
    assert handed and all(a.error == "handed back: draining" for a in handed), output
    # At once: not after a claim's longest wait for a slot (2 s), nor at the drain's end.
    assert all(_utc(a.finished_at) - signalled < timedelta(seconds=1) for a in handed), output
    workers(1)
    wait_for(lambda: platform.run(submitted.run_id)[0].state in ("succeeded", "failed"))
    assert platform.run(submitted.run_id)[0].state == "succeeded"
    tasks = platform.task_runs(submitted.run_id)
    assert {t.lost_attempts for t in tasks} == {0}  # a hand-back is not a loss
    attempts = platform.attempts(submitted.run_id)
    assert sum(a.state == "succeeded" for a in attempts) == len(tasks)


def test_lost_redis_data_does_not_lose_queued_work(
    platform: Platform,
    workers: Callable[[int], list[Forked]],
    redis_client: redis.Redis,
    redis_target: RedisTarget,
) -> None:
    submitted = platform.submit(workflows.arithmetic, {"n": 4})
    # Published before any worker runs, then Redis "restarts" empty.
    make_dispatcher(platform, "submitter").publish(platform.schedule(submitted.run_id))
    assert redis_client.xlen(f"{redis_target.prefix}:attempts:default") == 4
    redis_client.delete(*redis_client.keys(f"{redis_target.prefix}:*"))
    workers(1)
    wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded")


def test_redis_emptied_while_a_worker_runs_loses_no_queued_work(
    platform: Platform,
    workers: Callable[[int], list[Forked]],
    redis_client: redis.Redis,
    redis_target: RedisTarget,
) -> None:
    """Redis loses its data mid-run, under a running worker: the six attempts whose dispatch
    it lost are published again from the database (the worker's full pass, once per lease),
    and each runs once."""
    [worker] = workers(1)  # 2 slots for 8 naps: six wait in the stream
    assert worker.stdout is not None
    assert "ready" in worker.stdout.readline()
    submitted = platform.submit(workflows.naps, {"n": 8, "seconds": 0.5})
    wait_for(lambda: any(a.state == "running" for a in platform.attempts(submitted.run_id)))
    redis_client.delete(*redis_client.keys(f"{redis_target.prefix}:*"))
    wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded")
    attempts = platform.attempts(submitted.run_id)
    assert len(attempts) == 9 and {a.state for a in attempts} == {"succeeded"}


def test_two_workers_share_the_elements_of_a_mapped_task_and_run_each_once(
    platform: Platform, workers: Callable[[int], list[Forked]]
) -> None:
    for process in workers(2):
        assert process.stdout is not None
        assert "ready" in process.stdout.readline()
    submitted = platform.submit(workflows.mapped_naps, {"n": 8, "seconds": 0.4})
    wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded")
    tasks = {t.id: t for t in platform.task_runs(submitted.run_id)}
    by_node = {t.node_id: t for t in tasks.values()}
    assert by_node["total"].result == {"value": sum(range(8))}
    assert by_node["nap"].state == "succeeded"
    attempts = platform.attempts(submitted.run_id)
    elements = [a for a in attempts if tasks[a.task_run_id].node_id.startswith("nap[")]
    assert sorted(tasks[a.task_run_id].node_id for a in elements) == sorted(
        f"nap[{i}]" for i in range(8)
    )  # one attempt each
    assert {a.state for a in elements} == {"succeeded"}
    assert len({a.worker_id for a in elements}) == 2


def test_a_worker_killed_mid_map_loses_no_element_and_commits_each_once(
    platform: Platform, workers: Callable[[int], list[Forked]]
) -> None:
    pool = workers(2)
    for process in pool:
        assert process.stdout is not None
        assert "ready" in process.stdout.readline()
    submitted = platform.submit(workflows.mapped_naps, {"n": 6, "seconds": 1.5})

    def elements_running() -> list[Attempt]:
        # Attempts first: the map expands meanwhile, and a task run is stored before its
        # attempt, so every attempt read here has its task run in the read after.
        attempts = platform.attempts(submitted.run_id)
        tasks = {t.id: t.node_id for t in platform.task_runs(submitted.run_id)}
        return [
            a for a in attempts if a.state == "running" and tasks[a.task_run_id].startswith("nap[")
        ]

    running: list[Attempt] = []

    def found() -> bool:
        running[:] = elements_running()
        return bool(running)

    wait_for(found)
    holder_pid = int((running[0].worker_id or "").split(":")[1])
    holder = next(p for p in pool if p.pid == holder_pid)
    holder.kill()
    holder.communicate(timeout=10)
    wait_for(lambda: platform.run(submitted.run_id)[0].state == "succeeded", timeout=90)
    by_node = {t.node_id: t for t in platform.task_runs(submitted.run_id)}
    assert by_node["total"].result == {"value": sum(range(6))}
    tasks = {t.id: t.node_id for t in by_node.values()}
    succeeded: dict[str, int] = {}
    lost = 0
    for attempt in platform.attempts(submitted.run_id):
        if attempt.state == "succeeded":
            succeeded[tasks[attempt.task_run_id]] = succeeded.get(tasks[attempt.task_run_id], 0) + 1
        lost += attempt.state == "lost"
    assert {f"nap[{i}]" for i in range(6)} <= set(succeeded)
    assert set(succeeded.values()) == {1}  # every element committed exactly once
    assert lost >= 1  # the killed worker's element(s), retried elsewhere on the lost budget

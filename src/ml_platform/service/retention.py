"""Retention: remove ended runs older than an age, with everything they alone hold, and the
artifact blobs nothing refers to any more (`mlp prune --older-than 90d`).

Refresh tokens that expired before the cut-off go too (each sign-in and each renewal adds
one). What stays: every run not ended, or ended after the cut-off; workflows, schedules, users. A
kept run that retried a removed one loses only that link (``retry_of``); a kept task that was
a cache hit or a retry's reuse of a removed one keeps its own copy of the result, metrics,
params and artifact rows. Once removed, an old task's result is no longer a cache entry.

Runs go in batches, each batch one transaction: a crash between two leaves whole runs, never
half of one. Blobs are marked and swept after: a blob is deleted only when no artifact row,
task result or task input names it *and* it was last written before the cut-off too, so that
a blob a running task just saved (its outcome not committed yet), or saved again (``put``
refreshes an existing blob's time), is never taken.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update

from ml_platform.artifacts import ARTIFACT_KEY
from ml_platform.engine.states import RUN_TERMINAL
from ml_platform.service.core import NotFound
from ml_platform.service.queries import Queries
from ml_platform.store.models import (
    Artifact,
    Attempt,
    LogPart,
    Metric,
    MetricSeries,
    Param,
    RefreshToken,
    Run,
    TaskRun,
)


class RunNotEnded(ValueError):
    """A run still queued or running cannot be deleted."""


#: Runs removed per transaction (each with its task runs, attempts, logs and metrics).
BATCH = 50
#: Task runs read per transaction while marking the blobs that are named.
MARK_BATCH = 5000


@dataclass
class Pruned:
    """What a prune removed (or, in a dry run, would remove)."""

    runs: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    blobs: int = 0
    blob_bytes: int = 0

    def add(self, table: str, count: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + count


def artifact_digests(value: Any) -> Iterator[str]:
    """Every blob a stored result or input names, however deep (a mapped task's elements,
    an element's slice of its list)."""
    if isinstance(value, dict):
        digest = value.get(ARTIFACT_KEY)
        if isinstance(digest, str):
            yield digest
        for item in value.values():
            yield from artifact_digests(item)
    elif isinstance(value, list):
        for item in value:
            yield from artifact_digests(item)


class Retention(Queries):
    """Remove what is older than an age: ended runs, then blobs nothing names."""

    def prune(self, before: datetime, *, dry_run: bool = False) -> Pruned:
        """Remove the runs that ended before ``before`` and the blobs nothing refers to that
        were last written before it too; with ``dry_run``, only count them."""
        pruned = Pruned()
        ended = select(Run.id).where(Run.state.in_(RUN_TERMINAL), Run.finished_at < before)
        if dry_run:  # counted in SQL: an IN list of every old run's id would not fit a statement
            with self.db.session() as session:
                pruned.runs = (
                    session.scalar(select(func.count()).select_from(ended.subquery())) or 0
                )
                for table, model, owned in self._owned(ended):
                    counted = select(func.count()).select_from(model).where(owned)
                    pruned.add(table, session.scalar(counted) or 0)
        else:
            while True:
                with self.db.session() as session:
                    # Locked first: a retry of one of them (which holds it for share) either
                    # committed before -- and is unlinked below -- or waits and finds it gone.
                    # One being retried now is left for the next prune.
                    batch = ended.limit(BATCH).with_for_update(skip_locked=True)
                    ids = list(session.scalars(batch))
                    if not ids:
                        break
                    self._remove(session, ids, pruned)
        expired = RefreshToken.expires_at < before  # sign-ins over long before the cut-off
        with self.db.session() as session:
            if dry_run:
                count = session.scalar(select(func.count()).where(expired))
            else:
                count = getattr(session.execute(delete(RefreshToken).where(expired)), "rowcount", 0)
        pruned.add("refresh_tokens", count or 0)
        self._sweep(before, pruned, dry_run)
        return pruned

    def delete_run(self, run_id: str) -> Pruned:
        """Remove one ended run with what it alone holds, as a prune would (its blobs go at the
        next prune's sweep); RunNotEnded if it has not ended (cancel it first)."""
        pruned = Pruned()
        with self.db.session() as session:
            state = session.scalar(select(Run.state).where(Run.id == run_id).with_for_update())
            if state is None:
                raise NotFound(f"no run with id {run_id}")
            if state not in RUN_TERMINAL:
                raise RunNotEnded(f"run {run_id[:8]} is {state}: cancel it, then delete it")
            self._remove(session, [run_id], pruned)
        return pruned

    @staticmethod
    def _owned(ids: Any) -> list[tuple[str, Any, Any]]:
        """(table, model, condition) for the rows that belong to the runs ``ids`` names (a
        list, or a select of them), children before parents."""
        attempts = select(Attempt.id).where(Attempt.run_id.in_(ids))
        return [
            ("log_parts", LogPart, LogPart.attempt_id.in_(attempts)),
            ("metric_series", MetricSeries, MetricSeries.run_id.in_(ids)),
            ("metrics", Metric, Metric.run_id.in_(ids)),
            ("params", Param, Param.run_id.in_(ids)),
            ("artifacts", Artifact, Artifact.run_id.in_(ids)),
            ("attempts", Attempt, Attempt.run_id.in_(ids)),
            ("task_runs", TaskRun, TaskRun.run_id.in_(ids)),
        ]

    def _remove(self, session: Any, ids: list[str], pruned: Pruned) -> None:
        for table, model, owned in self._owned(ids):
            pruned.add(table, session.execute(delete(model).where(owned)).rowcount)
        # A kept run that retried one of these keeps everything of its own; only the link goes.
        session.execute(
            update(Run).where(Run.retry_of.in_(ids), Run.id.not_in(ids)).values(retry_of=None)
        )
        pruned.runs += session.execute(delete(Run).where(Run.id.in_(ids))).rowcount

    def _sweep(self, before: datetime, pruned: Pruned, dry_run: bool) -> None:
        """Delete the blobs no row names any more that were last written before ``before``
        (and leftovers of interrupted writes as old)."""
        root = self.artifacts.root
        if not root.is_dir():
            return
        named: set[str] = set()
        with self.db.session() as session:
            named.update(session.scalars(select(Artifact.sha256).distinct()))
        # In short transactions by id (SQLite's reads hold its one lock): a task run made
        # meanwhile has a higher id and is read in a later one; one that takes a result of
        # another (a cache hit) names a blob that other, still kept, row names too.
        after = 0
        while True:
            with self.db.session() as session:
                rows = session.execute(
                    select(TaskRun.id, TaskRun.result, TaskRun.inputs)
                    .where(TaskRun.id > after)
                    .order_by(TaskRun.id)
                    .limit(MARK_BATCH)
                ).all()
            for _, result, inputs in rows:
                named.update(artifact_digests(result))
                named.update(artifact_digests(inputs))
            if len(rows) < MARK_BATCH:
                break
            after = rows[-1].id
        cutoff = before.timestamp()
        for folder in root.iterdir():
            if not folder.is_dir():
                continue
            for blob in folder.iterdir():
                if blob.name in named:
                    continue
                try:
                    stat = blob.stat()
                except FileNotFoundError:
                    continue
                if stat.st_mtime >= cutoff:
                    continue
                pruned.blobs += 1
                pruned.blob_bytes += stat.st_size
                if not dry_run:
                    blob.unlink(missing_ok=True)
        if not dry_run:
            self._sweep_incoming(cutoff)

    def _sweep_incoming(self, cutoff: float) -> None:
        """Temporary files of writes that never finished (their process died), as old."""
        for leftover in self.artifacts.root.glob(".incoming-*"):
            try:
                if leftover.stat().st_mtime < min(cutoff, time.time() - 86400):
                    os.unlink(leftover)
            except FileNotFoundError:
                continue

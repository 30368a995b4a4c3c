"""Cron schedules: create them, list them, and fire the ones that are due (once each, however
many schedulers ask).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from ml_platform.sdk import WorkflowError
from ml_platform.service.core import Submitted
from ml_platform.service.runs import Runs
from ml_platform.store.models import Schedule, utcnow

log = logging.getLogger(__name__)


def next_tick(cron: str, after: datetime) -> datetime:
    """The first tick of ``cron`` strictly after ``after`` (UTC)."""
    from croniter import croniter  # here: croniter and dateutil are ≈ 2 MiB of every worker

    tick: datetime = croniter(cron, after).get_next(datetime)
    return tick.astimezone(UTC)


def latest_tick(cron: str, first_due: datetime, now: datetime) -> datetime:
    """The latest tick in ``[first_due, now]`` (``first_due`` is itself a tick)."""
    tick = first_due
    while (following := next_tick(cron, tick)) <= now:
        tick = following
    return tick


class ScheduleError(ValueError):
    """A schedule's cron, name, workflow or params are not acceptable."""


class Schedules(Runs):
    """Cron schedules that submit runs."""

    def create_schedule(
        self, project_id: int, name: str, reference: str, cron: str, params: Mapping[str, Any]
    ) -> Schedule:
        """A schedule that submits ``reference`` with ``params`` at every cron tick (UTC)."""
        from croniter import CroniterBadDateError, croniter

        if not croniter.is_valid(cron):
            raise ScheduleError(f"{cron!r} is not a valid five-field cron expression")
        try:
            next_tick(cron, utcnow())
        except (CroniterBadDateError, ValueError):
            raise ScheduleError(f"{cron!r} never fires (no such date)") from None
        traced = self.trace(reference, params)
        values = traced.params
        # Registered now: the workflows page lists a workflow's schedules under it, and a
        # schedule of a workflow never run was on no page until its first tick.
        self.register(traced, project_id)
        now = utcnow()
        try:
            with self.db.session() as session:
                schedule = Schedule(
                    project_id=project_id,
                    name=name,
                    workflow_ref=reference,
                    cron=cron,
                    params=values,
                    next_fire_at=next_tick(cron, now),
                )
                session.add(schedule)
                session.flush()
                return schedule
        except IntegrityError:
            raise ScheduleError(f"a schedule named {name!r} already exists") from None

    def schedules(self, project_id: int) -> list[Schedule]:
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(Schedule)
                    .where(Schedule.project_id == project_id)
                    .order_by(Schedule.name)
                )
            )

    def fire_schedules(self, now: datetime | None = None) -> list[Submitted]:
        """Submit one run per due schedule, for its latest due tick; missed ticks are skipped.

        Safe with any number of schedulers: the unique (schedule, tick) pair lets exactly one
        of them create the run, and the guarded update moves the schedule on once.
        """
        now = now or utcnow()
        with self.db.session() as session:
            due = list(
                session.scalars(
                    select(Schedule).where(Schedule.enabled.is_(True), Schedule.next_fire_at <= now)
                )
            )
        submitted: list[Submitted] = []
        for schedule in due:
            tick = latest_tick(schedule.cron, schedule.next_fire_at, now)
            error = None
            try:
                traced = self.trace(schedule.workflow_ref, schedule.params)
                submitted.append(
                    self.submit(
                        traced,
                        project_id=schedule.project_id,
                        schedule=(schedule.id, tick),
                    )
                )
            except IntegrityError:
                pass  # another scheduler made this tick's run
            except (WorkflowError, ValueError) as exc:
                log.error(
                    "schedule %s cannot submit %s: %s", schedule.name, schedule.workflow_ref, exc
                )
                # Said where its owners look (the API, the workflows page), not only here.
                error = f"{tick:%Y-%m-%d %H:%M} UTC: {exc}"
            with self.db.session() as session:
                session.execute(
                    update(Schedule)
                    .where(
                        Schedule.id == schedule.id, Schedule.next_fire_at == schedule.next_fire_at
                    )
                    .values(next_fire_at=next_tick(schedule.cron, now), last_error=error)
                )
        return submitted

"""Cron schedules: create, change (pause, resume, a new cron or params), delete and list them,
and fire the ones that are due (once each, however many schedulers ask).

A tick's run is stored only while the schedule is, at that moment, as the scheduler read it
(`runs.schedule_unchanged`, locked for share in the run's transaction): a pause, a change or a
delete that has returned is never followed by a run of the schedule as it was.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from ml_platform.sdk import WorkflowError
from ml_platform.service.core import NotFound, Submitted
from ml_platform.service.runs import Runs, ScheduleChanged, Tick
from ml_platform.store.models import Run, Schedule, utcnow

log = logging.getLogger(__name__)


def next_tick(cron: str, after: datetime) -> datetime:
    """The first tick of ``cron`` strictly after ``after`` (UTC)."""
    from croniter import croniter  # here: croniter and dateutil are ≈ 2 MiB of every worker

    tick: datetime = croniter(cron, after).get_next(datetime)
    return tick.astimezone(UTC)


def latest_tick(cron: str, first_due: datetime, now: datetime) -> datetime:
    """The latest tick in ``[first_due, now]`` (``first_due`` is itself a tick, at most
    ``now``): found backwards from ``now``, not walked to from ``first_due`` -- a month of
    missed minutes, a scheduler's pass of 43,200 steps (13 s here) that held up everything
    else it does."""
    from croniter import croniter

    # Ticks fall on whole minutes: the last one before the next minute is the last one by now.
    start = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    previous: datetime = croniter(cron, start).get_prev(datetime).astimezone(UTC)
    return max(first_due, previous)


class ScheduleError(ValueError):
    """A schedule's cron, name, workflow or params are not acceptable."""


#: A schedule's name is a path segment of its own (/schedules/{name}).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _check_cron(cron: str) -> None:
    from croniter import CroniterBadDateError, croniter

    if not croniter.is_valid(cron):
        raise ScheduleError(f"{cron!r} is not a valid five-field cron expression")
    try:
        next_tick(cron, utcnow())
    except (CroniterBadDateError, ValueError):
        raise ScheduleError(f"{cron!r} never fires (no such date)") from None


class Schedules(Runs):
    """Cron schedules that submit runs."""

    def create_schedule(
        self, project_id: int, name: str, reference: str, cron: str, params: Mapping[str, Any]
    ) -> Schedule:
        """A schedule that submits ``reference`` with ``params`` at every cron tick (UTC)."""
        if not NAME.fullmatch(name):
            raise ScheduleError(
                f"schedule name {name!r}: 1-100 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        _check_cron(cron)
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

    def find_schedule(self, project_id: int, name: str) -> Schedule:
        with self.db.session() as session:
            found = session.scalar(
                select(Schedule).where(Schedule.project_id == project_id, Schedule.name == name)
            )
        if found is None:
            raise NotFound(f"no schedule named {name!r}")
        return found

    def change_schedule(
        self,
        project_id: int,
        name: str,
        *,
        enabled: bool | None = None,
        cron: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Schedule:
        """Pause (``enabled=False``) or resume a schedule, or give it a new cron or params
        (checked as at creation). A resumed schedule, or one with a new cron, fires at its
        next tick from now: the ticks it missed while paused are not made up. Once this
        returns, no run of the schedule as it was is stored (see the module's docs)."""
        if cron is not None:
            _check_cron(cron)
        current = self.find_schedule(project_id, name)
        values = None
        if params is not None:
            traced = self.trace(current.workflow_ref, params)
            values = traced.params
            self.register(traced, project_id)
        with self.db.session() as session:
            row = session.scalar(
                select(Schedule)
                .where(Schedule.project_id == project_id, Schedule.name == name)
                .with_for_update()
            )
            if row is None:
                raise NotFound(f"no schedule named {name!r}")
            resumed = enabled is True and not row.enabled
            if enabled is not None:
                row.enabled = enabled
            if values is not None:
                row.params = values
                row.last_error = None
            if cron is not None and cron != row.cron:
                row.cron = cron
                resumed = True
            if resumed:
                row.next_fire_at = next_tick(row.cron, utcnow())
                row.last_error = None
            session.flush()
            return row

    def delete_schedule(self, project_id: int, name: str) -> None:
        """Delete a schedule: it makes no run once this returns. The runs it made stay, with
        the tick they were made for (``scheduled_for``), no longer linked to a schedule."""
        with self.db.session() as session:
            schedule_id = session.scalar(
                select(Schedule.id)
                .where(Schedule.project_id == project_id, Schedule.name == name)
                .with_for_update()
            )
            if schedule_id is None:
                raise NotFound(f"no schedule named {name!r}")
            # Locked first: a tick's run being stored has committed (and is unlinked here), or
            # waits and then finds the schedule gone.
            session.execute(
                update(Run).where(Run.schedule_id == schedule_id).values(schedule_id=None)
            )
            session.execute(delete(Schedule).where(Schedule.id == schedule_id))

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
                        schedule=Tick(schedule.id, tick, due=schedule.next_fire_at),
                    )
                )
            except IntegrityError:
                pass  # another scheduler made this tick's run
            except ScheduleChanged:
                continue  # paused, changed or deleted meanwhile: not moved on from here
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

"""No column indexed alone that another index of its table leads with

task_runs (run_id), attempts (task_run_id), memberships (user_id), workflows (project_id),
schedules (project_id): each led another index of its table -- task_runs (run_id, state) and
(run_id, node_id), attempts (task_run_id, number), memberships (user_id, project_id),
workflows (project_id, name, ...), schedules (project_id, name) -- which serves the same
look-ups, the foreign keys' checks included. Every insert and every update of a row's state
wrote the redundant entry too: on a chain's step (two task runs and an attempt updated, an
attempt made) four index entries, on a 1,000-task submission two thousand.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 03:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_task_runs_run_id", table_name="task_runs")
    op.drop_index("ix_attempts_task_run_id", table_name="attempts")
    op.drop_index("ix_memberships_user_id", table_name="memberships")
    op.drop_index("ix_workflows_project_id", table_name="workflows")
    op.drop_index("ix_schedules_project_id", table_name="schedules")


def downgrade() -> None:
    op.create_index("ix_schedules_project_id", "schedules", ["project_id"])
    op.create_index("ix_workflows_project_id", "workflows", ["project_id"])
    op.create_index("ix_memberships_user_id", "memberships", ["user_id"])
    op.create_index("ix_attempts_task_run_id", "attempts", ["task_run_id"])
    op.create_index("ix_task_runs_run_id", "task_runs", ["run_id"])

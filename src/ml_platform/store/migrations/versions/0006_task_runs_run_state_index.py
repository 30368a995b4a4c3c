"""task_runs (run_id, state) indexed: a run's open tasks found without reading its ended ones

A finish asks whether its run still has open tasks (a fan-in's upstreams, a sink's run): with
only run_id indexed, each such question read the run's ended task runs too, so a fan-out of
n tasks cost O(n²) (10,000 tasks took 30× the time of 1,000).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 17:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_task_runs_run_state", "task_runs", ["run_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_task_runs_run_state", table_name="task_runs")

"""PostgreSQL takes the runs for about twenty rows each, whatever ANALYZE estimates

``ALTER TABLE ... ALTER COLUMN run_id SET (n_distinct = -0.05)`` on task_runs and attempts
(store.models.RUN_ID_DISTINCT). On a young database ANALYZE counts few runs, one of them
large, and PostgreSQL then read a run's task runs by scanning the whole table. A new
database gets the same from the models (create_schema). SQLite: nothing.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 05:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE task_runs ALTER COLUMN run_id SET (n_distinct = -0.05)")
    op.execute("ALTER TABLE attempts ALTER COLUMN run_id SET (n_distinct = -0.05)")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE attempts ALTER COLUMN run_id RESET (n_distinct)")
    op.execute("ALTER TABLE task_runs ALTER COLUMN run_id RESET (n_distinct)")

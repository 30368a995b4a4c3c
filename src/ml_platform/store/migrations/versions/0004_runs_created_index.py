"""runs.created_at indexed: the newest runs of a project without sorting every run

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 06:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_runs_created", "runs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_runs_created", table_name="runs")

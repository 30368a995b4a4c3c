"""schedules.last_error: why a schedule's last tick made no run

A tick whose workflow could not be submitted (its module gone, its params no longer
accepted) was only logged by the scheduler that tried; the API and the workflows page now
say it, until a tick makes a run again.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 13:35:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("schedules") as batch:
        batch.add_column(sa.Column("last_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("schedules") as batch:
        batch.drop_column("last_error")

"""runs.retry_of: the run a retry resumes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 08:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("retry_of", sa.String(length=32), nullable=True))
        batch.create_foreign_key("fk_runs_retry_of_runs", "runs", ["retry_of"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint("fk_runs_retry_of_runs", type_="foreignkey")
        batch.drop_column("retry_of")

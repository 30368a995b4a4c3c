"""log_parts: a running attempt's output, in the pieces its worker shipped

The worker stored a running attempt's whole kept log (up to 1 MiB) into ``attempts.log`` at
every ship (each second): about 1 MB of WAL a second for a task printing 1 KB a second
once its log was full. Each ship now inserts only what was printed since the last; the
pieces are read while the attempt runs and removed once it has ended.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 12:05:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "log_parts",
        sa.Column("attempt_id", sa.Integer(), nullable=False),
        sa.Column("start", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["attempts.id"], name=op.f("fk_log_parts_attempt_id_attempts")
        ),
        sa.PrimaryKeyConstraint("attempt_id", "start", name=op.f("pk_log_parts")),
    )


def downgrade() -> None:
    op.drop_table("log_parts")

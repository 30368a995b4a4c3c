"""attempts.log_start: where the kept log begins in the attempt's whole output

An attempt's ``log`` keeps the last MiB (or so) of what it printed; ``log_start`` is how many
characters came before it. Offsets into a log (`mlp logs -f`, the API, the UI) count from the
start of the whole output, so that a follower neither loses nor repeats output once the log is
longer than what is kept.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 12:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(
            sa.Column("log_start", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
        )


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("log_start")

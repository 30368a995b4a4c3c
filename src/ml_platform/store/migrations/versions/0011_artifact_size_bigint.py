"""artifacts.size as a 64-bit integer: a model checkpoint may well be past 2 GiB

On PostgreSQL a saved file of 2 GiB or more could not be recorded ("integer out of range"):
its task's outcome was refused at the commit.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 12:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.alter_column("size", existing_type=sa.Integer(), type_=sa.BigInteger())


def downgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.alter_column("size", existing_type=sa.BigInteger(), type_=sa.Integer())

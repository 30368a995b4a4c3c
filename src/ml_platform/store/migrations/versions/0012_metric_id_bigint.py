"""metrics.id as a 64-bit integer on PostgreSQL: a point per training step adds up

A task logging a loss point per step (200,000 of them) takes 2**31 ids in ten thousand such
tasks; then every insert of a metric failed ("nextval: reached maximum value"). The column
and its sequence become bigint. SQLite: nothing (its INTEGER PRIMARY KEY is 64-bit).

PostgreSQL rewrites the table under an exclusive lock: 600,000 rows took about a second
here; a table of hundreds of millions, minutes, during which finishes that store metrics
wait. Run it in a quiet hour on a large installation.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 13:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE metrics ALTER COLUMN id TYPE BIGINT")
    op.execute("ALTER SEQUENCE metrics_id_seq AS BIGINT")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER SEQUENCE metrics_id_seq AS INTEGER")
    op.execute("ALTER TABLE metrics ALTER COLUMN id TYPE INTEGER")

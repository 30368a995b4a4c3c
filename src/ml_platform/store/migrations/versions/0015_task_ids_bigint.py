"""Task runs', attempts', params' and artifacts' ids as 64-bit integers on PostgreSQL

Their ids were PostgreSQL's 32-bit integer, taken from sequences that stop at 2**31 - 1.
A platform running 100 tasks a second takes that many attempt ids in 250 days (at the
fan-out's 1,800 a second, in 14): then every submission failed ("nextval: reached maximum
value of sequence"), and a prune does not give ids back. The ids, their sequences and every
column that refers to them become bigint. SQLite: nothing (its INTEGER is 64-bit).

PostgreSQL rewrites each table under an exclusive lock (one rewrite per table): 500,000 task
runs and as many attempts took 4.0 s here; on an installation of many millions of task runs
and metric points, minutes during which nothing is claimed or finished.
Run it in a quiet hour there; a deploy runs migrations before the new release starts.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 16:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Each table's columns that hold such an id (its own, and those referring to one), then the
#: sequences of those ids: one statement per table (one rewrite each).
TO_BIGINT = [
    "ALTER TABLE task_runs ALTER COLUMN id TYPE BIGINT, ALTER COLUMN cached_from TYPE BIGINT",
    "ALTER TABLE attempts ALTER COLUMN id TYPE BIGINT, ALTER COLUMN task_run_id TYPE BIGINT",
    "ALTER TABLE log_parts ALTER COLUMN attempt_id TYPE BIGINT",
    "ALTER TABLE metrics ALTER COLUMN task_run_id TYPE BIGINT",
    "ALTER TABLE metric_series ALTER COLUMN task_run_id TYPE BIGINT",
    "ALTER TABLE params ALTER COLUMN id TYPE BIGINT, ALTER COLUMN task_run_id TYPE BIGINT",
    "ALTER TABLE artifacts ALTER COLUMN id TYPE BIGINT, ALTER COLUMN task_run_id TYPE BIGINT",
    "ALTER SEQUENCE task_runs_id_seq AS BIGINT",
    "ALTER SEQUENCE attempts_id_seq AS BIGINT",
    "ALTER SEQUENCE params_id_seq AS BIGINT",
    "ALTER SEQUENCE artifacts_id_seq AS BIGINT",
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in TO_BIGINT:
            op.execute(statement)


def downgrade() -> None:
    # Fails where an id is past 2**31 - 1 already: as it should.
    if op.get_bind().dialect.name == "postgresql":
        for statement in reversed(TO_BIGINT):
            op.execute(statement.replace("BIGINT", "INTEGER"))

"""Which database errors mean "away for a moment" (503) and which are bugs (500)."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
from psycopg import errors as pg
from sqlalchemy import exc as db_errors

from ml_platform.api.app import _is_away


@pytest.mark.parametrize(
    ("orig", "away"),
    [
        (psycopg.OperationalError("connection failed: Connection refused"), True),
        (pg.AdminShutdown("terminating connection due to administrator command"), True),
        (pg.TooManyConnections("sorry, too many clients already"), True),
        (pg.QueryCanceled("canceling statement due to statement timeout"), True),
        (pg.SerializationFailure("could not serialize access"), True),
        (pg.ProgramLimitExceeded("index row size 9000 exceeds btree maximum"), False),
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("unable to open database file"), True),
        (sqlite3.OperationalError("no such table: runs"), False),
    ],
)
def test_an_error_is_a_dependency_away_only_when_asking_again_can_cure_it(
    orig: Exception, away: bool
) -> None:
    assert _is_away(db_errors.OperationalError("SELECT 1", {}, orig)) is away

# Rule tests for python-security.yml: `semgrep --test security/semgrep` (the semgrep session
# runs them). `ruleid:` marks a line the rule must find, `ok:` one it must leave alone.
# Deliberately insecure samples: never imported, excluded from the scans of our own code.
import hashlib
import os
import pickle
import random
import secrets
import sqlite3
import subprocess

import markupsafe
import sqlalchemy
import yaml
from fastapi.responses import HTMLResponse


def queries(db: sqlite3.Connection, name: str) -> None:
    # ruleid: sql-injection-string-built-query
    db.execute(f"SELECT * FROM users WHERE name = '{name}'")
    # ok: sql-injection-string-built-query
    db.execute("SELECT * FROM users WHERE name = ?", (name,))
    query = "SELECT * FROM users WHERE name = '%s'" % name
    # ruleid: sql-built-then-executed
    db.execute(query)
    built = f"DELETE FROM users WHERE name = '{name}'"
    # ruleid: sql-built-then-executed
    db.executescript(built)
    fixed = "SELECT 1"
    # ok: sql-built-then-executed
    db.execute(fixed)


def pages(name: str) -> object:
    # ruleid: markup-of-a-variable
    banner = markupsafe.Markup(name)
    # ok: markup-of-a-variable
    bold = markupsafe.Markup("<b>{}</b>").format(name)
    # ruleid: xss-unescaped-html-response
    return HTMLResponse(f"<h1>{name}</h1>"), banner, bold


def loads(blob: bytes, text: str) -> object:
    # ruleid: untrusted-deserialization
    a = pickle.loads(blob)
    # ruleid: untrusted-deserialization
    b = yaml.load(text)
    # ruleid: untrusted-deserialization
    c = yaml.load(text, Loader=yaml.Loader)
    # ok: untrusted-deserialization
    d = yaml.load(text, Loader=yaml.SafeLoader)
    # ok: untrusted-deserialization
    e = yaml.safe_load(text)
    return a, b, c, d, e


def new_reset_token() -> str:
    # ruleid: random-for-secrets
    return "".join(random.choice("abcdef0123456789") for _ in range(32))


def shuffle_rows(rows: list[int]) -> list[int]:
    # ok: random-for-secrets
    random.shuffle(rows)
    # ok: random-for-secrets
    session_key = secrets.token_urlsafe(32)
    # ruleid: random-for-secrets
    api_key = str(random.getrandbits(128))
    return rows + [len(session_key), len(api_key)]


def hashes(data: bytes) -> str:
    # ruleid: insecure-hash-for-security
    weak = hashlib.md5(data).hexdigest()
    # ok: insecure-hash-for-security
    sum_ = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return weak + sum_


def run(user: str) -> None:
    # ruleid: command-injection-shell
    subprocess.call("ls " + user, shell=True)
    # ruleid: command-injection-shell
    os.system(user)
    # ok: command-injection-shell
    subprocess.call(["ls", user])


def text_query(name: str) -> object:
    # ruleid: sql-injection-string-built-query
    return sqlalchemy.text(f"SELECT '{name}'")


# ruleid: hardcoded-secret
API_KEY = "sk_live_0123456789abcdef"  # pragma: allowlist secret

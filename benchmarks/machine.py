"""What the figures were measured on: CPU, cores, memory, and the versions of everything."""

from __future__ import annotations

import os
import platform
import shutil

# Asks the installed tools for their versions with fixed argv.
import subprocess  # nosec B404
from importlib import metadata
from pathlib import Path


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return 0.0


def _tool(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    # Fixed argv of a known tool, no shell.
    done = subprocess.run(argv, capture_output=True, text=True, check=False)  # nosec B603
    return (done.stdout or done.stderr).strip().splitlines()[0]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _servers(database_url: str | None, redis_url: str | None) -> dict[str, str]:
    """The versions of the servers the figures came from, as they report them (a binary on
    PATH, such as a wheel's redis-server in the venv, may be another version)."""
    found = {}
    if database_url:
        try:
            import psycopg

            with psycopg.connect(database_url, connect_timeout=5) as conn:
                row = conn.execute("SHOW server_version").fetchone()
            found["postgresql"] = f"PostgreSQL {row[0] if row else '?'} (the server used)"
        except Exception as exc:  # a description, not a gate: say what happened
            found["postgresql"] = f"unknown ({type(exc).__name__})"
    if redis_url:
        try:
            import redis

            info = redis.Redis.from_url(redis_url, socket_timeout=5).info("server")
            found["redis"] = f"Redis {info['redis_version']} (the server used)"
        except Exception as exc:
            found["redis"] = f"unknown ({type(exc).__name__})"
    return found


def describe(database_url: str | None = None, redis_url: str | None = None) -> dict[str, object]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": _tool(["psql", "--version"]),
        "redis": _tool(["redis-server", "--version"]),
        "ml_platform": _version("ml-platform"),
        "sqlalchemy": _version("sqlalchemy"),
        "psycopg": _version("psycopg"),
        "redis_py": _version("redis"),
        "nox": _version("nox"),
        "uv": _tool(["uv", "--version"]),
        **_servers(database_url, redis_url),
    }

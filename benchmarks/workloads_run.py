"""The workloads on every system, alternating, REPETITIONS times."""

from __future__ import annotations

import json
import os
import socket

# Runs the peers' runner with the peers' interpreter and fixed arguments.
import subprocess  # nosec B404
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.engine import make_url

from benchmarks import ours, workloads
from benchmarks.measure import percentile, settle
from benchmarks.sizes import CHAINS_IN_A_ROW, FANOUT_WIDTH, WIDE_WIDTH
from ml_platform.sdk import Workflow

ROOT = Path(__file__).resolve().parent.parent
REPETITIONS = 5
WORKLOADS = ["fanout", "chain", "sleeps"]
#: What each system runs in a repetition, in this order: after the fan-out, CHAINS_IN_A_ROW
#: chains. The first is the goals' ``chain`` (a chain right after a fan-out, as before);
#: all of them are ``chains``, so that the page also shows the chain measured many times on
#: every system alike, beside the single figure of each repetition that this machine's
#: noise moves by ±30 %.
RUN_ORDER = ["fanout", *["chain"] * CHAINS_IN_A_ROW, "sleeps"]
PEERS = ["celery", "dramatiq", "dask", "prefect", "procrastinate", "dbos"]
#: Redis databases the broker peers may flush (the same Redis server as ours).
PEER_REDIS_DB = {
    "celery": 11,
    "dramatiq": 12,
    "dask": 13,
    "prefect": 13,
    "procrastinate": 14,
    "dbos": 15,
}
PEER_PACKAGES = [
    "celery",
    "dramatiq",
    "dask",
    "distributed",
    "prefect",
    "procrastinate",
    "dbos",
    "psycopg",
    "kombu",
    "redis",
]
#: The database a PostgreSQL peer gets (dropped and made again for each of its runs).
PEER_DATABASE = "mlp_bench_peer"


def peers_python() -> str:
    return os.environ.get(
        "BENCH_PEERS_PYTHON", str(ROOT / ".nox" / "bench-peers" / "bin" / "python")
    )


def peer_versions() -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m\n"
        f"print(json.dumps({{p: m.version(p) for p in {PEER_PACKAGES!r}}}))"
    )
    # Fixed argv: the peers' interpreter and a literal program.
    done = subprocess.run(
        [peers_python(), "-c", code], capture_output=True, text=True, check=True
    )  # nosec B603
    versions: dict[str, str] = json.loads(done.stdout)
    return versions


def _peer_redis(redis_url: str, peer: str) -> str:
    parts = urlsplit(redis_url)
    return f"redis://{parts.hostname or '127.0.0.1'}:{parts.port or 6379}/{PEER_REDIS_DB[peer]}"


def _peer_env(peer: str, redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "BENCH_REDIS_URL": _peer_redis(redis_url, peer),
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(ROOT / ".nox" / "bench-peers" / "prefect-home"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }


@contextmanager
def prefect_server(redis_url: str) -> Iterator[tuple[str, int]]:
    """One local Prefect API server for every repetition (its start-up is not the workload)."""
    env = _peer_env("prefect", redis_url)
    port = _free_port()
    # Fixed argv: Prefect's own CLI from the peers' venv.
    server = subprocess.Popen(  # nosec B603
        [
            peers_python(),
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the Prefect server did not start")
            time.sleep(0.5)
        yield url, server.pid
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_peer(
    peer: str, redis_url: str, prefect_url: str | None = None, database_url: str | None = None
) -> dict[str, dict[str, Any]]:
    env = _peer_env(peer, redis_url)
    if prefect_url:
        env["PREFECT_API_URL"] = prefect_url
    if database_url:
        url = make_url(database_url).set(drivername="postgresql", database=PEER_DATABASE)
        env["BENCH_PG_URL"] = url.render_as_string(hide_password=False)
    # Fixed argv: the peers' interpreter running our runner module.
    done = subprocess.run(  # nosec B603
        [peers_python(), "-m", "benchmarks.peers", peer, *RUN_ORDER],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
        check=False,
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or [r.get("workload") for r in records] != RUN_ORDER:
        raise RuntimeError(f"{peer} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return by_workload(records)


def by_workload(records: list[dict[str, Any]]) -> dict[str, Any]:
    """A repetition's records (RUN_ORDER) by workload: one record each, ``chain`` being the
    first chain; and ``chains``, every chain of the repetition (copies: each is summarized
    on its own)."""
    grouped: dict[str, Any] = {}
    chains = [dict(r) for r in records if r["workload"] == "chain"]
    for record in records:
        grouped.setdefault(record["workload"], dict(record))
    grouped["chains"] = chains
    return grouped


def _ours_distributed(database_url: str, redis_url: str) -> dict[str, Any]:
    records = []
    with ours.distributed(database_url, redis_url) as mode:
        mode.run(*ours.WORKLOADS["chain"])  # warm-up, as for the peers
        for workload in RUN_ORDER:
            records.append({"workload": workload, **asdict(mode.run(*ours.WORKLOADS[workload]))})
    return by_workload(records)


def _ours_embedded() -> dict[str, Any]:
    mode = ours.Embedded()
    try:
        mode.run(*ours.WORKLOADS["chain"])
        return by_workload(
            [{"workload": w, **asdict(mode.run(*ours.WORKLOADS[w]))} for w in RUN_ORDER]
        )
    finally:
        mode.close()


def _ours_alternately(
    variants: dict[str, tuple[Workflow, dict[str, Any]]],
    repetitions: int,
    database_url: str,
    redis_url: str,
    progress: Callable[[str], None],
    label: str,
) -> dict[str, dict[str, list[float]]]:
    """Makespans of each variant, run alternately ``repetitions`` times on each of our modes
    (distributed, then embedded), each mode warmed up first."""
    samples: dict[str, dict[str, list[float]]] = {
        system: {name: [] for name in variants}
        for system in ("ml_platform (distributed)", "ml_platform (embedded)")
    }
    with ours.distributed(database_url, redis_url) as mode:
        mode.run(*ours.WORKLOADS["chain"])  # warm-up
        for rep in range(1, repetitions + 1):
            for name, (wf, params) in variants.items():
                figures = mode.run(wf, params, timeout=600)
                samples["ml_platform (distributed)"][name].append(figures.makespan)
            progress(f"{label} rep {rep}/{repetitions} distributed done")
    embedded = ours.Embedded()
    try:
        embedded.run(*ours.WORKLOADS["chain"])  # warm-up
        for rep in range(1, repetitions + 1):
            for name, (wf, params) in variants.items():
                figures = embedded.run(wf, params, timeout=600)
                samples["ml_platform (embedded)"][name].append(figures.makespan)
            progress(f"{label} rep {rep}/{repetitions} embedded done")
    finally:
        embedded.close()
    return samples


def run_map(database_url: str, redis_url: str, progress: Callable[[str], None]) -> dict[str, Any]:
    """The 1,000-wide fan-out declared statically and as `task.map` over a computed list,
    alternating in one run, on both of our modes: what the dynamic expansion costs."""
    variants = {shape: ours.WORKLOADS[shape] for shape in ("fanout", "mapped_fanout")}
    samples = _ours_alternately(variants, REPETITIONS, database_url, redis_url, progress, "map")
    return {"repetitions": REPETITIONS, "samples": samples}


WIDE_REPETITIONS = 3


def run_wide(database_url: str, redis_url: str, progress: Callable[[str], None]) -> dict[str, Any]:
    """The fan-out at FANOUT_WIDTH and ten times as wide, alternating in one run, on both
    of our modes: whether the cost per task stays the same as a run grows."""
    widths = [FANOUT_WIDTH, WIDE_WIDTH]
    variants = {str(width): (workloads.fanout, {"width": width}) for width in widths}
    samples = _ours_alternately(
        variants, WIDE_REPETITIONS, database_url, redis_url, progress, "wide"
    )
    return {"repetitions": WIDE_REPETITIONS, "widths": widths, "samples": samples}


WATCH_WIDTH = 10_000
WATCH_REPETITIONS = 3


def run_watch(progress: Callable[[str], None]) -> dict[str, Any]:
    """`mlp run`'s live view over a 10,000-task fan-out (embedded, the view drawn into a
    buffer as often as `mlp run` draws it): none, the view it draws now (counts by state,
    a few running and failed tasks)."""
    import io

    from rich.console import Console

    from ml_platform import cli

    def drawer(view: Callable[[Any, str], Any]) -> Callable[[Any, str], None]:
        screen = Console(file=io.StringIO(), width=120)

        def draw(platform: Any, run_id: str) -> None:
            screen.print(view(platform, run_id))
            screen.file = io.StringIO()

        return draw

    watchers: dict[str, Callable[[Any, str], None] | None] = {
        "no watcher": None,
        "counts by state": drawer(cli._local_view),
    }
    # The view before (a row per task, re-read and redrawn every 0.2 s) is not run: on a
    # 2,000-task fan-out that takes 5 s unwatched it had not finished after 10 minutes.
    samples: dict[str, list[float]] = {name: [] for name in watchers}
    embedded = ours.Embedded()
    try:
        embedded.run(*ours.WORKLOADS["chain"])
        for rep in range(1, WATCH_REPETITIONS + 1):
            for name, watcher in watchers.items():
                figures = embedded.run(
                    workloads.fanout, {"width": WATCH_WIDTH}, 900, on_progress=watcher
                )
                samples[name].append(figures.makespan)
                progress(f"watch rep {rep}/{WATCH_REPETITIONS} {name}: {figures.makespan:.1f} s")
    finally:
        embedded.close()
    return {"repetitions": WATCH_REPETITIONS, "width": WATCH_WIDTH, "samples": samples}


def run_workloads(
    database_url: str,
    redis_url: str,
    progress: Callable[[str], None],
    peers: list[str] | None = None,
) -> dict[str, Any]:
    systems = ["ml_platform (distributed)", "ml_platform (embedded)", *(peers or PEERS)]
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {w: [] for w in [*WORKLOADS, "chains"]} for s in systems
    }
    with ExitStack() as stack:
        prefect: tuple[str, int] | None = None
        if "prefect" in systems:
            progress("starting a local Prefect API server")
            prefect = stack.enter_context(prefect_server(redis_url))
        _alternate(systems, samples, database_url, redis_url, prefect, progress)
    return {
        "repetitions": REPETITIONS,
        "samples": samples,
        "peer_versions": peer_versions(),
        "python_peers": sys.version.split()[0],
    }


def _alternate(
    systems: list[str],
    samples: dict[str, dict[str, list[dict[str, Any]]]],
    database_url: str,
    redis_url: str,
    prefect: tuple[str, int] | None,
    progress: Callable[[str], None],
) -> None:
    for rep in range(1, REPETITIONS + 1):
        for system in systems:
            if system == "ml_platform (distributed)":
                records = _ours_distributed(database_url, redis_url)
            elif system == "ml_platform (embedded)":
                records = _ours_embedded()
            else:
                records = run_peer(system, redis_url, prefect[0] if prefect else None, database_url)
                if system == "prefect" and prefect:
                    waited = settle(prefect[1])
                    progress(f"waited {waited:.0f} s for the Prefect server to finish recording")
            for workload, kept in records.items():
                for record in kept if workload == "chains" else [kept]:
                    # Keep the starts' percentiles, not every start, in the results file.
                    starts = record.pop("starts")
                    record["p50_start"] = percentile(starts, 0.50)
                    record["p99_start"] = percentile(starts, 0.99)
                    samples[system][workload].append(record)
            progress(
                f"rep {rep}/{REPETITIONS} {system}: "
                + ", ".join(f"{w} {records[w]['makespan']:.2f} s" for w in WORKLOADS)
            )

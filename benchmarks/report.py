"""docs/benchmarks.md and docs/benchmarks.png from the figures in docs/benchmarks.json."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.measure import summary
from benchmarks.sizes import (
    CHAIN_LENGTH,
    FANOUT_WIDTH,
    SLEEP_SECONDS,
    SLEEP_TASKS,
)

OURS = "ml_platform (distributed)"
SLOTS = 2
IDEAL_SLEEPS = SLEEP_TASKS * SLEEP_SECONDS / SLOTS
GOALS = {
    "fanout": ("fan-out/fan-in of 1,000", 1.0, "s"),
    "chain": ("10-step chain, per step", 2.5, "ms"),
    "sleeps": ("1,000 × 10 ms, above the ideal", 0.5, "s"),
}
#: Peak RSS of the 2 workers with their task processes during the fan-out (MiB).
RSS_GOAL = ("peak RSS of the workers and their task processes, fan-out", 200, "MiB")
PERSISTENCE = {
    "ml_platform (distributed)": "every state change committed to PostgreSQL before it is "
    "acknowledged (runs, task runs, attempts, results, logs)",
    "ml_platform (embedded)": "every state change committed to SQLite (WAL, synchronous=NORMAL)",
    "celery": "messages in Redis; results in the Redis result backend (chord needs it); no run "
    "history",
    "dramatiq": "messages in Redis; group barrier in Redis; no results, no run history",
    "dask": "nothing: task state lives in the scheduler's memory",
    "prefect": "flow and task run states through its API into SQLite (a local Prefect server, "
    "started once for the whole benchmark)",
    "procrastinate": "every job a row in PostgreSQL (deferred, started, finished: three "
    "commits), LISTEN/NOTIFY to wake the worker; no DAG (a step defers the next; the "
    "fan-in counts in Redis)",
    "dbos": "every workflow a row in PostgreSQL, its status, inputs and output committed as "
    "it is enqueued, dequeued and ends; its queue polled every 5 ms; no DAG (as "
    "Procrastinate)",
}


def _fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    med, low, high = summary([v * scale for v in values])
    return f"{med:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def _metric(samples: list[dict[str, Any]], workload: str) -> list[float]:
    """The figure a goal is about: seconds, ms per step, or seconds above the ideal."""
    spans = [s["makespan"] for s in samples]
    if workload == "chain":
        return [v * 1000 / CHAIN_LENGTH for v in spans]
    if workload == "sleeps":
        return [v - IDEAL_SLEEPS for v in spans]
    return spans


def _in_order(samples: dict[str, Any]) -> dict[str, Any]:
    """Ours first, then the peers as PERSISTENCE lists them (the results file sorts its keys)."""
    rank = {system: i for i, system in enumerate(PERSISTENCE)}
    return {s: samples[s] for s in sorted(samples, key=lambda s: (rank.get(s, len(rank)), s))}


def _workloads_section(data: dict[str, Any]) -> list[str]:
    samples = _in_order(data["samples"])
    lines = [
        f"## Workloads (measured {data['measured']}; medians of {data['repetitions']}, min–max "
        "in brackets)",
        "",
        "Every system runs on this machine against the same Redis server, in turns: each "
        "repetition runs every system once, each on a warmed-up set of workers. Ours runs "
        "with 2 worker processes of concurrency 1 (distributed: `mlp worker` ×2 on PostgreSQL "
        "+ Redis; embedded: one process on SQLite running 2 task processes); Celery with one "
        "worker of 2 prefork processes; Dramatiq with 2 processes of 1 thread; Dask with a "
        "LocalCluster of 2 worker processes of 1 thread; Prefect with a thread pool of 2 inside "
        "a local flow, against a local Prefect server; Procrastinate with one `procrastinate "
        "worker --concurrency 2` on a PostgreSQL database of its own (the same server as "
        "ours), woken by LISTEN/NOTIFY (its polling interval, 5 s, is the fallback); DBOS "
        "Transact with one process serving a queue of `worker_concurrency=2`, each task a "
        "workflow on it, the queue polled every 5 ms (its default, 1 s, would add up to a "
        "second to each chain step), on a PostgreSQL database of its own. "
        "Submit-to-start is the time from the workflow's submission to each task's start.",
        "",
        f"### Fan-out/fan-in: 1 → {FANOUT_WIDTH:,} → 1",
        "",
        "| system | makespan s | tasks/s | p50 submit-to-start s | p99 submit-to-start s | "
        "peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for system, by_workload in samples.items():
        runs = by_workload["fanout"]
        rate = [r["tasks"] / r["makespan"] for r in runs]
        lines.append(
            f"| {system} | {_fmt([r['makespan'] for r in runs])} | {_fmt(rate, digits=0)} | "
            f"{_fmt([r['p50_start'] for r in runs])} | {_fmt([r['p99_start'] for r in runs])} | "
            f"{_fmt([r['peak_rss'] for r in runs], 1 / 2**20, 0)} |"
        )
    lines += [
        "",
        f"### Chain of {CHAIN_LENGTH} no-op tasks",
        "",
        "The first chain after the fan-out, once a repetition (the goal's figure); and beside "
        "it, where the run measured them, all the chains each repetition ran in a row after "
        "the fan-out, the first included, on every system alike (the median of them all: the "
        "same code measured many times, this machine's noise averaged out).",
        "",
        "| system | end to end ms | per step ms | per step ms, all chains (how many) |",
        "|---|---|---|---|",
    ]
    for system, by_workload in samples.items():
        runs = by_workload["chain"]
        every = by_workload.get("chains") or []
        in_a_row = f"{_fmt(_metric(every, 'chain'), digits=2)} ({len(every)})" if every else "—"
        lines.append(
            f"| {system} | {_fmt([r['makespan'] for r in runs], 1000, 1)} | "
            f"{_fmt(_metric(runs, 'chain'), digits=2)} | {in_a_row} |"
        )
    lines += [
        "",
        f"### {SLEEP_TASKS:,} tasks of {SLEEP_SECONDS * 1000:.0f} ms on {SLOTS} slots "
        f"(ideal {IDEAL_SLEEPS:.1f} s)",
        "",
        "| system | makespan s | above the ideal s | overhead share of the work |",
        "|---|---|---|---|",
    ]
    for system, by_workload in samples.items():
        runs = by_workload["sleeps"]
        above = _metric(runs, "sleeps")
        share = [a / IDEAL_SLEEPS * 100 for a in above]
        lines.append(
            f"| {system} | {_fmt([r['makespan'] for r in runs])} | {_fmt(above)} | "
            f"{statistics.median(share):.0f} % |"
        )
    prefect = samples.get("prefect")
    if prefect:
        flows = [r.get("flow_seconds", 0.0) for r in prefect["fanout"]]
        lines += [
            "",
            f"Prefect's figures are taken inside the flow; the whole fan-out flow, its states "
            f"saved, took {_fmt(flows)} s.",
        ]
    lines += ["", "### What each system keeps", "", "| system | persisted |", "|---|---|"]
    lines += [f"| {s} | {PERSISTENCE.get(s, '?')} |" for s in samples]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(data["peer_versions"].items()))
    lines += ["", f"Peer versions: {versions}.", ""]
    return lines


class GoalRow(NamedTuple):
    label: str
    goal: float
    measured: float
    unit: str
    #: The peer with the best median on the same workload, and that median (None: the goal
    #: is not against the peers, or none ran it).
    best_peer: tuple[str, float] | None
    met: bool

    def target(self) -> str:
        return f"≤ {self.goal} {self.unit}" + (" and below every peer" if self.best_peer else "")

    def figure(self) -> str:
        figure = f"{self.measured:.2f} {self.unit}"
        if self.best_peer is not None:
            peer, best = self.best_peer
            figure += f" (best peer: {peer} {best:.2f})"
        return figure


def goal_rows(data: dict[str, Any]) -> list[GoalRow]:
    """Each goal judged on the medians of one run: its bound, and for the workloads (the
    issue's "faster than every peer"), the best peer's median on the same workload."""
    rows = []
    samples = data["samples"]
    peers = [system for system in samples if not system.startswith("ml_platform")]
    for workload, (label, goal, unit) in GOALS.items():
        measured = statistics.median(_metric(samples[OURS][workload], workload))
        medians = {
            peer: statistics.median(_metric(samples[peer][workload], workload))
            for peer in peers
            if samples[peer].get(workload)
        }
        best = min(medians.items(), key=lambda item: item[1]) if medians else None
        met = measured <= goal and (best is None or measured < best[1])
        rows.append(GoalRow(label, goal, measured, unit, best, met))
    label, goal, unit = RSS_GOAL
    peak = statistics.median(r["peak_rss"] / 2**20 for r in samples[OURS]["fanout"])
    rows.append(GoalRow(label, goal, peak, unit, None, peak <= goal))
    return rows


def _map_section(data: dict[str, Any]) -> tuple[list[str], str]:
    """Static fan-out against `task.map` over a computed list, measured in the same run."""
    lines = [
        f"## Dynamic fan-out (measured {data['measured']}; medians of {data['repetitions']}, "
        "min–max)",
        "",
        f"1 → {FANOUT_WIDTH:,} no-op tasks → 1, declared two ways and run alternately: a "
        "comprehension over a known range (the fan-out above) and `after.map(count_to(n))`, "
        "whose elements exist only once `count_to` has run.",
        "",
        "| mode | static s | `task.map` s | map / static |",
        "|---|---|---|---|",
    ]
    verdict = []
    for system, shapes in data["samples"].items():
        static, mapped = shapes["fanout"], shapes["mapped_fanout"]
        ratio = statistics.median(mapped) / statistics.median(static)
        lines.append(f"| {system} | {_fmt(static)} | {_fmt(mapped)} | {ratio:.2f} |")
        verdict.append(f"{system.split('(')[1].rstrip(')')} {ratio:.2f}")
    return [*lines, ""], "map/static: " + ", ".join(verdict)


#: The wide fan-out may cost at most this many times the 1,000-wide one (10× the tasks).
WIDE_GOAL = 11.0


def _wide_section(data: dict[str, Any]) -> tuple[list[str], str]:
    """The fan-out at 1,000 and 10,000 in the same run: does the cost grow linearly?"""
    narrow, wide = (str(width) for width in data["widths"])
    lines = [
        f"## A ten times wider fan-out (measured {data['measured']}; medians of "
        f"{data['repetitions']}, min–max)",
        "",
        f"1 → {int(narrow):,} and 1 → {int(wide):,} no-op tasks → 1, alternately, on both of "
        f"our modes (2 slots). Goal: the wide one costs ≤ {WIDE_GOAL:g}× the narrow one "
        "(ten times the tasks: the cost per task must not grow with the run).",
        "",
        f"| mode | {int(narrow):,} s | {int(wide):,} s | ratio | |",
        "|---|---|---|---|---|",
    ]
    verdict = []
    for system, widths in data["samples"].items():
        ratio = statistics.median(widths[wide]) / statistics.median(widths[narrow])
        met = ratio <= WIDE_GOAL
        lines.append(
            f"| {system} | {_fmt(widths[narrow])} | {_fmt(widths[wide])} | {ratio:.1f}× | "
            f"{'met' if met else '**not met**'} |"
        )
        mode = system.split("(")[1].rstrip(")")
        verdict.append(f"{mode} {ratio:.1f}× ({'met' if met else 'not met'})")
    return [*lines, ""], f"{int(wide):,}-wide fan-out: " + ", ".join(verdict)


def _transport_section(data: dict[str, Any]) -> tuple[list[str], str]:
    """What a task's dispatch costs through each transport, beside a claim's transaction."""
    redis_path = data["redis_hop"] + data["claim_by_id"]
    postgres_path = data["notify_wakeup"] + data["skip_locked_claim"]
    lines = [
        f"## Dispatch: Redis Streams or LISTEN/NOTIFY (measured {data['measured']}; medians of "
        f"{data['rounds']:,} sequential operations, µs)",
        "",
        "| step | µs |",
        "|---|---|",
        f"| Redis: XADD, XREADGROUP, XACK + XDEL of one entry | {data['redis_hop']:.0f} |",
        f"| Redis: the same, 100 entries pipelined, per entry | {data['redis_hop_batched']:.0f} |",
        f"| PostgreSQL: claim of a delivered id (guarded UPDATE, its transaction) "
        f"| {data['claim_by_id']:.0f} |",
        f"| PostgreSQL: NOTIFY committed → a LISTENing connection has it "
        f"| {data['notify_wakeup']:.0f} |",
        f"| PostgreSQL: claim of the oldest queued row (`FOR UPDATE SKIP LOCKED`, its "
        f"transaction) | {data['skip_locked_claim']:.0f} |",
        f"| PostgreSQL: an empty transaction (the floor under any claim) | {data['commit']:.0f} |",
        "",
        f"Per task, one at a time: Redis hop + claim by id **{redis_path:.0f} µs**; NOTIFY "
        f"wake-up + SKIP LOCKED claim **{postgres_path:.0f} µs**. Either is a small share of "
        "the several milliseconds of database work a task's finish and claim cost (see the "
        "workloads above and docs/benchmarks-analysis.md).",
        "",
    ]
    return (
        lines,
        f"dispatch per task: Redis {redis_path:.0f} µs, LISTEN/NOTIFY {postgres_path:.0f} µs",
    )


WATCH_GOAL = 1.5


def _watch_section(data: dict[str, Any]) -> tuple[list[str], str]:
    """`mlp run`'s live view against no view, over one large fan-out, in the same run."""
    samples = data["samples"]
    bare = statistics.median(samples["no watcher"])
    lines = [
        f"## `mlp run` watching a large run (measured {data['measured']}; medians of "
        f"{data['repetitions']}, min–max)",
        "",
        f"Embedded, 1 → {data['width']:,} no-op tasks → 1; the live view drawn into a buffer "
        "as often as `mlp run` draws it (every 0.2 s, in the thread that drives the run). "
        f"Goal: with the view, ≤ {WATCH_GOAL}× the run without one.",
        "",
        "| view | makespan s | × no view |",
        "|---|---|---|",
    ]
    verdict = ""
    for name, values in samples.items():
        ratio = statistics.median(values) / bare
        mark = ""
        if name != "no watcher":
            met = ratio <= WATCH_GOAL
            mark = " (met)" if met else " (**not met**)"
            verdict = f"watched run {ratio:.2f}× ({'met' if met else 'not met'})"
        lines.append(f"| {name} | {_fmt(values, digits=1)} | {ratio:.2f}{mark} |")
    return [*lines, ""], verdict


def _crash_section(data: dict[str, Any]) -> list[str]:
    rounds = data["rounds"]
    recovery = [r["recovery"] for r in rounds]
    return [
        f"## Crash benchmark (measured {data['measured']})",
        "",
        f"`kill -9` of the worker running a {data['task_seconds']:.0f} s task, "
        f"{data['kill_after_seconds']:g} s into it, {len(rounds)} times (lease "
        f"{data['lease_seconds']:g} s for this benchmark; the default is 30 s, and the time "
        "to run again follows the lease, plus the lost attempts' backoff of 1 s "
        "(`MLP_LOST_BACKOFF_SECONDS`) since 2026-12-03).",
        "",
        "| rounds | ran again after s (median, min–max) | duplicates started | "
        "duplicates committed | tasks lost |",
        "|---|---|---|---|---|",
        f"| {len(rounds)} | {_fmt(recovery)} | {sum(r['duplicates_started'] for r in rounds)} | "
        f"{sum(r['duplicates_committed'] for r in rounds)} | {sum(r['lost'] for r in rounds)} |",
        "",
        *_storm_lines(data),
    ]


def _storm_lines(data: dict[str, Any]) -> list[str]:
    if "storms" not in data:
        return []
    lines = [
        f"Storms: {data['storm_tasks']} plain {data['storm_task_seconds']:g} s tasks (default "
        "`retries=0`) on 2 workers of 2 slots; a busy worker `kill -9`ed at random moments and "
        "replaced. Lost attempts are retried on their own budget (`MLP_MAX_LOST`, default 3), "
        "never the task's retries.",
        "",
        "| task processes | kills | run | tasks succeeded | lost attempts | results committed "
        "twice | task bodies running after their worker died | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for storm in data["storms"]:
        lines.append(
            f"| {storm['label']} | {storm['kills']} | {storm['run_state']} | "
            f"{storm['succeeded']} of {storm['tasks']} | {storm['lost_attempts']} | "
            f"{storm['duplicates_committed']} | {storm['bodies_after_death']} | "
            f"{storm['seconds']:.1f} |"
        )
    startup = data["startup_kills"]
    lines += [
        "",
        f"Start-up kills: a worker with a fresh task process per attempt, `kill -9`ed the moment "
        f"its claim was committed, {startup['rounds']} times ({startup['during_startup']} of them "
        f"before the task body had started): **{startup['orphans']} task processes left**.",
        "",
    ]
    return lines


#: Request kind → (what it is, p95 goal in ms or None).
SCALE_GOALS: dict[str, tuple[str, float | None]] = {
    "runs_page": ("API: the newest 50 runs of the project", 50),
    "runs_page_filtered": ("API: the newest 50 failed runs", 50),
    "run": ("API: one run (an old one and the newest)", 100),
    "run_tasks": ("API: a run's 10 tasks with their attempts", 100),
    "ui_runs": ("UI: the runs page", None),
    "ui_run": ("UI: a run's page (DAG, timeline, metrics)", 100),
    "metrics": ("`/metrics` (after the first scrape of a process)", 100),
}


def _scale_section(data: dict[str, Any]) -> tuple[list[str], int]:
    """The read side at scale: a table of latencies with their goals, and how many were met."""
    lines = [
        f"## At scale (measured {data['measured']})",
        "",
        f"A database of {data['runs']:,} runs, {data['task_runs']:,} task runs and "
        f"{data['attempts']:,} attempts (made by PostgreSQL in {data['seed_seconds']:.0f} s), "
        f"read through a real `mlp server`; each request {data['repeat']} times after one "
        "to warm up.",
        "",
        "| request | p50 ms | p95 ms | max ms | goal (p95) | |",
        "|---|---|---|---|---|---|",
    ]
    met = 0
    for kind, (label, goal) in SCALE_GOALS.items():
        figures = data["requests"].get(kind)
        if figures is None:
            continue
        verdict = ""
        if goal is not None:
            ok = figures["p95_ms"] <= goal
            met += ok
            verdict = "met" if ok else "**not met**"
        lines.append(
            f"| {label} | {figures['p50_ms']:.1f} | {figures['p95_ms']:.1f} | "
            f"{figures['max_ms']:.1f} | {f'≤ {goal:.0f} ms' if goal else '—'} | {verdict} |"
        )
    return [*lines, ""], met


IMAGE_GOAL_MB = 300


def _image_section(data: dict[str, Any]) -> tuple[list[str], bool]:
    """The image's size, the base's and ours, with the biggest packages ours brings."""
    image_mb = data["image_bytes"] / 1e6
    ours_mb = (data["image_bytes"] - data["base_bytes"]) / 1e6
    met = image_mb <= IMAGE_GOAL_MB
    verdict = "met" if met else "**not met**"
    lines = [
        f"## The image (measured {data['measured']})",
        "",
        "The Dockerfile built by `nox -s image_e2e`'s build (`nox -s bench -- image`) on the "
        "local stand-in for python:3.11-slim-bookworm (Debian bookworm slimmed as "
        "debian:bookworm-slim is, plus Debian's Python 3.11 and pip).",
        "",
        "| | MB |",
        "|---|---|",
        f"| the image | {image_mb:.0f} (goal ≤ {IMAGE_GOAL_MB}: {verdict}) |",
        f"| the base | {data['base_bytes'] / 1e6:.0f} |",
        f"| ours (the virtual environment) | {ours_mb:.0f} |",
    ]
    lines += [f"| — {name} | {size / 1e6:.1f} |" for name, size in data["largest"]]
    return [*lines, ""], met


#: The tests session's goals (issue 15), cold and warm, in seconds of wall time.
TESTS_GOALS = {"cold": 120.0, "warm": 90.0}


def _tests_rows(data: dict[str, Any]) -> list[str]:
    """The tests session's rows of the pipeline table: wall seconds cold and warm against
    their goals, then (where measured) the CPU seconds of its processes and the warm run
    without coverage, with the least wall time that CPU allows on the machine's cores."""
    tests = data["tests"]
    when = data.get("tests_measured", data["measured"])
    verdicts = {
        kind: "met" if summary(tests[kind])[0] <= goal else "**not met**"
        for kind, goal in TESTS_GOALS.items()
    }
    lines = [
        f"| `nox -s tests` (measured {when}) | {_fmt(tests['cold'], digits=0)} (goal ≤ "
        f"{TESTS_GOALS['cold']:.0f}: {verdicts['cold']}) | {_fmt(tests['warm'], digits=0)} "
        f"(goal ≤ {TESTS_GOALS['warm']:.0f}: {verdicts['warm']}) |"
    ]
    if "warm_cpu" not in tests:
        return lines
    cores = (data.get("machine") or {}).get("cores") or 1
    floor = summary(tests["warm_cpu"])[0] / cores
    bare_floor = summary(tests["warm_no_coverage_cpu"])[0] / cores
    lines += [
        f"| — CPU of its processes, s | {_fmt(tests['cold_cpu'], digits=0)} | "
        f"{_fmt(tests['warm_cpu'], digits=0)} (over {cores} cores: ≥ {floor:.0f} s of wall) |",
        f"| — warm without coverage (`-- --no-cov`): wall s, CPU s | | "
        f"{_fmt(tests['warm_no_coverage'], digits=0)}, "
        f"{_fmt(tests['warm_no_coverage_cpu'], digits=0)} (≥ {bare_floor:.0f} s of wall) |",
    ]
    return lines


def _pipeline_section(data: dict[str, Any]) -> list[str]:
    lines = [
        f"## The pipeline's speed (measured {data['measured']}; medians, min–max)",
        "",
        "| what | cold s | warm s |",
        "|---|---|---|",
        f"| `nox -t quality` | {_fmt(data['quality']['cold'], digits=1)} | "
        f"{_fmt(data['quality']['warm'], digits=1)} |",
    ]
    if "tests" in data:
        lines += _tests_rows(data)
    else:
        lines.append("| `nox -s tests` | not measured: `nox -s bench -- pipeline-tests` | |")
    if "cli" in data:
        goals = {"mlp --help": 0.3, "mlp --version": 0.3}
        lines += [
            "",
            "How long `mlp` takes to answer (medians, min–max):",
            "",
            "| command | seconds | goal |",
            "|---|---|---|",
        ]
        for name, values in data["cli"].items():
            goal = goals.get(name, 0.8 if name.startswith("mlp runs") else None)
            verdict = ""
            if goal is not None:
                met = statistics.median(values) <= goal
                verdict = f"≤ {goal} s: {'met' if met else '**not met**'}"
            lines.append(f"| `{name}` | {_fmt(values)} | {verdict} |")
    lines += [
        "",
        "Session creation (`nox -s lint --install-only` into a fresh envdir):",
        "",
        "| backend | seconds |",
        "|---|---|",
        f"| uv | {_fmt(data['create_uv'], digits=1)} |",
        f"| virtualenv | {_fmt(data['create_virtualenv'], digits=1)} |",
        "",
    ]
    return lines


def _machine(results: dict[str, Any]) -> list[str]:
    any_section = next(iter(results.values()))
    m = any_section["machine"]
    return [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; Python "
        f"{m['python']}; {m['postgresql']}; {m['redis']}; ml_platform {m['ml_platform']}, "
        f"SQLAlchemy {m['sqlalchemy']}, psycopg {m['psycopg']}, redis-py {m['redis_py']}, "
        f"nox {m['nox']}, {m['uv']}.",
        "",
    ]


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = _in_order(results["workloads"]["samples"])
    systems = list(samples)
    panels: list[tuple[str, str, Callable[[list[dict[str, Any]]], list[float]]]] = [
        (
            "fanout",
            "fan-out 1,000: tasks/s (higher is better)",
            lambda rs: [r["tasks"] / r["makespan"] for r in rs],
        ),
        ("chain", "chain: ms per step (lower is better)", lambda rs: _metric(rs, "chain")),
        (
            "sleeps",
            "1,000 × 10 ms: s above ideal (lower is better)",
            lambda rs: _metric(rs, "sleeps"),
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (workload, title, metric) in zip(axes, panels, strict=True):
        values = [statistics.median(metric(samples[s][workload])) for s in systems]
        colors = ["#2b7bba" if s.startswith("ml_platform") else "#9aa5b1" for s in systems]
        ax.barh(systems, values, color=colors)
        goal = GOALS[workload][1]
        ax.axvline(
            goal if workload != "fanout" else FANOUT_WIDTH / goal,
            color="#c0392b",
            linestyle="--",
            label="goal",
        )
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"Medians of {results['workloads']['repetitions']} repetitions, "
        f"measured {results['workloads']['measured']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], docs: Path) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `uv run nox -s bench` (sections: `nox -s bench -- workloads map wide "
        "transport watch crash scale pipeline pipeline-tests image`) from "
        "`docs/benchmarks.json`; do not edit by hand.",
        "",
        *_machine(results),
    ]
    verdicts = []
    if "workloads" in results:
        lines += [
            "![benchmark chart](benchmarks.png)",
            "",
            "## Goals",
            "",
            "| goal | target | measured (median) | |",
            "|---|---|---|---|",
        ]
        for row in goal_rows(results["workloads"]):
            lines.append(
                f"| {row.label} | {row.target()} | {row.figure()} | "
                f"{'met' if row.met else '**not met**'} |"
            )
            verdicts.append(f"{row.label} {row.figure()} ({'met' if row.met else 'not met'})")
        lines.append("")
        lines += _workloads_section(results["workloads"])
        chart(results, docs / "benchmarks.png")
    if "map" in results:
        section, map_verdict = _map_section(results["map"])
        lines += section
        verdicts.append(map_verdict)
    if "wide" in results:
        section, wide_verdict = _wide_section(results["wide"])
        lines += section
        verdicts.append(wide_verdict)
    if "transport" in results:
        section, transport_verdict = _transport_section(results["transport"])
        lines += section
        verdicts.append(transport_verdict)
    if "watch" in results:
        section, watch_verdict = _watch_section(results["watch"])
        lines += section
        verdicts.append(watch_verdict)
    if "crash" in results:
        lines += _crash_section(results["crash"])
        rounds = results["crash"]["rounds"]
        verdicts.append(
            f"crash: {sum(r['lost'] for r in rounds)} lost, "
            f"{sum(r['duplicates_committed'] for r in rounds)} double-committed"
        )
        for storm in results["crash"].get("storms", []):
            verdicts.append(
                f"storm ({storm['label']}): {storm['succeeded']}/{storm['tasks']} succeeded, "
                f"{storm['bodies_after_death']} bodies after death"
            )
        if "startup_kills" in results["crash"]:
            verdicts.append(
                f"start-up kills: {results['crash']['startup_kills']['orphans']} orphans"
            )
    if "scale" in results:
        section, scale_met = _scale_section(results["scale"])
        lines += section
        goals = sum(goal is not None for _, goal in SCALE_GOALS.values())
        verdicts.append(f"scale: {scale_met} of {goals} latency goals met")
    if "pipeline" in results:
        lines += _pipeline_section(results["pipeline"])
    if "image" in results:
        section, image_met = _image_section(results["image"])
        lines += section
        verdicts.append(
            f"image {results['image']['image_bytes'] / 1e6:.0f} MB "
            f"({'met' if image_met else 'not met'})"
        )
    notes = docs / "benchmarks-analysis.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    (docs / "benchmarks.md").write_text("\n".join(lines))
    return "; ".join(verdicts) or "nothing measured"

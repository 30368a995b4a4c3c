"""The benchmark's own arithmetic and report, on figures in the results file's format."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import pipeline, report
from benchmarks.crash import Round, _ends_after
from benchmarks.measure import (
    cpu_seconds_of_tree,
    percentile,
    rss_of_tree,
    settle,
    summary,
)
from benchmarks.ours import Embedded, _wait_for_ready


def test_percentiles_use_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert summary([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_memory_of_a_process_tree_includes_its_children() -> None:
    alone = rss_of_tree(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert rss_of_tree(os.getpid()) > alone
        assert rss_of_tree(child.pid) > 0
    finally:
        child.kill()
        child.wait()
    assert rss_of_tree(child.pid) == 0  # gone: counts nothing


def test_a_crash_round_counts_duplicates_and_losses() -> None:
    clean = Round(recovery=2.4, executions=2, succeeded_attempts=1, run_state="succeeded")
    assert (clean.duplicates_started, clean.duplicates_committed, clean.lost) == (0, 0, 0)
    bad = Round(recovery=2.4, executions=3, succeeded_attempts=2, run_state="failed")
    assert (bad.duplicates_started, bad.duplicates_committed, bad.lost) == (1, 1, 1)


def _run(makespan: float, tasks: int) -> dict[str, float]:
    return {
        "makespan": makespan,
        "tasks": tasks,
        "p50_start": 0.5,
        "p99_start": 0.9,
        "peak_rss": 300 * 2**20,
    }


def _results(fanout: float, chain: float, sleeps: float) -> dict[str, object]:
    systems = {
        report.OURS: {
            "fanout": [_run(fanout, 1002), _run(fanout + 0.2, 1002), _run(fanout - 0.1, 1002)],
            "chain": [_run(chain, 10)] * 3,
            "sleeps": [_run(sleeps, 1000)] * 3,
        },
        "celery": {
            "fanout": [_run(3.4, 1002)],
            "chain": [_run(0.028, 10)],
            "sleeps": [_run(5.82, 1000)],
        },
    }
    return {
        "measured": "2026-11-26 12:00 UTC",
        "repetitions": 3,
        "samples": systems,
        "peer_versions": {"celery": "5.7.0"},
    }


def test_goals_are_judged_on_the_medians() -> None:
    rows = {
        row.label: (row.measured, row.met)
        for row in report.goal_rows(_results(fanout=0.9, chain=0.020, sleeps=5.3))
    }
    assert rows["fan-out/fan-in of 1,000"][0] == pytest.approx(0.9)
    assert rows["10-step chain, per step"][0] == pytest.approx(2.0)
    assert rows["1,000 × 10 ms, above the ideal"][0] == pytest.approx(0.3)
    rss = "peak RSS of the workers and their task processes, fan-out"
    assert rows[rss][0] == pytest.approx(300.0) and not rows[rss][1]  # median peak, MiB
    assert all(met for label, (_, met) in rows.items() if label != rss)
    slow = {
        row.label: row.met for row in report.goal_rows(_results(fanout=8.0, chain=0.1, sleeps=7.0))
    }
    assert not any(slow.values())


def test_a_workload_goal_is_not_met_when_a_peer_is_faster_even_within_its_bound() -> None:
    """The issue's goals are a bound and "faster than every peer": a peer's median below ours
    fails the goal however far within the bound ours is, and the page names that peer."""
    results = _results(fanout=0.9, chain=0.020, sleeps=5.3)
    samples = results["samples"]
    assert isinstance(samples, dict)
    samples["dask"] = {
        "fanout": [_run(0.7, 1002), _run(0.8, 1002), _run(1.9, 1002)],  # median 0.8 < 0.9
        "chain": [_run(0.080, 10)],
        "sleeps": [_run(5.6, 1000)],
    }
    rows = {row.label: row for row in report.goal_rows(results)}
    fanout = rows["fan-out/fan-in of 1,000"]
    assert not fanout.met and fanout.best_peer is not None
    assert fanout.best_peer[0] == "dask" and fanout.best_peer[1] == pytest.approx(0.8)
    assert fanout.target() == "≤ 1.0 s and below every peer"
    assert fanout.figure() == "0.90 s (best peer: dask 0.80)"
    chain = rows["10-step chain, per step"]
    assert chain.met and chain.best_peer is not None  # ours 2.0 ms, celery's 2.8
    assert chain.best_peer[0] == "celery" and chain.best_peer[1] == pytest.approx(2.8)


def test_the_workload_tables_show_every_system_with_medians_and_ranges() -> None:
    text = "\n".join(report._workloads_section(_results(fanout=2.0, chain=0.05, sleeps=6.0)))
    assert "| ml_platform (distributed) | 2.00 (1.90–2.20) | 501 (455–527) |" in text
    assert "| celery | 0.03 (0.03–0.03)" not in text  # the chain table is in ms
    assert "| celery | 28.0 (28.0–28.0) | 2.80 (2.80–2.80) | — |" in text
    assert "| celery | 5.82 (5.82–5.82) | 0.82 (0.82–0.82) | 16 % |" in text
    assert "committed to PostgreSQL" in text


def test_the_chain_table_shows_the_chains_run_in_a_row_beside_the_goals_figure() -> None:
    """The goal is judged on the first chain after each fan-out; the chains each repetition
    ran in a row are shown beside it, with how many, and change no goal."""
    results = _results(fanout=0.9, chain=0.030, sleeps=5.3)
    samples = results["samples"]
    assert isinstance(samples, dict)
    samples[report.OURS]["chains"] = [_run(0.030, 10), *[_run(0.015, 10)] * 4]
    samples["celery"]["chains"] = [_run(0.028, 10), _run(0.018, 10)]

    text = "\n".join(report._workloads_section(results))
    rows = {row.label: row for row in report.goal_rows(results)}

    assert "| 3.00 (3.00–3.00) | 1.50 (1.50–3.00) (5) |" in text
    assert "| celery | 28.0 (28.0–28.0) | 2.80 (2.80–2.80) | 2.30 (1.80–2.80) (2) |" in text
    chain = rows["10-step chain, per step"]
    assert chain.measured == pytest.approx(3.0) and not chain.met


def test_a_repetitions_records_are_grouped_with_its_first_chain_and_all_its_chains() -> None:
    from benchmarks.workloads_run import RUN_ORDER, by_workload

    records = [{"workload": w, "makespan": float(i)} for i, w in enumerate(RUN_ORDER)]

    grouped = by_workload(records)

    assert grouped["fanout"]["makespan"] == 0.0 and grouped["chain"]["makespan"] == 1.0
    assert [r["makespan"] for r in grouped["chains"]] == [float(i) for i in range(1, 9)]
    assert grouped["sleeps"]["makespan"] == 9.0
    assert grouped["chain"] is not grouped["chains"][0]  # each summarized on its own


def test_the_tables_list_ours_first_whatever_order_the_results_file_keeps() -> None:
    results = _results(fanout=2.0, chain=0.05, sleeps=6.0)
    samples = results["samples"]
    assert isinstance(samples, dict)
    results["samples"] = dict(sorted(samples.items()))  # as json's sort_keys leaves them
    rows = [line for line in report._workloads_section(results) if line.startswith("| ")]
    systems = [row.split(" | ")[0][2:] for row in rows if "---" not in row]
    # Each table: its header, then ours, then the peer.
    assert systems[:3] == ["system", "ml_platform (distributed)", "celery"], systems


#: Busy for 2.5 s at a fifth of a core or more (20 ms of CPU, then 80 ms asleep), well
#: above what settle() calls quiet (5 %), without taking a whole core from the other tests.
BUSY_FOR_A_WHILE = """
import time
began = time.time()
while time.time() - began < 2.5:
    spun = time.process_time()
    while time.process_time() - spun < 0.02:
        pass
    time.sleep(0.08)
"""


def test_settling_waits_for_a_busy_process_tree_to_go_quiet() -> None:
    assert cpu_seconds_of_tree(os.getpid()) > 0
    busy = subprocess.Popen([sys.executable, "-c", BUSY_FOR_A_WHILE])
    try:
        waited = settle(busy.pid, timeout=10)
        assert 2.0 <= waited <= 6.0  # busy for 2.5 s, then gone (or idle)
    finally:
        busy.kill()
        busy.wait()


def test_the_crash_section_reports_storms_and_start_up_kills() -> None:
    storm = {
        "label": "a fresh process per attempt",
        "tasks": 40,
        "succeeded": 40,
        "run_state": "succeeded",
        "kills": 5,
        "lost_attempts": 7,
        "duplicates_committed": 0,
        "bodies_after_death": 0,
        "seconds": 21.04,
    }
    data = {
        "measured": "2026-12-03 12:00 UTC",
        "rounds": [
            {"recovery": 2.2, "duplicates_started": 0, "duplicates_committed": 0, "lost": 0}
        ],
        "storms": [storm],
        "startup_kills": {"rounds": 20, "orphans": 0, "during_startup": 17},
        "storm_tasks": 40,
        "storm_task_seconds": 1.0,
        "lease_seconds": 2.0,
        "kill_after_seconds": 0.5,
        "task_seconds": 5.0,
    }
    text = "\n".join(report._crash_section(data))
    assert "| a fresh process per attempt | 5 | succeeded | 40 of 40 | 7 | 0 | 0 | 21.0 |" in text
    assert "20 times (17 of them before the task body had started)" in text
    assert "**0 task processes left**" in text


def test_late_body_ends_of_killed_workers_are_counted(tmp_path: Path) -> None:
    (tmp_path / "task-0.txt").write_text("start 11 100.0\nend 11 101.0\n")
    (tmp_path / "task-1.txt").write_text("start 12 100.0\nend 12 99.0\nstart 13 102.0\n")
    assert _ends_after(tmp_path, {11, 12, 13}, moment=100.5) == {11}
    assert _ends_after(tmp_path, {12}, moment=100.5) == set()


def test_the_scale_section_judges_each_request_by_its_p95() -> None:
    from benchmarks.report import _scale_section

    figures = {"p50_ms": 10.0, "p95_ms": 40.0, "max_ms": 90.0}
    slow = {"p50_ms": 300.0, "p95_ms": 350.0, "max_ms": 510.0}
    data = {
        "measured": "2026-12-04 06:30 UTC",
        "runs": 100_000,
        "task_runs": 1_000_000,
        "attempts": 1_000_000,
        "seed_seconds": 38.7,
        "repeat": 60,
        "requests": {"runs_page": figures, "metrics": slow, "ui_runs": figures},
    }
    lines, met = _scale_section(data)
    text = "\n".join(lines)
    assert met == 1  # the runs page; /metrics misses; the UI runs page has no goal
    assert "| API: the newest 50 runs of the project | 10.0 | 40.0 | 90.0 | ≤ 50 ms | met |" in text
    assert "| 300.0 | 350.0 | 510.0 | ≤ 100 ms | **not met** |" in text
    assert "100,000 runs, 1,000,000 task runs" in text


def test_the_image_section_splits_the_image_into_base_and_ours_and_judges_the_goal() -> None:
    from benchmarks.report import _image_section

    data = {
        "measured": "2026-12-04 08:18 UTC",
        "image_bytes": 250_000_000,
        "base_bytes": 155_000_000,
        "largest": [["sqlalchemy", 29_600_000]],
    }
    lines, met = _image_section(data)
    text = "\n".join(lines)
    assert met
    assert "| the image | 250 (goal ≤ 300: met) |" in text
    assert "| ours (the virtual environment) | 95 |" in text
    assert "| — sqlalchemy | 29.6 |" in text
    lines, met = _image_section({**data, "image_bytes": 745_000_000})
    assert not met and "**not met**" in "\n".join(lines)


def test_the_map_section_compares_the_two_declarations_by_their_medians() -> None:
    from benchmarks.report import _map_section

    data = {
        "measured": "2026-12-04 08:44 UTC",
        "repetitions": 3,
        "samples": {
            "ml_platform (distributed)": {
                "fanout": [4.0, 4.4, 5.0],
                "mapped_fanout": [5.0, 5.5, 6.0],
            },
            "ml_platform (embedded)": {"fanout": [2.0, 2.0, 2.0], "mapped_fanout": [2, 2, 2.2]},
        },
    }
    lines, verdict = _map_section(data)
    text = "\n".join(lines)
    assert "| ml_platform (distributed) | 4.40 (4.00–5.00) | 5.50 (5.00–6.00) | 1.25 |" in text
    assert verdict == "map/static: distributed 1.25, embedded 1.00"


def test_the_wide_section_judges_the_growth_of_the_cost_against_its_goal() -> None:
    from benchmarks.report import _wide_section

    data = {
        "measured": "2026-12-04 17:40 UTC",
        "repetitions": 3,
        "widths": [1000, 10000],
        "samples": {
            "ml_platform (distributed)": {"1000": [3.0, 3.2, 4.0], "10000": [40.0, 41.0, 45.0]},
            "ml_platform (embedded)": {"1000": [2.0, 2.0, 2.1], "10000": [19.0, 20.0, 22.0]},
        },
    }
    lines, verdict = _wide_section(data)
    text = "\n".join(lines)
    assert "| ml_platform (distributed) | 3.20 (3.00–4.00) | 41.00 (40.00–45.00) | 12.8× | " in text
    assert "**not met**" in text and "| 10.0× | met |" in text
    assert verdict == "10,000-wide fan-out: distributed 12.8× (not met), embedded 10.0× (met)"


def test_the_watch_section_judges_the_view_against_no_view() -> None:
    from benchmarks.report import _watch_section

    samples = {"no watcher": [50.0, 52.0, 60.0], "counts by state": [55.0, 57.2, 90.0]}
    data = {"measured": "2026-12-04 09:26 UTC", "repetitions": 3, "width": 10_000}
    lines, verdict = _watch_section({**data, "samples": samples})
    assert "| counts by state | 57.2 (55.0–90.0) | 1.10 (met) |" in "\n".join(lines)
    assert verdict == "watched run 1.10× (met)"
    slow = {**samples, "counts by state": [80.0, 80.0, 80.0]}
    assert _watch_section({**data, "samples": slow})[1] == "watched run 1.54× (not met)"


def test_the_pipeline_section_judges_how_fast_mlp_answers() -> None:
    from benchmarks.report import _pipeline_section

    data = {
        "measured": "2026-12-04 10:00 UTC",
        "quality": {"cold": [20.0], "warm": [10.0]},
        "create_uv": [1.0],
        "create_virtualenv": [5.0],
        "cli": {
            "python -c pass": [0.02, 0.03, 0.02],
            "mlp --help": [0.25, 0.26, 0.4],
            "mlp --version": [0.35, 0.31, 0.33],
            "mlp runs (1,000 runs, embedded)": [0.7, 0.75, 0.9],
        },
    }
    text = "\n".join(_pipeline_section(data))
    assert "| `mlp --help` | 0.26 (0.25–0.40) | ≤ 0.3 s: met |" in text
    assert "| `mlp --version` | 0.33 (0.31–0.35) | ≤ 0.3 s: **not met** |" in text
    assert "| `mlp runs (1,000 runs, embedded)` | 0.75 (0.70–0.90) | ≤ 0.8 s: met |" in text
    assert "| `python -c pass` | 0.02 (0.02–0.03) |  |" in text


def test_the_transport_section_adds_up_each_way_of_dispatching_a_task() -> None:
    from benchmarks.report import _transport_section

    data = {
        "measured": "2026-12-04 20:30 UTC",
        "rounds": 1000,
        "redis_hop": 377.6,
        "redis_hop_batched": 24.6,
        "claim_by_id": 264.3,
        "notify_wakeup": 126.0,
        "skip_locked_claim": 299.0,
        "commit": 108.3,
    }
    lines, verdict = _transport_section(data)
    assert verdict == "dispatch per task: Redis 642 µs, LISTEN/NOTIFY 425 µs"
    assert "| Redis: XADD, XREADGROUP, XACK + XDEL of one entry | 378 |" in lines
    assert any("**642 µs**" in line and "**425 µs**" in line for line in lines)


def test_a_bench_mode_removes_its_home_when_it_closes() -> None:
    """A bench run makes a home per mode (and the crash section its marks in it): none is
    left behind in the temporary directory."""
    mode = Embedded()
    home = mode.home
    assert home.is_dir()
    mode.close()
    assert not home.exists()


def test_a_failed_nox_session_in_the_pipeline_section_keeps_its_whole_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error names the failed tests; their tracebacks are kept in a file it names (here
    not the real one, which may hold a bench run's failure)."""
    kept = tmp_path / "reports" / "bench-nox-failure.log"
    monkeypatch.setattr(pipeline, "FAILURE_LOG", kept)
    with pytest.raises(RuntimeError, match=f"its output: {kept}"):
        pipeline._nox("-s", "no_such_session")
    assert "no_such_session" in kept.read_text()


def test_a_bench_worker_is_waited_for_through_its_log_file_and_a_dead_one_says_why(
    tmp_path: Path,
) -> None:
    """The bench's workers write to a file, not to a pipe the bench must drain: it waits
    for their "ready" there, and a worker that exits first fails the bench with its output."""
    log = tmp_path / "worker.log"
    code = "import sys, time; time.sleep(0.3); print('worker w ready', flush=True); time.sleep(5)"
    with log.open("wb") as out:
        ready = subprocess.Popen([sys.executable, "-c", code], stdout=out)
    try:
        _wait_for_ready(ready, log)
        assert ready.poll() is None and b"ready" in log.read_bytes()
    finally:
        ready.kill()
        ready.wait()
    with log.open("wb") as out:
        dead = subprocess.Popen([sys.executable, "-c", "print('no database'); exit(2)"], stdout=out)
    with pytest.raises(RuntimeError, match="did not start: no database"):
        _wait_for_ready(dead, log)


def test_the_tests_rows_judge_the_goals_and_say_what_the_cpu_allows() -> None:
    from benchmarks.report import _pipeline_section

    tests = {
        "cold": [130.0],
        "warm": [88.0],
        "cold_cpu": [300.0],
        "warm_cpu": [170.0],
        "warm_no_coverage": [60.0],
        "warm_no_coverage_cpu": [110.0],
    }
    data: dict[str, Any] = {
        "measured": "2026-12-06 19:00 UTC",
        "tests_measured": "2026-12-06 19:10 UTC",
        "machine": {"cores": 2},
        "quality": {"cold": [20.0], "warm": [10.0]},
        "create_uv": [1.0],
        "create_virtualenv": [5.0],
        "tests": tests,
    }
    text = "\n".join(_pipeline_section(data))
    assert (
        "| `nox -s tests` (measured 2026-12-06 19:10 UTC) | 130 (130–130) (goal ≤ 120:"
        " **not met**) | 88 (88–88) (goal ≤ 90: met) |" in text
    )
    assert "| 170 (170–170) (over 2 cores: ≥ 85 s of wall) |" in text
    assert "| 60 (60–60), 110 (110–110) (≥ 55 s of wall) |" in text
    # A measurement from before the CPU was recorded: its wall times only.
    del tests["warm_cpu"]
    text = "\n".join(_pipeline_section(data))
    assert "goal ≤ 90: met" in text and "CPU" not in text


def test_the_cpu_of_a_session_counts_the_processes_its_processes_started() -> None:
    """The tests session's CPU is mostly its workers' children: a grandchild's is counted."""
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"
    before = pipeline.children_cpu()
    subprocess.run([sys.executable, "-c", parent], check=True)
    assert pipeline.children_cpu() - before >= 0.3

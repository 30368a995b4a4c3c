"""``python -m benchmarks [SECTION...]``: run benchmark sections, then rewrite docs/benchmarks.md.

Sections: ``workloads`` (ours and the peers, alternating), ``map`` (the fan-out declared
statically and with `task.map`, ours only), ``wide`` (the fan-out at 1,000 and 10,000,
ours only: does the cost grow linearly), ``transport`` (a task's dispatch through Redis
Streams and through LISTEN/NOTIFY with SKIP LOCKED claims: a few seconds), ``watch`` (`mlp
run`'s live view over a 10,000-task fan-out; a few minutes, not in the default), ``crash``,
``scale`` (the API, UI and /metrics over 100,000 runs and a million task runs), ``pipeline``
(nox session creation and the quality gate), ``pipeline-tests`` (the tests session cold and
warm: about 10 minutes, so never part of the default), ``image`` (the image's size, built
with podman as `nox -s image_e2e` builds it: root only, so never part of the default),
``report`` (measure nothing: rewrite the page from the figures kept). Without arguments:
workloads, map, wide, transport, crash, scale and pipeline. Figures are kept per section in
docs/benchmarks.json, so a partial run replaces only its own sections and the page says when
each was measured.
"""

from __future__ import annotations

import json
import os
import subprocess  # nosec B404
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import crash, pipeline, report, scale, transport
from benchmarks.machine import describe
from benchmarks.workloads_run import run_map, run_watch, run_wide, run_workloads

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks.json"
DEFAULT = ["workloads", "map", "wide", "transport", "crash", "scale", "pipeline"]
KNOWN = [*DEFAULT, "watch", "pipeline-tests", "image", "report"]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def image_size() -> dict[str, Any]:
    """The image built and measured by delivery.container (the build `nox -s image_e2e` runs)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "image.json"
        result = subprocess.run(  # nosec B603 - this interpreter, a fixed module
            [sys.executable, "-m", "delivery.container", "size", "--json", str(out)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            check=False,
        )
        if result.returncode != 0:
            raise SystemExit(
                f"the image could not be built and measured (exit {result.returncode})"
            )
        figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def main(argv: list[str]) -> int:
    sections = argv or DEFAULT
    unknown = [s for s in sections if s not in KNOWN]
    if unknown:
        print(
            f"unknown section(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}", file=sys.stderr
        )
        return 2
    database_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    machine = describe(database_url, redis_url)
    began = time.monotonic()
    for section in (s for s in sections if s != "report"):
        progress(f"section {section}")
        if section == "workloads":
            figures = run_workloads(database_url, redis_url, progress)
        elif section == "map":
            figures = run_map(database_url, redis_url, progress)
        elif section == "wide":
            figures = run_wide(database_url, redis_url, progress)
        elif section == "watch":
            figures = run_watch(progress)
        elif section == "transport":
            figures = transport.run(database_url, redis_url, progress)
        elif section == "crash":
            figures = crash.run(database_url, redis_url, 20, progress)
        elif section == "scale":
            figures = scale.run(database_url, redis_url, progress)
        elif section == "pipeline":
            figures = pipeline.run(progress, include_tests=False)
        elif section == "image":
            figures = image_size()
        else:
            figures = pipeline.run(progress, include_tests=True)
            figures["tests_measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            section = "pipeline"
        results[section] = {
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine,
            **figures,
        }
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    verdict = report.write(results, ROOT / "docs")
    progress(f"done in {time.monotonic() - began:.0f} s: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

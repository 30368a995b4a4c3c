"""``python -m ml_platform`` and the ``mlp`` command."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        # Straight to the worker, without the CLI's typer, rich and pydantic: a worker lives
        # for days, and they were ≈ 12 MiB of its memory (docs/benchmarks-analysis.md).
        from ml_platform.worker import main as worker

        sys.exit(worker(sys.argv[2:]))
    from ml_platform.cli import main as cli

    cli()


if __name__ == "__main__":
    main()

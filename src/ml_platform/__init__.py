"""ML Platform: declare ML pipelines as DAGs of Python tasks and run them reliably."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # Looked up on use: importlib.metadata costs every process (task processes too) 40 ms.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ml-platform")
        except PackageNotFoundError:  # pragma: no cover - a source tree without install
            return "0.0.0"
    raise AttributeError(f"module 'ml_platform' has no attribute {name!r}")


__all__ = ["__version__"]

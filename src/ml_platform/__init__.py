"""ML Platform: declare ML pipelines as DAGs of Python tasks and run them reliably."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ml-platform")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]

"""The web UI, served by ``mlp server`` itself under /ui (see views.py)."""

from ml_platform.ui.views import install

__all__ = ["install"]

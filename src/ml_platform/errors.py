"""Errors the faces catch before anything heavy is imported (the CLI starts fast)."""

from __future__ import annotations


class SettingsError(ValueError):
    """The environment holds a setting the platform cannot use; the message names it."""

"""A tiny workflow the deployment smoke tests submit: it must finish in seconds anywhere."""

from __future__ import annotations

from ml_platform.sdk import context, task, workflow


@task
def ping(message: str) -> str:
    context().log_metric("smoke", 1.0)
    return f"pong: {message}"


@workflow
def smoke(message: str = "hello") -> None:
    """One task: proves that submit, dispatch, a worker and the result store all work."""
    ping(message)

"""The deployment environments of invoke.yaml, typed and validated."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class EnvironmentError_(ValueError):
    """invoke.yaml does not describe the environment correctly; the message says what."""


@dataclass(frozen=True)
class Environment:
    name: str
    cluster: str
    namespace: str
    url: str
    region: str
    approval: bool
    branches: tuple[str, ...]
    overlay: Path
    rollout_timeout: int
    smoke_timeout: int = 300
    #: How long one kubectl call may go unanswered (beyond the wait it asks for, if any).
    kubectl_timeout: int = 30
    #: The watch window after the smoke tests (0: none), and what breaches it.
    watch_seconds: int = 0
    watch_interval: int = 10
    max_5xx_ratio: float = 0.05
    max_lease_expiries: int = 3
    #: An environment whose deploys an image must have passed first (production: staging).
    verified_in: str | None = None


REQUIRED = ("cluster", "namespace", "url", "region", "overlay")


def load_environment(config: Mapping[str, Any], name: str) -> Environment:
    """The environment ``name`` from invoke's configuration, or a clear error."""
    environments = config.get("environments") or {}
    if name not in environments:
        known = ", ".join(sorted(environments)) or "none"
        raise EnvironmentError_(f"no environment {name!r} in invoke.yaml (known: {known})")
    raw = dict(environments[name])
    missing = [key for key in REQUIRED if not raw.get(key)]
    if missing:
        raise EnvironmentError_(f"environments.{name} needs {', '.join(missing)}")
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", str(raw["url"])):
        raise EnvironmentError_(f"environments.{name}.url {raw['url']!r} is not an http(s) URL")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(raw["namespace"])):
        raise EnvironmentError_(f"environments.{name}.namespace {raw['namespace']!r} is not valid")
    overlay = Path(str(raw["overlay"]))
    if not (overlay / "kustomization.yaml").exists():
        raise EnvironmentError_(f"environments.{name}.overlay {overlay} has no kustomization.yaml")
    seconds = {}
    for key, default in (("rollout_timeout", 300), ("smoke_timeout", 300), ("kubectl_timeout", 30)):
        try:
            seconds[key] = int(raw.get(key, default))
        except (TypeError, ValueError):
            raise EnvironmentError_(f"environments.{name}.{key} must be seconds") from None
        if seconds[key] <= 0:
            raise EnvironmentError_(f"environments.{name}.{key} must be positive")
    for key, default in (("watch_seconds", 0), ("watch_interval", 10), ("max_lease_expiries", 3)):
        try:
            seconds[key] = int(raw.get(key, default))
        except (TypeError, ValueError):
            raise EnvironmentError_(f"environments.{name}.{key} must be a whole number") from None
        if seconds[key] < 0:
            raise EnvironmentError_(f"environments.{name}.{key} must not be negative")
    try:
        ratio = float(raw.get("max_5xx_ratio", 0.05))
    except (TypeError, ValueError):
        raise EnvironmentError_(f"environments.{name}.max_5xx_ratio must be a number") from None
    if not 0 <= ratio <= 1:
        raise EnvironmentError_(f"environments.{name}.max_5xx_ratio must be within 0 and 1")
    verified_in = raw.get("verified_in") or None
    if verified_in is not None and verified_in not in environments:
        raise EnvironmentError_(f"environments.{name}.verified_in names no environment")
    approval = raw.get("approval", False)
    if isinstance(approval, str):  # from an INVOKE_… environment variable
        approval = approval.strip().lower() in ("1", "true", "yes")
    branches = raw.get("branches") or []
    if isinstance(branches, str):
        branches = [b.strip() for b in branches.split(",") if b.strip()]
    return Environment(
        name=name,
        cluster=str(raw["cluster"]),
        namespace=str(raw["namespace"]),
        url=str(raw["url"]).rstrip("/"),
        region=str(raw["region"]),
        approval=bool(approval),
        branches=tuple(str(b) for b in branches),
        overlay=overlay,
        rollout_timeout=seconds["rollout_timeout"],
        smoke_timeout=seconds["smoke_timeout"],
        kubectl_timeout=seconds["kubectl_timeout"],
        watch_seconds=seconds["watch_seconds"],
        watch_interval=seconds["watch_interval"],
        max_5xx_ratio=ratio,
        max_lease_expiries=seconds["max_lease_expiries"],
        verified_in=str(verified_in) if verified_in else None,
    )

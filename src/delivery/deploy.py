"""Deploy and roll back, as the spec's process says, with a lock and automatic rollback.

deploy: lock → record the current revisions → render the overlay with the image tag → run the
migration Job → apply → wait for the rollouts (deadline) → smoke tests → on any failure roll
back to the recorded revisions, wait, and notify → unlock (also on Ctrl-C).
"""

from __future__ import annotations

import os
import subprocess  # nosec B404
import sys
from collections.abc import Callable
from dataclasses import dataclass

from delivery.environments import Environment
from delivery.kube import Kubectl, KubeError, render, split

DEPLOYMENTS = ("ml-platform", "ml-platform-worker")
MIGRATION_JOB = "ml-platform-migrate"


class DeployError(RuntimeError):
    """The deploy was refused or failed; the message says why in one line."""


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    message: str
    rolled_back: bool = False


def check_allowed(env: Environment, branch: str | None, approved: bool) -> None:
    """The spec's protection rules: allowed branches, and approval where it is required."""
    if env.branches and branch not in env.branches:
        allowed = ", ".join(env.branches)
        raise DeployError(
            f"{env.name} deploys only from {allowed}; this is {branch or 'no branch'}"
        )
    if env.approval and not approved:
        raise DeployError(
            f"{env.name} needs an approval: pass --approve, or run in the CI job whose "
            "environment has required reviewers"
        )


def run_smoke(url: str) -> bool:
    """The smoke suite (tests/smoke) against ``url``."""
    result = subprocess.run(  # nosec B603 - our own interpreter and test suite
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/smoke",
            "-q",
            "-p",
            "no:cacheprovider",
            "--no-cov",
            "--base-url",
            url,
        ],
        check=False,
    )
    return result.returncode == 0


def deploy(
    env: Environment,
    kube: Kubectl,
    *,
    image: str,
    tag: str,
    owner: str,
    smoke: Callable[[str], bool] = run_smoke,
    say: Callable[[str], None] = print,
) -> Outcome:
    """Deploy ``image:tag`` to ``env``; roll back by itself on any failure."""
    manifests = render(env.overlay, image, tag)
    say(f"deploying {image}:{tag} to {env.name} ({env.cluster}/{env.namespace}) as {owner}")
    kube.lock(owner)
    try:
        recorded = {name: kube.revision(name) for name in DEPLOYMENTS}
        say("recorded revisions: " + ", ".join(f"{n}={r}" for n, r in recorded.items()))
        job, rest = split(manifests, ["Job"])
        setup, deployments = split(rest, ["ConfigMap", "Secret", "ServiceAccount"])
        kube.apply(setup)
        if not kube.run_job(job, MIGRATION_JOB, timeout=env.rollout_timeout):
            return Outcome(False, "the migration job did not complete; nothing was rolled out")
        kube.apply(deployments)
        failure = None
        for name in DEPLOYMENTS:
            if not kube.rollout_status(name, env.rollout_timeout):
                failure = f"deployment/{name} did not roll out within {env.rollout_timeout} s"
                break
        if failure is None and not kube.dry_run:
            say(f"smoke tests against {env.url}")
            if not smoke(env.url):
                failure = f"smoke tests failed against {env.url}"
        if failure is None:
            return Outcome(True, f"{env.name} runs {image}:{tag}")
        say(f"FAILED: {failure}; rolling back")
        rollback(env, kube, recorded)
        return Outcome(False, f"{failure}; rolled back", rolled_back=True)
    finally:
        kube.unlock()


def rollback(env: Environment, kube: Kubectl, revisions: dict[str, int | None]) -> None:
    """Undo to the given revisions (the previous one where None) and wait for the rollouts."""
    for name, revision in revisions.items():
        if revision is None:
            continue  # it did not exist before this deploy: nothing to go back to
        kube.undo(name, revision)
        if not kube.rollout_status(name, env.rollout_timeout):
            raise DeployError(f"rollback of deployment/{name} did not finish: investigate now")


def rollback_to(env: Environment, kube: Kubectl, revision: int | None) -> None:
    """The spec's manual rollback: deployment/ml-platform to ``revision`` (else the previous
    one); the workers to their previous revision."""
    for name in DEPLOYMENTS:
        kube.undo(name, revision if name == DEPLOYMENTS[0] else None)
        if not kube.rollout_status(name, env.rollout_timeout):
            raise DeployError(f"rollback of deployment/{name} did not finish: investigate now")


def owner_name() -> str:
    actor = os.environ.get("GITHUB_ACTOR") or os.environ.get("USER") or "someone"
    run = os.environ.get("GITHUB_RUN_ID")
    return f"{actor} (run {run})" if run else actor


__all__ = ["DeployError", "KubeError", "Outcome", "check_allowed", "deploy", "rollback"]

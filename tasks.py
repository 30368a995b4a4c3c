"""Deploy, roll back and inspect the platform: `uv run invoke --list`.

Tasks only parse options, call src/delivery and print the outcome.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

sys.path.insert(0, str(Path(__file__).parent / "src"))

from delivery import deploy as deploying  # noqa: E402 - after the path setup above
from delivery import notify as notifying  # noqa: E402
from delivery.environments import Environment, EnvironmentError_, load_environment  # noqa: E402
from delivery.kube import Kubectl, KubeError  # noqa: E402
from delivery.tags import compute_tags, current_ref  # noqa: E402


def _env_and_kube(c: Context, env: str, dry_run: bool = False) -> tuple[Environment, Kubectl]:
    try:
        environment = load_environment(dict(c.config), env)
    except EnvironmentError_ as exc:
        raise Exit(f"error: {exc}", code=2) from None
    return environment, Kubectl(environment.namespace, environment.cluster, dry_run=dry_run)


@task(
    help={
        "env": "staging or production",
        "image_tag": "image tag to deploy (default: <branch>-<short sha> of this commit)",
        "dry_run": "print every command that would change something, change nothing",
        "approve": "the approval a production deploy needs (typed by a person)",
    }
)
def deploy(
    c: Context, env: str, image_tag: str = "", dry_run: bool = False, approve: bool = False
) -> None:
    """Deploy: lock, migrate, roll out, smoke-test; roll back by itself on any failure."""
    environment, kube = _env_and_kube(c, env, dry_run)
    ref = current_ref()
    tag = image_tag or next(t for t in compute_tags(ref) if "-" in t and t != "latest")
    try:
        deploying.check_allowed(environment, ref.branch, approve or _ci_approved(environment))
        outcome = deploying.deploy(
            environment, kube, image=c.config.image, tag=tag, owner=deploying.owner_name()
        )
    except (deploying.DeployError, KubeError) as exc:
        raise Exit(f"deploy to {env} refused or failed: {exc}", code=1) from None
    if dry_run:
        print(f"dry run: the plan above deploys {c.config.image}:{tag} to {env}; nothing changed")
        return
    kind = "deploy-succeeded" if outcome.succeeded else "deploy-failed"
    notifying.send(notifying.Event(kind, env, outcome.message, environment.url))
    print(("deploy succeeded: " if outcome.succeeded else "deploy FAILED: ") + outcome.message)
    if not outcome.succeeded:
        raise Exit(code=1)


def _ci_approved(environment: Environment) -> bool:
    """In GitHub Actions a job bound to a protected environment runs only once approved."""
    return os.environ.get("GITHUB_ACTIONS") == "true" and bool(os.environ.get("DEPLOY_APPROVED"))


@task(
    help={
        "env": "staging or production",
        "to_revision": "revision to return to (default: the previous)",
    }
)
def rollback(c: Context, env: str, to_revision: int = 0) -> None:
    """Roll the deployments back (kubectl rollout undo) and wait for them."""
    environment, kube = _env_and_kube(c, env)
    try:
        kube.lock(deploying.owner_name())
        try:
            deploying.rollback_to(environment, kube, to_revision or None)
        finally:
            kube.unlock()
    except (deploying.DeployError, KubeError) as exc:
        raise Exit(f"rollback of {env} failed: {exc}", code=1) from None
    notifying.send(notifying.Event("rollback", env, f"rolled back to {to_revision or 'previous'}"))
    print(f"rolled back {env}")


@task(help={"env": "staging or production"})
def status(c: Context, env: str) -> None:
    """Rollout state, pods and recent events (the spec's troubleshooting commands)."""
    _, kube = _env_and_kube(c, env)
    for name in deploying.DEPLOYMENTS:
        print(kube.run("rollout", "status", f"deployment/{name}", "--timeout=5s", check=False))
    print(kube.run("get", "pods", "-o", "wide"))
    print(kube.run("get", "events", "--sort-by=.lastTimestamp"))


@task(help={"env": "staging or production"})
def history(c: Context, env: str) -> None:
    """The rollout history of each deployment."""
    _, kube = _env_and_kube(c, env)
    for name in deploying.DEPLOYMENTS:
        print(kube.history(name))


@task(help={"env": "staging or production (its URL)", "url": "or any URL"})
def smoke(c: Context, env: str = "", url: str = "") -> None:
    """Run the smoke tests (tests/smoke) against an environment or a URL."""
    if not (env or url):
        raise Exit("give --env or --url", code=2)
    target = url or _env_and_kube(c, env)[0].url
    if not deploying.run_smoke(target):
        raise Exit(f"smoke tests failed against {target}", code=1)


@task(
    help={
        "event": f"one of {', '.join(notifying.EVENTS)}, or pipeline (chosen from CI results)",
        "env": "environment",
        "message": "text",
    }
)
def notify(c: Context, event: str, env: str, message: str = "") -> None:
    """Send a notification to the configured channels (Slack, PagerDuty)."""
    if event == "pipeline":
        chosen = notifying.pipeline_event(os.environ)
        if chosen is None:
            print("notify: the pipeline neither failed nor deployed; nothing to report")
            return
        event = chosen
    if event not in notifying.EVENTS:
        raise Exit(f"event must be one of {', '.join(notifying.EVENTS)} or pipeline", code=2)
    notifying.send(notifying.Event(event, env, message or event))


ns = Collection(deploy, rollback, status, history, smoke, notify)

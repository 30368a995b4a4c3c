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

from delivery import bluegreen  # noqa: E402 - after the path setup above
from delivery import deploy as deploying  # noqa: E402
from delivery import notify as notifying  # noqa: E402
from delivery.environments import Environment, EnvironmentError_, load_environment  # noqa: E402
from delivery.kube import Kubectl, KubeError  # noqa: E402
from delivery.tags import current_ref, deploy_tag  # noqa: E402


def _env_and_kube(c: Context, env: str, dry_run: bool = False) -> tuple[Environment, Kubectl]:
    try:
        environment = load_environment(dict(c.config), env)
    except EnvironmentError_ as exc:
        raise Exit(f"error: {exc}", code=2) from None
    kube = Kubectl(
        environment.namespace,
        environment.cluster,
        dry_run=dry_run,
        timeout=environment.kubectl_timeout,
    )
    return environment, kube


@task(
    help={
        "env": "staging or production",
        "image_tag": "image tag to deploy (default: <branch>-<short sha> of this commit)",
        "strategy": "rolling (default) or blue-green (then promote or abort)",
        "dry_run": "print every command that would change something, change nothing",
        "approve": "the approval a production deploy needs (typed by a person)",
        "force_unverified": "deploy an image its verified_in environment has not verified "
        "(needs the approval too; the notification says so)",
    }
)
def deploy(
    c: Context,
    env: str,
    image_tag: str = "",
    strategy: str = "rolling",
    dry_run: bool = False,
    approve: bool = False,
    force_unverified: bool = False,
) -> None:
    """Deploy: lock, migrate, roll out, smoke-test, watch; restore by itself on any failure."""
    environment, kube = _env_and_kube(c, env, dry_run)
    if strategy not in ("rolling", "blue-green"):
        raise Exit("--strategy must be rolling or blue-green", code=2)
    ref = current_ref()
    tag = image_tag or deploy_tag(ref)
    owner = deploying.owner_name()
    approved = approve or _ci_approved(environment)
    forced = _staging_first(c, environment, tag, force_unverified, approved, dry_run)
    try:
        deploying.check_allowed(environment, ref.branch, approved)
        if strategy == "blue-green":
            outcome = bluegreen.deploy_idle(
                environment, kube, image=c.config.image, tag=tag, owner=owner
            )
        else:
            outcome = deploying.deploy(
                environment, kube, image=c.config.image, tag=tag, owner=owner
            )
    except (deploying.DeployError, KubeError) as exc:
        raise Exit(f"deploy to {env} refused or failed: {exc}", code=1) from None
    if dry_run:
        print(f"dry run: the plan above deploys {c.config.image}:{tag} to {env}; nothing changed")
        return
    _finish(environment, outcome, "deploy", f"FORCED, unverified: {forced}" if forced else "")


def _staging_first(
    c: Context, environment: Environment, tag: str, force: bool, approved: bool, dry_run: bool
) -> str:
    """An environment with `verified_in` takes only images that passed a deploy there.
    Returns why a refusal was overridden ("" when none was needed)."""
    if environment.verified_in is None:
        return ""
    first, kube = _env_and_kube(c, environment.verified_in, dry_run)
    try:
        when = deploying.verified_on(kube, tag)
    except KubeError as exc:
        when, why = None, f"{first.name} could not be asked: {exc}"
    else:
        why = f"{tag} has not passed a deploy on {first.name}"
    if when is not None or dry_run:
        if when:
            print(f"{tag} passed its deploy on {first.name} at {when}")
        return ""
    if not force:
        raise Exit(f"deploy to {environment.name} refused: {why} (deploy it there first)", code=1)
    if not approved:
        raise Exit("--force-unverified needs the deploy's approval (--approve)", code=2)
    print(f"WARNING: {why}; deploying anyway (--force-unverified, approved)")
    return why


def _finish(
    environment: Environment, outcome: deploying.Outcome, what: str, note: str = ""
) -> None:
    """Tell who must know (the spec's routing), print the verdict, exit 1 on a failure."""
    if outcome.succeeded:
        kind = "rollback" if what == "rollback" else "deploy-succeeded"
    else:
        kind = "restore-failed" if outcome.restore_failed else "deploy-failed"
    summary = outcome.message if outcome.succeeded else f"{outcome.message} | live: {outcome.live}"
    summary = f"{note} | {summary}" if note else summary
    notifying.send(notifying.Event(kind, environment.name, summary, environment.url))
    if outcome.succeeded:
        print(f"{what} succeeded: {outcome.message}")
        return
    if outcome.restore_failed:
        print(f"{what} FAILED and the restore FAILED (paged): {outcome.message}")
        print(f"live now: {outcome.live}")
    else:
        print(f"{what} FAILED, what was live is back: {outcome.message}")
    raise Exit(code=1)


@task(help={"env": "staging or production"})
def promote(c: Context, env: str) -> None:
    """Blue-green: send live traffic to the preview colour; switch back if checks fail."""
    environment, kube = _env_and_kube(c, env)
    try:
        outcome = bluegreen.promote(environment, kube, owner=deploying.owner_name())
    except (deploying.DeployError, KubeError) as exc:
        raise Exit(f"promote on {env} failed: {exc}", code=1) from None
    _finish(environment, outcome, "promote")


@task(help={"env": "staging or production"})
def abort(c: Context, env: str) -> None:
    """Blue-green: scale the preview colour down; the live colour stays."""
    environment, kube = _env_and_kube(c, env)
    try:
        outcome = bluegreen.abort(environment, kube, owner=deploying.owner_name())
    except (deploying.DeployError, KubeError) as exc:
        raise Exit(f"abort on {env} failed: {exc}", code=1) from None
    print(outcome.message)
    if not outcome.succeeded:
        raise Exit(code=1)


@task(help={"env": "staging or production"})
def decommission(c: Context, env: str) -> None:
    """Blue-green: scale the old colour down once the new one has proven itself."""
    environment, kube = _env_and_kube(c, env)
    try:
        outcome = bluegreen.decommission(environment, kube, owner=deploying.owner_name())
    except (deploying.DeployError, KubeError) as exc:
        raise Exit(f"decommission on {env} failed: {exc}", code=1) from None
    print(outcome.message)
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
    """Every Deployment back to one release (the API's revision N, else its previous one);
    restored, verified and paged like a deploy if it fails."""
    environment, kube = _env_and_kube(c, env)
    try:
        outcome = deploying.rollback(
            environment, kube, owner=deploying.owner_name(), to_revision=to_revision or None
        )
    except (deploying.DeployError, KubeError) as exc:
        raise Exit(f"rollback of {env} refused or failed: {exc}", code=1) from None
    _finish(environment, outcome, "rollback")


@task(help={"env": "staging or production"})
def status(c: Context, env: str) -> None:
    """Rollout state, pods and recent events (the spec's troubleshooting commands); exits 1
    unless every deployment has rolled out."""
    environment, kube = _env_and_kube(c, env)
    if not deploying.report_status(environment, kube, print):
        raise Exit(code=1)


@task(help={"env": "staging or production"})
def history(c: Context, env: str) -> None:
    """The rollout history of each deployment."""
    environment, kube = _env_and_kube(c, env)
    if not deploying.report_history(environment, kube, print):
        raise Exit(code=1)


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


ns = Collection(deploy, promote, abort, decommission, rollback, status, history, smoke, notify)

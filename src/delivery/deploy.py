"""Deploys that fail safe: one state machine for a deploy and for a rollback.

    lock → record → migrate → apply → wait → verify → finish → unlock

*record* keeps, for every Deployment and Service the deploy touches, what is live: each
Deployment's pod template (its images and its configuration) and each Service's selector. Any
failure at a later step — a refused or partly refused apply, a rollout past its deadline, failed
smoke tests, a kubectl error, SIGINT or SIGTERM — ends in *restore*: the recorded templates and
selectors are put back (by content, never by revision number, so the API and the workers end on
the same release), the rollouts are awaited, and what is live is read back and compared. A
restore that cannot be verified is reported as such (``restore_failed``, with what is live now):
the task pages and exits non-zero. Signals that arrive during the restore are held until it ends.
The lock is released last, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess  # nosec B404
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from delivery.environments import Environment
from delivery.kube import Kubectl, KubeError, load_documents, render, split
from delivery.watch import Limits, watch

DEPLOYMENTS = ("ml-platform", "ml-platform-worker")
SERVICES = ("ml-platform",)
MIGRATION_JOB = "ml-platform-migrate"
#: A ConfigMap of the images that passed a deploy here (tag → when), for `verified_in`.
VERIFIED = "ml-platform-verified-images"


class DeployError(RuntimeError):
    """The deploy was refused or failed; the message says why in one line."""


class Interrupted(DeployError):
    """SIGINT or SIGTERM arrived while the deploy changed something."""


class StepFailed(DeployError):
    """A step of the deploy did not succeed (the message says which and why)."""


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    message: str
    rolled_back: bool = False
    #: The restore after a failure could not be verified: someone must look now.
    restore_failed: bool = False
    #: What is live after a failure: one line per Deployment and Service.
    live: str = ""


@dataclass(frozen=True)
class Snapshot:
    """What is live: each Deployment's pod template, each Service's selector (None: absent)."""

    templates: dict[str, dict[str, Any] | None]
    selectors: dict[str, dict[str, str] | None]
    replicas: dict[str, int] = field(default_factory=dict)

    def images(self, deployment: str) -> list[str] | None:
        template = self.templates.get(deployment)
        if template is None:
            return None
        return [c["image"] for c in template["spec"]["containers"]]

    def describe(self) -> str:
        lines = [
            f"deployment/{name}: {', '.join(self.images(name) or ['absent'])}"
            for name in self.templates
        ]
        lines += [
            f"service/{name}: "
            + (",".join(f"{k}={v}" for k, v in sorted(sel.items())) if sel else "absent")
            for name, sel in self.selectors.items()
        ]
        return "; ".join(lines)


def snapshot(kube: Kubectl, deployments: tuple[str, ...], services: tuple[str, ...]) -> Snapshot:
    found = {name: kube.deployment(name) for name in deployments}
    return Snapshot(
        {name: None if d is None else d["spec"]["template"] for name, d in found.items()},
        {name: kube.selector(name) for name in services},
        {name: int(d["spec"].get("replicas", 1)) for name, d in found.items() if d is not None},
    )


def restore(
    env: Environment, kube: Kubectl, recorded: Snapshot, say: Callable[[str], None] = print
) -> list[str]:
    """Put the recorded templates and selectors back, wait, and compare; the problems found.

    In the order that keeps something serving: the recorded Deployments first (and their
    rollouts awaited), then the Services' selectors, and only then are Deployments the failed
    change created deleted."""
    problems: list[str] = []
    present = {name: t for name, t in recorded.templates.items() if t is not None}
    for name, template in present.items():
        try:
            kube.set_template(name, template)
            kube.scale(name, recorded.replicas[name])
        except KubeError as exc:
            problems.append(f"deployment/{name} could not be restored: {exc}")
    for name in present:
        if not kube.rollout_status(name, env.rollout_timeout):
            problems.append(f"deployment/{name} did not roll back within {env.rollout_timeout} s")
    for name, selector in recorded.selectors.items():
        try:
            if selector is None:
                kube.delete("service", name)
            else:
                kube.set_selector(name, selector)
        except KubeError as exc:
            problems.append(f"service/{name} could not be restored: {exc}")
    for name in (n for n, t in recorded.templates.items() if t is None):
        try:
            kube.delete("deployment", name)  # it did not exist before: it goes again
        except KubeError as exc:
            problems.append(f"deployment/{name} could not be removed: {exc}")
    try:
        now = snapshot(kube, tuple(recorded.templates), tuple(recorded.selectors))
    except KubeError as exc:
        return [*problems, f"what is live could not be read back: {exc}"]
    for name in recorded.templates:
        if now.images(name) != recorded.images(name):
            problems.append(
                f"deployment/{name} runs {now.images(name)}, not the recorded "
                f"{recorded.images(name)}"
            )
    for name, replicas in recorded.replicas.items():
        if now.replicas.get(name) != replicas:
            problems.append(
                f"deployment/{name} has {now.replicas.get(name)} replicas, not {replicas}"
            )
    for name, selector in recorded.selectors.items():
        if now.selectors[name] != selector:
            problems.append(f"service/{name} selects {now.selectors[name]}, not {selector}")
    say("restore verified" if not problems else "restore FAILED: " + "; ".join(problems))
    return problems


@dataclass
class SignalGuard:
    """SIGINT and SIGTERM become Interrupted at the current step; while ``held`` they are only
    remembered (a restore is not to be cut short). Works in the main thread only; elsewhere
    (tests calling in from threads) it changes nothing."""

    held: bool = False
    received: list[str] = field(default_factory=list)
    _previous: dict[int, Any] = field(default_factory=dict)

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if not self.held:
            raise Interrupted(f"stopped by {name}")

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    @contextmanager
    def holding(self) -> Iterator[None]:
        self.held = True
        try:
            yield
        finally:
            self.held = False


@dataclass
class Deadline:
    """One overall deadline; every wait gets the smaller of its own timeout and what is left."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def left(self, step_timeout: int) -> int:
        remaining = self.seconds - (time.monotonic() - self.started)
        if remaining <= 0:
            raise StepFailed(f"the deploy's deadline of {self.seconds:.0f} s has passed")
        return max(1, min(step_timeout, int(remaining)))


def change_seconds(env: Environment) -> int:
    """The deadline of a deploy's changes: the migration, each rollout, the smoke tests and
    the watch window."""
    return env.rollout_timeout * (1 + len(DEPLOYMENTS)) + env.smoke_timeout + env.watch_seconds


#: The most kubectl calls a restore makes that wait for nothing (each may go unanswered for
#: the environment's kubectl_timeout): every template put back and scaled or removed, every
#: selector, what is read back, and the lock released.
RESTORE_CALLS = 3 * len(DEPLOYMENTS) + 2 * len(SERVICES) + 1


def worst_case_seconds(env: Environment) -> int:
    """The longest a deploy can take: its changes, then a restore of every Deployment (each
    rollout's wait and each call's kubectl_timeout, as when the API server stalls), plus two
    minutes for rendering, the other kubectl calls and notifications. A CI job's timeout must
    exceed it, or the runner could kill a deploy in the middle of its restore."""
    rollouts = (env.rollout_timeout + env.kubectl_timeout) * len(DEPLOYMENTS)
    return change_seconds(env) + rollouts + RESTORE_CALLS * env.kubectl_timeout + 120


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


def run_smoke(url: str, timeout: float = 300) -> bool:
    """The smoke suite (tests/smoke) against ``url``."""
    try:
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
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def _names(manifests: str, kind: str) -> tuple[str, ...]:
    return tuple(
        doc["metadata"]["name"] for doc in load_documents(manifests) if doc.get("kind") == kind
    )


def guarded(
    env: Environment,
    kube: Kubectl,
    *,
    owner: str,
    deployments: tuple[str, ...],
    services: tuple[str, ...],
    change: Callable[[Deadline], str],
    say: Callable[[str], None] = print,
) -> Outcome:
    """lock → record → ``change`` → finish, or restore the record on any failure → unlock.

    ``change`` does the steps after recording and returns the success message; it raises
    StepFailed, KubeError or (on a signal) Interrupted when a step fails.
    """
    deadline = Deadline(change_seconds(env))
    with SignalGuard() as signals:
        kube.lock(owner)
        try:
            try:
                recorded = snapshot(kube, deployments, services)
            except KubeError as exc:
                return Outcome(False, f"could not record what is live, changed nothing: {exc}")
            say("recorded: " + recorded.describe())
            try:
                return Outcome(True, change(deadline))
            except (DeployError, KubeError) as exc:
                failure = str(exc)
            say(f"FAILED: {failure}; restoring what was live")
            with signals.holding():
                problems = restore(env, kube, recorded, say)
                live = _live(kube, recorded)
            if problems:
                return Outcome(
                    False,
                    f"{failure}; the restore FAILED: {'; '.join(problems)}",
                    restore_failed=True,
                    live=live,
                )
            return Outcome(
                False, f"{failure}; restored and verified: {recorded.describe()}", True, live=live
            )
        finally:
            with signals.holding():
                kube.unlock()


def _live(kube: Kubectl, recorded: Snapshot) -> str:
    try:
        return snapshot(kube, tuple(recorded.templates), tuple(recorded.selectors)).describe()
    except KubeError as exc:
        return f"unknown (kubectl failed: {exc})"


def deploy(
    env: Environment,
    kube: Kubectl,
    *,
    image: str,
    tag: str,
    owner: str,
    smoke: Callable[[str], bool] | None = None,
    say: Callable[[str], None] = print,
) -> Outcome:
    """Deploy ``image:tag`` to ``env`` (a rolling update); restore what was live on any failure."""
    check = smoke or (lambda url: run_smoke(url, env.smoke_timeout))
    manifests = render(env.overlay, image, tag)  # before the lock: a bad overlay changes nothing
    job, rest = split(manifests, ["Job"])
    setup, workloads = split(rest, ["ConfigMap", "Secret", "ServiceAccount"])
    deployments = _names(workloads, "Deployment")
    say(f"deploying {image}:{tag} to {env.name} ({env.cluster}/{env.namespace}) as {owner}")

    def change(deadline: Deadline) -> str:
        kube.apply(setup)
        if not kube.run_job(job, MIGRATION_JOB, timeout=deadline.left(env.rollout_timeout)):
            raise StepFailed("migrate: the migration job did not complete")
        kube.apply(workloads)
        for name in deployments:
            if not kube.rollout_status(name, deadline.left(env.rollout_timeout)):
                raise StepFailed(f"wait: deployment/{name} did not roll out in time")
        if not kube.dry_run:
            say(f"smoke tests against {env.url}")
            if not check(env.url):
                raise StepFailed(f"verify: smoke tests failed against {env.url}")
            watch_after(env, say)
        return f"{env.name} runs {image}:{tag}"

    outcome = guarded(
        env,
        kube,
        owner=owner,
        deployments=deployments,
        services=_names(workloads, "Service"),
        change=change,
        say=say,
    )
    if outcome.succeeded and not kube.dry_run:
        record_verified(kube, tag, say)
    return outcome


def watch_after(env: Environment, say: Callable[[str], None]) -> None:
    """The watch window (environments' `watch_seconds`); a breach fails the step."""
    if env.watch_seconds <= 0:
        return
    say(f"watching {env.url} for {env.watch_seconds} s")
    limits = Limits(
        env.watch_seconds, env.watch_interval, env.max_5xx_ratio, env.max_lease_expiries
    )
    found = watch(env.url, limits, say=say)
    if found:
        raise StepFailed(f"watch: {found}")


def record_verified(kube: Kubectl, tag: str, say: Callable[[str], None] = print) -> None:
    """Note in the environment that ``tag`` passed its deploy (smoke tests and watch), for the
    environments that take only verified images (`verified_in`)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        if kube.run("get", "configmap", VERIFIED, "--ignore-not-found", "-o", "json").strip():
            patch = json.dumps({"data": {tag: stamp}})
            kube.run("patch", "configmap", VERIFIED, "--type", "merge", "-p", patch)
        else:
            kube.run("create", "configmap", VERIFIED, f"--from-literal={tag}={stamp}")
    except KubeError as exc:  # the deploy stands; a later promotion of this tag will be refused
        say(f"warning: could not record {tag} as verified here: {exc}")


def verified_on(kube: Kubectl, tag: str) -> str | None:
    """When ``tag`` passed its deploy in the environment ``kube`` talks to, or None."""
    out = kube.run("get", "configmap", VERIFIED, "--ignore-not-found", "-o", "json")
    data: dict[str, str] = json.loads(out).get("data", {}) if out.strip() else {}
    return data.get(tag)


def release_templates(
    kube: Kubectl, to_revision: int | None
) -> tuple[str, dict[str, dict[str, Any]]]:
    """The API's template at ``to_revision`` (else its previous revision), and for each other
    Deployment its own template of the same release: the latest revision that ran that image,
    else its current template with the image replaced. (Revision numbers differ between
    Deployments; images do not.)"""
    api = DEPLOYMENTS[0]
    revisions = kube.revisions(api)
    if to_revision is None:
        if len(revisions) < 2:
            raise DeployError(f"deployment/{api} has no earlier revision to go back to")
        to_revision = revisions[-2]
    elif to_revision not in revisions:
        raise DeployError(
            f"deployment/{api} has no revision {to_revision} (it has {revisions or 'none'})"
        )
    target = kube.revision_template(api, to_revision)
    image = target["spec"]["containers"][0]["image"]
    templates = {api: target}
    for name in DEPLOYMENTS[1:]:
        found = None
        for revision in reversed(kube.revisions(name)):
            candidate = kube.revision_template(name, revision)
            if candidate["spec"]["containers"][0]["image"] == image:
                found = candidate
                break
        if found is None:
            found = kube.template(name)
            if found is None:
                continue
            found["spec"]["containers"][0]["image"] = image
        templates[name] = found
    return image, templates


def rollback(
    env: Environment,
    kube: Kubectl,
    *,
    owner: str,
    to_revision: int | None = None,
    say: Callable[[str], None] = print,
) -> Outcome:
    """The spec's rollback, every Deployment to one release; restored if it fails."""

    def change(deadline: Deadline) -> str:
        image, templates = release_templates(kube, to_revision)
        say(f"rolling back to {image}")
        for name, template in templates.items():
            kube.set_template(name, template)
        for name in templates:
            if not kube.rollout_status(name, deadline.left(env.rollout_timeout)):
                raise StepFailed(f"wait: deployment/{name} did not roll back in time")
        now = snapshot(kube, tuple(templates), ())
        wrong = [name for name in templates if (now.images(name) or [""])[0] != image]
        if wrong:
            raise StepFailed(f"verify: {', '.join(wrong)} do not run {image}")
        return f"{env.name} runs {image} on {', '.join(templates)}"

    return guarded(
        env, kube, owner=owner, deployments=DEPLOYMENTS, services=(), change=change, say=say
    )


def owner_name() -> str:
    actor = os.environ.get("GITHUB_ACTOR") or os.environ.get("USER") or "someone"
    run = os.environ.get("GITHUB_RUN_ID")
    return f"{actor} (run {run})" if run else actor


__all__ = [
    "DeployError",
    "KubeError",
    "Outcome",
    "check_allowed",
    "deploy",
    "restore",
    "rollback",
]


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


def report_status(environment: Environment, kube: Kubectl, echo: Callable[[str], None]) -> bool:
    """The spec's troubleshooting reads, each under its heading: every Deployment's rollout
    state, the pods, the events. A read that fails says why and the others go on. Ends with a
    one-line verdict; True when every Deployment has rolled out and everything could be read."""
    reads = [
        *(
            (f"deployment/{n}", ("rollout", "status", f"deployment/{n}", "--timeout=5s"))
            for n in DEPLOYMENTS
        ),
        ("pods", ("get", "pods", "-o", "wide")),
        ("events", ("get", "events", "--sort-by=.lastTimestamp")),
    ]
    return _report(
        environment, kube, echo, reads, f"every deployment rolled out ({', '.join(DEPLOYMENTS)})"
    )


def report_history(environment: Environment, kube: Kubectl, echo: Callable[[str], None]) -> bool:
    """Each Deployment's rollout history under its heading, and a verdict; False if one could
    not be read."""
    reads: list[tuple[str, tuple[str, ...]]] = [
        (f"deployment/{n}", ("rollout", "history", f"deployment/{n}")) for n in DEPLOYMENTS
    ]
    return _report(environment, kube, echo, reads, "history read")


def _report(
    environment: Environment,
    kube: Kubectl,
    echo: Callable[[str], None],
    reads: list[tuple[str, tuple[str, ...]]],
    fine: str,
) -> bool:
    failed: dict[str, str] = {}
    for what, args in reads:
        ok, text = kube.read(*args)
        echo(f"== {what}\n{text or 'nothing'}")
        if not ok:
            failed[what] = _last_line(text)
    if not failed:
        echo(f"{environment.name}: {fine}")
    elif len(failed) == len(reads) and len(set(failed.values())) == 1:
        echo(f"{environment.name}: the cluster could not be read: {next(iter(failed.values()))}")
    else:
        echo(
            f"{environment.name}: NOT healthy: " + "; ".join(f"{w}: {r}" for w, r in failed.items())
        )
    return not failed

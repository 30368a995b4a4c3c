"""Blue-green deploys, as Argo Rollouts does them, on plain Deployments and Services.

The API runs as two colour Deployments (`ml-platform-blue`, `ml-platform-green`; their pods
carry `app.kubernetes.io/colour`). The live Service `ml-platform` selects one colour; the
preview Service `ml-platform-preview` selects the other. Live traffic moves at one moment only:
when `promote` switches the live selector. Every step runs in the deploy state machine
(delivery.deploy.guarded): a failure or a signal restores what was recorded and verifies it.

- **Adopt** (the first blue-green deploy on a namespace that ran rolling deploys, whose live
  Service selects no colour): the rolling Deployment's current template is copied, with the
  live colour's label, into that colour's Deployment and rolled out; only when its pods are
  ready does the live selector name the colour — the same release, image and configuration,
  before any new release exists. The rolling Deployment is then scaled to 0 (kept for restore).
- **Deploy the idle colour**: the preview Service is pointed at the idle colour first; the idle
  Deployment is applied and rolled out; its preview is checked only once the preview Service's
  endpoints are exactly the idle colour's pods (then `kubectl port-forward` reaches one of
  them). A failure restores the idle Deployment and the preview; the live Service was never
  touched.
- **Promote** refuses when the idle colour is absent, scaled to 0, not rolled out, or not what
  the preview serves. It switches the live selector, checks the live URL, and moves the workers
  to the new image; a failed check restores the selector and the workers (and the task pages).
- **Abort** scales the idle colour down; **decommission** the old colour, once the new one has
  proven itself.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

from delivery.deploy import (
    MIGRATION_JOB,
    Deadline,
    DeployError,
    Outcome,
    StepFailed,
    guarded,
    record_verified,
    run_smoke,
    watch_after,
)
from delivery.environments import Environment
from delivery.kube import Kubectl, dump_document, dump_documents, load_documents, render, split

COLOURS = ("blue", "green")
LABEL = "app.kubernetes.io/colour"
API = "ml-platform"
WORKER = "ml-platform-worker"
LIVE = "ml-platform"
PREVIEW = "ml-platform-preview"


def other(colour: str) -> str:
    return COLOURS[1] if colour == COLOURS[0] else COLOURS[0]


def deployment_of(colour: str) -> str:
    return f"{API}-{colour}"


def coloured(manifests: str, colour: str) -> tuple[str, dict[str, Any]]:
    """The colour's API Deployment (and its HPA) from the rendered manifests, and the preview
    Service selecting that colour. The live Service and the workers are not in it."""
    documents = load_documents(manifests)
    result = []
    preview: dict[str, Any] | None = None
    for doc in documents:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "Deployment" and name == API:
            doc = copy.deepcopy(doc)
            doc["metadata"]["name"] = deployment_of(colour)
            doc["spec"]["selector"]["matchLabels"][LABEL] = colour
            doc["spec"]["template"]["metadata"]["labels"][LABEL] = colour
            result.append(doc)
        elif kind == "HorizontalPodAutoscaler" and doc["spec"]["scaleTargetRef"]["name"] == API:
            doc = copy.deepcopy(doc)
            doc["metadata"]["name"] = deployment_of(colour)
            doc["spec"]["scaleTargetRef"]["name"] = deployment_of(colour)
            result.append(doc)
        elif kind == "Service" and name == LIVE:
            preview = copy.deepcopy(doc)
            preview["metadata"]["name"] = PREVIEW
            preview["spec"]["selector"][LABEL] = colour
    if preview is None:
        raise DeployError("the rendered overlay has no Service ml-platform")
    return dump_documents(result), preview


def live_colour(kube: Kubectl) -> str | None:
    selector = kube.selector(LIVE) or {}
    return selector.get(LABEL)


def endpoints_are(kube: Kubectl, service: str, deployment: str) -> bool:
    """Whether every endpoint of the Service is a pod of the Deployment (and there is one)."""
    out = kube.run("get", "endpoints", service, "--ignore-not-found", "-o", "json")
    if not out.strip():
        return False
    pods = [
        address.get("targetRef", {}).get("name", "")
        for subset in json.loads(out).get("subsets") or []
        for address in subset.get("addresses") or []
    ]
    return bool(pods) and all(pod.startswith(f"{deployment}-") for pod in pods)


def _wait_for_endpoints(kube: Kubectl, deployment: str, seconds: int) -> None:
    until = time.monotonic() + seconds
    while not endpoints_are(kube, PREVIEW, deployment):
        if time.monotonic() > until:
            raise StepFailed(f"verify: {PREVIEW} does not serve only {deployment}'s pods")
        time.sleep(1)


def _adopt(env: Environment, kube: Kubectl, deadline: Deadline, say: Callable[[str], None]) -> str:
    """Make the rolling release the live colour (blue) without changing what users reach."""
    rolling = kube.deployment(API)
    if rolling is None:
        return COLOURS[0]  # nothing live yet: blue will be the first live colour at promote
    template = rolling["spec"]["template"]
    live = COLOURS[0]
    say(f"adopting the rolling release as {live}: same image and configuration")
    adopted = copy.deepcopy(template)
    adopted.setdefault("metadata", {}).setdefault("labels", {})[LABEL] = live
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_of(live), "labels": {"app.kubernetes.io/name": API}},
        "spec": {
            "replicas": int(rolling["spec"].get("replicas", 1)),  # as many as serve now
            "selector": {"matchLabels": {**_selector_of(template), LABEL: live}},
            "template": adopted,
        },
    }
    kube.apply(dump_document(manifest))
    if not kube.rollout_status(deployment_of(live), deadline.left(env.rollout_timeout)):
        raise StepFailed(f"adopt: {deployment_of(live)} did not roll out")
    selector = dict(kube.selector(LIVE) or {})
    kube.set_selector(LIVE, {**selector, LABEL: live})  # the same release, already ready
    kube.run("scale", f"deployment/{API}", "--replicas=0")
    return live


def _documents(manifests: str, kind: str, name: str) -> list[dict[str, Any]]:
    return [
        d for d in load_documents(manifests) if d["kind"] == kind and d["metadata"]["name"] == name
    ]


def _selector_of(template: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = template.get("metadata", {}).get("labels", {})
    keys = ("app.kubernetes.io/name", "app.kubernetes.io/component")
    return {key: labels[key] for key in keys if key in labels}


def deploy_idle(
    env: Environment,
    kube: Kubectl,
    *,
    image: str,
    tag: str,
    owner: str,
    preview_smoke: Callable[[str], bool] | None = None,
    say: Callable[[str], None] = print,
) -> Outcome:
    """Roll the idle colour out and check it through the preview Service; nothing live moves."""
    manifests = render(env.overlay, image, tag)
    job, rest = split(manifests, ["Job"])
    setup, _ = split(rest, ["ConfigMap", "Secret", "ServiceAccount"])
    check = preview_smoke or (lambda url: run_smoke(url, env.smoke_timeout))
    live = live_colour(kube)
    first = kube.selector(LIVE) is None  # nothing is live yet: this release will be
    idle = other(live) if live else COLOURS[1]
    say(f"live colour: {live or 'none'}; deploying {image}:{tag} as {idle}")
    workloads, preview = coloured(rest, idle)

    def change(deadline: Deadline) -> str:
        if live is None and not first:
            _adopt(env, kube, deadline, say)
        kube.apply(setup)
        if not kube.run_job(job, MIGRATION_JOB, timeout=deadline.left(env.rollout_timeout)):
            raise StepFailed("migrate: the migration job did not complete")
        kube.apply(dump_document(preview))  # first: it never selects anything live
        kube.apply(workloads)
        name = deployment_of(idle)
        if not kube.rollout_status(name, deadline.left(env.rollout_timeout)):
            raise StepFailed(f"wait: deployment/{name} did not roll out in time")
        if kube.dry_run:
            return f"{idle} would run {image}:{tag} behind the preview"
        _wait_for_endpoints(kube, name, deadline.left(env.rollout_timeout))
        with kube.port_forward(PREVIEW) as url:
            say(f"smoke tests against the preview of {idle} ({url})")
            if not check(url):
                raise StepFailed(f"verify: smoke tests failed on the preview of {idle}")
        if first:  # no one to switch from: the checked release goes live, workers with it
            kube.apply(
                dump_document({**preview, "metadata": {**preview["metadata"], "name": LIVE}})
            )
            if kube.template(WORKER) is None:
                kube.apply(dump_documents(_documents(rest, "Deployment", WORKER)))
            return f"{idle} is live with {image}:{tag}, the first release (preview checked first)"
        return f"{idle} runs {image}:{tag} behind the preview; promote to go live"

    return guarded(
        env,
        kube,
        owner=owner,
        deployments=(API, WORKER, deployment_of(COLOURS[0]), deployment_of(COLOURS[1])),
        services=(LIVE, PREVIEW),
        change=change,
        say=say,
    )


def promote(
    env: Environment,
    kube: Kubectl,
    *,
    owner: str,
    live_smoke: Callable[[], bool] | None = None,
    say: Callable[[str], None] = print,
) -> Outcome:
    """Switch live traffic to the preview colour; restore the switch if the live check fails."""
    check = live_smoke or (lambda: run_smoke(env.url, env.smoke_timeout))
    live = live_colour(kube)
    if live is None:
        raise DeployError("no blue-green deployment to promote: the live Service selects no colour")
    new = other(live)
    name = deployment_of(new)
    template = kube.template(name)
    details = json.loads(
        kube.run("get", f"deployment/{name}", "--ignore-not-found", "-o", "json") or "{}"
    )
    if template is None or not details.get("spec", {}).get("replicas"):
        raise DeployError(f"nothing to promote: {name} is absent or scaled to 0 (deploy it first)")
    if not kube.rollout_status(name, 30) or not endpoints_are(kube, PREVIEW, name):
        raise DeployError(f"{name} is not healthy behind the preview: not promoting it")
    image = template["spec"]["containers"][0]["image"]

    def change(deadline: Deadline) -> str:
        kube.set_selector(LIVE, {**(kube.selector(LIVE) or {}), LABEL: new})
        say(f"live traffic switched from {live} to {new}")
        if not check():
            raise StepFailed(f"verify: smoke tests failed after the switch to {new}")
        kube.run("set", "image", f"deployment/{WORKER}", f"worker={image}")
        if not kube.rollout_status(WORKER, deadline.left(env.rollout_timeout)):
            raise StepFailed(f"wait: deployment/{WORKER} did not roll out {image}")
        watch_after(env, say)
        return f"{new} is live ({image}); {live} is kept for rollback until decommission"

    outcome = guarded(
        env,
        kube,
        owner=owner,
        deployments=(WORKER,),
        services=(LIVE,),
        change=change,
        say=say,
    )
    if outcome.succeeded:
        record_verified(kube, image.rsplit(":", 1)[-1], say)
    return outcome


def decommission(env: Environment, kube: Kubectl, *, owner: str) -> Outcome:
    """Scale the old (not live) colour down once the new one has proven itself."""
    return _scale_idle(env, kube, owner, "decommissioned")


def abort(env: Environment, kube: Kubectl, *, owner: str) -> Outcome:
    """Scale the preview colour down before promotion; the live colour is untouched."""
    return _scale_idle(env, kube, owner, "aborted")


def _scale_idle(env: Environment, kube: Kubectl, owner: str, verb: str) -> Outcome:
    live = live_colour(kube)
    if live is None:
        raise DeployError(f"nothing {verb}: no blue-green deployment")
    idle = deployment_of(other(live))

    def change(_deadline: Deadline) -> str:
        kube.run("scale", f"deployment/{idle}", "--replicas=0")
        return f"{verb}: {idle} scaled down, {live} stays live"

    return guarded(
        env, kube, owner=owner, deployments=(), services=(LIVE,), change=change, say=lambda _m: None
    )

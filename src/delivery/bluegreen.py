"""Blue-green deploys, as Argo Rollouts does them, on plain Deployments and Services.

The API runs as two colour Deployments (`ml-platform-blue`, `ml-platform-green`). The live
Service `ml-platform` selects one colour; the preview Service `ml-platform-preview` selects the
other. A blue-green deploy rolls the idle colour out and smoke-tests it through the preview,
then waits: `promote` switches the live selector and checks again (switching back on failure),
`abort` scales the idle colour down, `decommission` scales the old colour down once the new one
has proven itself. Workers follow with a rolling update at promotion.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import yaml

from delivery.deploy import DeployError, Outcome
from delivery.environments import Environment
from delivery.kube import Kubectl, render, split

COLOURS = ("blue", "green")
LABEL = "app.kubernetes.io/colour"
API = "ml-platform"
LIVE = "ml-platform"
PREVIEW = "ml-platform-preview"


def other(colour: str) -> str:
    return COLOURS[1] if colour == COLOURS[0] else COLOURS[0]


def coloured(manifests: str, colour: str) -> str:
    """The rendered manifests with the API Deployment as its colour and a preview Service."""
    documents = [d for d in yaml.safe_load_all(manifests) if d]
    result = []
    for doc in documents:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == API:
            doc = copy.deepcopy(doc)
            doc["metadata"]["name"] = f"{API}-{colour}"
            doc["spec"]["selector"]["matchLabels"][LABEL] = colour
            doc["spec"]["template"]["metadata"]["labels"][LABEL] = colour
        if doc["kind"] == "Service" and doc["metadata"]["name"] == LIVE:
            preview = copy.deepcopy(doc)
            preview["metadata"]["name"] = PREVIEW
            preview["spec"]["selector"][LABEL] = colour
            result.append(preview)
            continue  # the live Service is only ever patched, never re-applied here
        if doc["kind"] == "HorizontalPodAutoscaler":
            doc = copy.deepcopy(doc)
            doc["spec"]["scaleTargetRef"]["name"] = f"{API}-{colour}"
        result.append(doc)
    return yaml.safe_dump_all(result)


def live_colour(kube: Kubectl) -> str | None:
    out = kube.run("get", "service", LIVE, "--ignore-not-found", "-o", "json")
    if not out.strip():
        return None
    selector: dict[str, str] = json.loads(out).get("spec", {}).get("selector", {})
    return selector.get(LABEL)


def switch(kube: Kubectl, colour: str) -> None:
    patch = {"spec": {"selector": {LABEL: colour}}}
    kube.run("patch", "service", LIVE, "--type", "merge", "-p", json.dumps(patch))


def deploy_idle(
    env: Environment,
    kube: Kubectl,
    *,
    image: str,
    tag: str,
    owner: str,
    preview_smoke: Callable[[], bool],
    say: Callable[[str], None] = print,
) -> Outcome:
    """Roll the idle colour out and smoke-test it through the preview Service."""
    manifests = render(env.overlay, image, tag)
    kube.lock(owner)
    try:
        live = live_colour(kube)
        idle = other(live) if live else COLOURS[0]
        say(f"live colour: {live or 'none'}; deploying {image}:{tag} as {idle}")
        job, rest = split(manifests, ["Job"])
        setup, deployments = split(rest, ["ConfigMap", "Secret", "ServiceAccount"])
        kube.apply(setup)
        if not kube.run_job(job, "ml-platform-migrate", timeout=env.rollout_timeout):
            return Outcome(False, "the migration job did not complete; nothing was rolled out")
        # The idle colour and the preview; existing workers wait for the promotion.
        first_workers = kube.revision("ml-platform-worker") is None
        kube.apply(
            yaml.safe_dump_all(
                [
                    d
                    for d in yaml.safe_load_all(coloured(deployments, idle))
                    if d and (first_workers or d["metadata"]["name"] != "ml-platform-worker")
                ]
            )
        )
        if live is None:  # first blue-green deploy: the live Service points at this colour
            kube.apply(yaml.safe_dump_all([_live_service(deployments, idle)]))
        if not kube.rollout_status(f"{API}-{idle}", env.rollout_timeout):
            kube.run("scale", f"deployment/{API}-{idle}", "--replicas=0")
            return Outcome(False, f"{idle} did not roll out; scaled it down, {live} stays live")
        if not preview_smoke():
            kube.run("scale", f"deployment/{API}-{idle}", "--replicas=0")
            return Outcome(False, f"smoke tests failed on the preview of {idle}; scaled it down")
        return Outcome(True, f"{idle} runs {image}:{tag} behind the preview; promote to go live")
    finally:
        kube.unlock()


def _live_service(deployments: str, colour: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all(deployments):
        if doc and doc["kind"] == "Service" and doc["metadata"]["name"] == LIVE:
            doc["spec"]["selector"][LABEL] = colour
            return dict(doc)
    raise DeployError("the rendered overlay has no Service ml-platform")


def promote(
    env: Environment,
    kube: Kubectl,
    *,
    owner: str,
    live_smoke: Callable[[], bool],
    say: Callable[[str], None] = print,
) -> Outcome:
    """Switch live traffic to the preview colour; switch back if the live checks fail."""
    kube.lock(owner)
    try:
        live = live_colour(kube)
        if live is None:
            raise DeployError("no blue-green deployment to promote (no live Service)")
        new = other(live)
        switch(kube, new)
        say(f"live traffic switched from {live} to {new}")
        if not live_smoke():
            switch(kube, live)
            return Outcome(
                False, f"smoke tests failed after the switch; switched back to {live}", True
            )
        image = kube.run(
            "get",
            f"deployment/{API}-{new}",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ).strip()
        if image:  # the workers follow the API's new image with a rolling update
            kube.run("set", "image", "deployment/ml-platform-worker", f"worker={image}")
            kube.rollout_status("ml-platform-worker", env.rollout_timeout)
        return Outcome(True, f"{new} is live; {live} is kept for rollback until decommission")
    finally:
        kube.unlock()


def decommission(env: Environment, kube: Kubectl, *, owner: str) -> Outcome:
    """Scale the old (not live) colour down once the new one has proven itself."""
    return _scale_idle(kube, owner, "decommissioned")


def abort(env: Environment, kube: Kubectl, *, owner: str) -> Outcome:
    """Scale the preview colour down before promotion; the live colour is untouched."""
    return _scale_idle(kube, owner, "aborted")


def _scale_idle(kube: Kubectl, owner: str, verb: str) -> Outcome:
    kube.lock(owner)
    try:
        live = live_colour(kube)
        if live is None:
            raise DeployError(f"nothing {verb}: no blue-green deployment")
        kube.run("scale", f"deployment/{API}-{other(live)}", "--replicas=0")
        return Outcome(True, f"{verb}: {other(live)} scaled down, {live} stays live")
    finally:
        kube.unlock()

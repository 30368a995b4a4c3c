"""A stand-in for kubectl that keeps real state in a JSON file ($KUBECTL_DOUBLE_STATE).

It knows deployments with revisions (a changed pod template makes a new one; undo brings an
old template back as a new revision, as Kubernetes does), rollouts that can be told to fail,
jobs, ConfigMaps (the deploy lock) and events, and it records every command it receives.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml


def main(argv: list[str]) -> int:
    path = Path(os.environ["KUBECTL_DOUBLE_STATE"])
    state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    state.setdefault("deployments", {})
    state.setdefault("configmaps", {})
    state.setdefault("jobs", {})
    state.setdefault("behaviour", {})
    state.setdefault("log", []).append(argv)
    if argv[:1] == ["kustomize"]:  # rendering is real kustomize
        os.execv(os.environ["KUBECTL_REAL"], ["kubectl", *argv])
    args = list(argv)
    namespace = "default"
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag == "--namespace":
            namespace = args.pop(0)
        elif flag == "--context":
            args.pop(0)
    try:
        code, out = handle(state, namespace, args, sys.stdin.read() if "-f" in args else "")
    finally:
        path.write_text(json.dumps(state))
    if code == 0:
        sys.stdout.write(out)
    else:
        sys.stderr.write(out)
    return code


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def handle(state: dict[str, Any], ns: str, args: list[str], stdin: str) -> tuple[int, str]:
    verb = args[0] if args else ""
    behaviour = state["behaviour"]
    if verb == "apply":
        for doc in yaml.safe_load_all(stdin):
            if not doc:
                continue
            name = doc["metadata"]["name"]
            if doc["kind"] == "Deployment":
                template = json.dumps(doc["spec"]["template"], sort_keys=True)
                digest = hashlib.sha256(template.encode()).hexdigest()[:12]
                dep = state["deployments"].setdefault(
                    _key(ns, name), {"revision": 0, "history": {}}
                )
                if dep.get("template") != digest:
                    dep["revision"] += 1
                    dep["history"][str(dep["revision"])] = digest
                    dep["template"] = digest
                    dep["image"] = doc["spec"]["template"]["spec"]["containers"][0]["image"]
                    state.setdefault("images", {})[digest] = dep["image"]
                    dep["rolled_out"] = False
                dep["replicas"] = doc["spec"].get("replicas", 1)
            elif doc["kind"] == "Job":
                state["jobs"][_key(ns, name)] = {"done": False}
            elif doc["kind"] == "Service":
                state.setdefault("services", {})[_key(ns, name)] = dict(doc["spec"]["selector"])
        return 0, "applied\n"
    if verb == "get" and args[1].startswith("deployment/"):
        dep = state["deployments"].get(_key(ns, args[1].split("/", 1)[1]))
        if any("containers[0].image" in a for a in args):
            return 0, dep["image"] if dep else ""
        return 0, str(dep["revision"]) if dep else ""
    if verb == "get" and args[1] == "service":
        selector = state.get("services", {}).get(_key(ns, args[2]))
        return 0, json.dumps({"spec": {"selector": selector}}) if selector is not None else ""
    if verb == "patch" and args[1] == "service":
        patch = json.loads(args[args.index("-p") + 1])
        state["services"][_key(ns, args[2])].update(patch["spec"]["selector"])
        return 0, f"service/{args[2]} patched\n"
    if verb == "scale":
        dep = state["deployments"][_key(ns, args[1].split("/", 1)[1])]
        dep["replicas"] = int(args[2].split("=", 1)[1])
        return 0, f"{args[1]} scaled\n"
    if verb == "set" and args[1] == "image":
        dep = state["deployments"][_key(ns, args[2].split("/", 1)[1])]
        dep["image"] = args[3].split("=", 1)[1]
        dep["revision"] += 1
        return 0, f"{args[2]} image updated\n"
    if verb == "rollout":
        action, target = args[1], args[2].split("/", 1)[1]
        dep = state["deployments"].get(_key(ns, target))
        if dep is None:
            return 1, f'Error from server (NotFound): deployments.apps "{target}" not found\n'
        if action == "status":
            failing = behaviour.get("fail_rollout_of_image")
            if failing and dep["image"].endswith(f":{failing}"):
                return 1, f'error: deployment "{target}" exceeded its progress deadline\n'
            dep["rolled_out"] = True
            return 0, f'deployment "{target}" successfully rolled out\n'
        if action == "undo":
            to = next((a.split("=", 1)[1] for a in args if a.startswith("--to-revision=")), None)
            revisions = sorted(int(r) for r in dep["history"])
            if to is None:
                if len(revisions) < 2:
                    return 1, "error: no rollout history found\n"
                to = str(revisions[-2])
            if to not in dep["history"]:
                return 1, f"error: unable to find specified revision {to} in history\n"
            digest = dep["history"].pop(to)
            dep["revision"] = revisions[-1] + 1
            dep["history"][str(dep["revision"])] = digest
            dep["template"] = digest
            dep["image"] = state["images"][digest]
            return 0, f"deployment.apps/{target} rolled back\n"
        if action == "history":
            lines = ["REVISION  CHANGE-CAUSE"] + [
                f"{r}         <none>" for r in sorted(dep["history"], key=int)
            ]
            return 0, "\n".join(lines) + "\n"
    if verb == "create" and args[1] == "configmap":
        key = _key(ns, args[2])
        if key in state["configmaps"]:
            return 1, f'error: failed to create configmap: configmaps "{args[2]}" already exists\n'
        data = dict(a.removeprefix("--from-literal=").split("=", 1) for a in args[3:])
        state["configmaps"][key] = data
        return 0, f"configmap/{args[2]} created\n"
    if verb == "get" and args[1] == "configmap":
        data = state["configmaps"].get(_key(ns, args[2]))
        if data is None:
            return 1, f'Error from server (NotFound): configmaps "{args[2]}" not found\n'
        return 0, json.dumps({"data": data})
    if verb == "delete":
        kind, name = (args[1], args[2]) if args[1] == "configmap" else args[1].split("/", 1)
        store = state["configmaps"] if kind == "configmap" else state["jobs"]
        store.pop(_key(ns, name), None)
        return 0, f"{kind} {name} deleted\n"
    if verb == "wait":
        name = args[2].split("/", 1)[1]
        if behaviour.get("fail_job"):
            return 1, f"error: timed out waiting for the condition on jobs/{name}\n"
        return 0, f"job.batch/{name} condition met\n"
    if verb == "get" and args[1] in ("pods", "events"):
        return 0, f"{args[1]} of {ns}\n"
    return 1, f"kubectl double: unsupported command {args}\n"


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

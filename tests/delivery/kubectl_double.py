"""A stand-in for kubectl that keeps real state in a JSON file.

It knows deployments with revisions (a changed pod template makes a new one; undo or a patched
template brings an old one back as a new revision, as Kubernetes does), their full pod
templates, rollouts that can be told to fail or to take their time, jobs, Services with
selectors, ConfigMaps (the deploy lock) and events, and it records every command it receives.

It serves from the test's process (`Double`, on a Unix socket): the `kubectl` on the test's
PATH is `kubectl_client.py`, which imports only built-ins and hands over its arguments and
stdin. A deploy calls kubectl a few hundred times; a client that starts in a third of the time
a Python with json and pathlib takes is most of the deploy tests' time saved.

Behaviours a test may set (``state["behaviour"]``):
- ``fail_rollout_of_image``: a tag (or a list of tags) whose rollouts never finish;
- ``reject_apply_of``: a resource name that `apply` refuses after applying what came before it;
- ``fail_job``: the migration job never completes;
- ``fail_patch``: `patch deployment` is refused (a restore that cannot even start);
- ``slow``: {verb: seconds} — that verb sleeps first, after writing ``<state>.busy``; a
  client killed meanwhile never reaches the cluster (as a killed kubectl would not).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TABLES = ("deployments", "configmaps", "jobs", "behaviour", "services", "templates")


class Double:
    """The cluster: one state file, commands taken one at a time from `kubectl_client.py`s."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self._lock = threading.Lock()
        self._folder = tempfile.mkdtemp(prefix="kubectl-")  # a short path: AF_UNIX has 108 bytes
        self.socket_path = os.path.join(self._folder, "sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.socket_path)
        self._listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        os.unlink(self.socket_path)
        os.rmdir(self._folder)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed: the test is over
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            reader = conn.makefile("rb")
            size = int(reader.readline())
            argv, stdin = ast.literal_eval(reader.read(size).decode())
            reply = self.call(argv, stdin, lambda: _connected(conn))
            if reply is None:
                return
            code, out = reply
            try:
                conn.sendall(bytes([code]) + out.encode())
            except OSError:  # the client is gone: like a kubectl killed after its request
                pass

    def _load(self) -> dict[str, Any]:
        path = self.state_path
        state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        for table in TABLES:
            state.setdefault(table, {})
        return state

    def call(
        self, argv: list[str], stdin: str, connected: Any = lambda: True
    ) -> tuple[int, str] | None:
        """One kubectl command: (exit code, output), or None if its client went away first."""
        args = list(argv)
        namespace = "default"
        while args and args[0].startswith("--"):
            flag = args.pop(0)
            if flag == "--namespace":
                namespace = args.pop(0)
            elif flag == "--context":
                args.pop(0)
        with self._lock:
            delay = self._load()["behaviour"].get("slow", {}).get(args[0] if args else "")
        if delay:
            self.state_path.with_suffix(".busy").write_text(" ".join(args))
            time.sleep(float(delay))
            if not connected():
                return None
        with self._lock:
            state = self._load()
            state["log"] = [*state.get("log", []), argv]
            try:
                return handle(state, namespace, args, stdin)
            finally:
                self.state_path.write_text(json.dumps(state))


def _connected(conn: socket.socket) -> bool:
    """The client still waits (it sent all it had: a closed one reads as end of file)."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _set_template(state: dict[str, Any], ns: str, name: str, template: dict[str, Any]) -> None:
    """A Deployment gets this pod template: a new revision when it differs from the current."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:12]
    state["templates"][digest] = template
    dep = state["deployments"].setdefault(
        _key(ns, name), {"revision": 0, "history": {}, "replicas": 1}
    )
    if dep.get("template") == digest:
        return
    for revision, old in list(dep["history"].items()):
        if old == digest:  # Kubernetes keeps one revision per template: the old number goes
            del dep["history"][revision]
    dep["revision"] = max([dep["revision"], *map(int, dep["history"])]) + 1
    dep["history"][str(dep["revision"])] = digest
    dep["template"] = digest
    dep["image"] = template["spec"]["containers"][0]["image"]
    dep["rolled_out"] = False


def _failing(behaviour: dict[str, Any], image: str) -> bool:
    tags = behaviour.get("fail_rollout_of_image") or []
    tags = [tags] if isinstance(tags, str) else tags
    return any(image.endswith(f":{tag}") for tag in tags)


def _deployment_json(state: dict[str, Any], dep: dict[str, Any]) -> str:
    return json.dumps(
        {
            "metadata": {
                "annotations": {"deployment.kubernetes.io/revision": str(dep["revision"])}
            },
            "spec": {"replicas": dep["replicas"], "template": state["templates"][dep["template"]]},
        }
    )


def handle(state: dict[str, Any], ns: str, args: list[str], stdin: str) -> tuple[int, str]:
    verb = args[0] if args else ""
    behaviour = state["behaviour"]
    if verb == "apply":
        from delivery.kube import load_documents

        for doc in load_documents(stdin):
            name = doc["metadata"]["name"]
            if name == behaviour.get("reject_apply_of"):
                return 1, (
                    f'Error from server (Forbidden): error when applying "{name}": '
                    "admission webhook denied the request\n"
                )
            if doc["kind"] == "Deployment":
                _set_template(state, ns, name, doc["spec"]["template"])
                state["deployments"][_key(ns, name)]["replicas"] = doc["spec"].get("replicas", 1)
            elif doc["kind"] == "Job":
                state["jobs"][_key(ns, name)] = {"done": False}
            elif doc["kind"] == "Service":
                state["services"][_key(ns, name)] = dict(doc["spec"]["selector"])
        return 0, "applied\n"
    if verb == "get" and args[1].startswith("deployment/"):
        dep = state["deployments"].get(_key(ns, args[1].split("/", 1)[1]))
        if dep is None:
            return 0, ""
        if "json" in args:
            return 0, _deployment_json(state, dep)
        if any("containers[0].image" in a for a in args):
            return 0, str(dep["image"])
        return 0, str(dep["revision"])
    if verb == "get" and args[1] == "service":
        selector = state["services"].get(_key(ns, args[2]))
        return 0, json.dumps({"spec": {"selector": selector}}) if selector is not None else ""
    if verb == "patch" and args[1] == "service":
        patch = json.loads(args[args.index("-p") + 1])
        selectors = state["services"]
        if "--type" in args and args[args.index("--type") + 1] == "json":
            selectors[_key(ns, args[2])] = dict(patch[0]["value"])
        else:
            selectors[_key(ns, args[2])].update(patch["spec"]["selector"])
        return 0, f"service/{args[2]} patched\n"
    if verb == "patch" and args[1].startswith("deployment/"):
        if behaviour.get("fail_patch"):
            return 1, "Error from server (InternalError): etcdserver: request timed out\n"
        name = args[1].split("/", 1)[1]
        if _key(ns, name) not in state["deployments"]:
            return 1, f'Error from server (NotFound): deployments.apps "{name}" not found\n'
        patch = json.loads(args[args.index("-p") + 1])
        _set_template(state, ns, name, patch[0]["value"])
        return 0, f"deployment.apps/{name} patched\n"
    if verb == "scale":
        dep = state["deployments"].get(_key(ns, args[1].split("/", 1)[1]))
        if dep is None:
            return 1, f"Error from server (NotFound): {args[1]} not found\n"
        dep["replicas"] = int(args[2].split("=", 1)[1])
        return 0, f"{args[1]} scaled\n"
    if verb == "get" and args[1] == "endpoints":
        selector = state["services"].get(_key(ns, args[2]))
        if selector is None:
            return 0, ""
        addresses = []
        for key, dep in state["deployments"].items():
            labels = state["templates"][dep["template"]].get("metadata", {}).get("labels", {})
            ready = dep.get("rolled_out") and not _failing(behaviour, dep["image"])
            if key.startswith(f"{ns}/") and ready and selector.items() <= labels.items():
                pod = f"{key.split('/', 1)[1]}-{dep['template'][:6]}"
                addresses += [{"targetRef": {"name": f"{pod}-{i}"}} for i in range(dep["replicas"])]
        return 0, json.dumps({"subsets": [{"addresses": addresses}] if addresses else []})
    if verb == "port-forward":
        return 0, f"Forwarding from 127.0.0.1:{args[2].split(':')[0]} -> 8000\n"
    if verb == "set" and args[1] == "image":
        name = args[2].split("/", 1)[1]
        dep = state["deployments"][_key(ns, name)]
        template = json.loads(json.dumps(state["templates"][dep["template"]]))
        template["spec"]["containers"][0]["image"] = args[3].split("=", 1)[1]
        _set_template(state, ns, name, template)
        return 0, f"{args[2]} image updated\n"
    if verb == "rollout":
        action, target = args[1], args[2].split("/", 1)[1]
        dep = state["deployments"].get(_key(ns, target))
        if dep is None:
            return 1, f'Error from server (NotFound): deployments.apps "{target}" not found\n'
        if action == "status":
            if _failing(behaviour, dep["image"]):
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
            _set_template(state, ns, target, state["templates"][dep["history"][to]])
            return 0, f"deployment.apps/{target} rolled back\n"
        if action == "history":
            wanted = next((a.split("=", 1)[1] for a in args if a.startswith("--revision=")), None)
            if wanted is not None:
                if wanted not in dep["history"]:
                    return 1, f"error: unable to find the specified revision {wanted}\n"
                return 0, json.dumps(state["templates"][dep["history"][wanted]])
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
    if verb == "patch" and args[1] == "configmap":
        data = state["configmaps"].get(_key(ns, args[2]))
        if data is None:
            return 1, f'Error from server (NotFound): configmaps "{args[2]}" not found\n'
        data.update(json.loads(args[args.index("-p") + 1])["data"])
        return 0, f"configmap/{args[2]} patched\n"
    if verb == "get" and args[1] == "configmap":
        data = state["configmaps"].get(_key(ns, args[2]))
        if data is None:
            if "--ignore-not-found" in args:
                return 0, ""
            return 1, f'Error from server (NotFound): configmaps "{args[2]}" not found\n'
        return 0, json.dumps({"data": data})
    if verb == "delete":
        kind, name = (args[1], args[2]) if "/" not in args[1] else args[1].split("/", 1)
        stores = {"configmap": "configmaps", "job": "jobs", "deployment": "deployments"}
        stores.update(service="services")
        state[stores[kind]].pop(_key(ns, name), None)
        return 0, f"{kind} {name} deleted\n"
    if verb == "wait":
        name = args[2].split("/", 1)[1]
        if behaviour.get("fail_job"):
            return 1, f"error: timed out waiting for the condition on jobs/{name}\n"
        return 0, f"job.batch/{name} condition met\n"
    if verb == "get" and args[1] in ("pods", "events"):
        return 0, f"{args[1]} of {ns}\n"
    return 1, f"kubectl double: unsupported command {args}\n"

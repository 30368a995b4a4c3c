"""kubectl, as the deploy tasks use it: every command printed in a dry run, nothing run."""

from __future__ import annotations

import json
import select
import shutil
import subprocess  # nosec B404
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

LOCK = "ml-platform-deploy-lock"
#: libyaml's parser and emitter (PyYAML's wheels carry them): on a rendered overlay 8x and 5x
#: faster than the pure-Python ones, with the same documents and the same text.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load_documents(text: str) -> list[Any]:
    """The documents of a YAML stream (safe: plain data only), empty ones dropped."""
    return [document for document in yaml.load_all(text, Loader=_LOADER) if document]


def dump_documents(documents: Sequence[Any]) -> str:
    """A YAML stream of these documents (safe: plain data only)."""
    return yaml.dump_all(documents, Dumper=_DUMPER)


def dump_document(document: Any) -> str:
    return yaml.dump(document, Dumper=_DUMPER)


class KubeError(RuntimeError):
    """kubectl failed; the message has its last line of output."""


@dataclass
class Kubectl:
    namespace: str
    context: str | None = None
    dry_run: bool = False
    echo: Callable[[str], None] = print
    executable: str = "kubectl"
    commands: list[list[str]] = field(default_factory=list)
    #: How long a call may go unanswered beyond the wait it asks for (rollout status, wait):
    #: then it is killed and fails. An API server that takes the connection and never
    #: answers would otherwise hang the deploy until the CI job's timeout killed it, with
    #: nothing restored and no one told.
    timeout: float = 30.0

    def _argv(self, args: Sequence[str]) -> list[str]:
        argv = [self.executable]
        if self.context:
            argv += ["--context", self.context]
        return [*argv, "--namespace", self.namespace, *args]

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, waits: float = 0.0
    ) -> str:
        """Run kubectl; in a dry run, print the command instead (no cluster is contacted).
        ``waits``: the seconds the command itself waits (its ``--timeout``), on top of which
        it has ``timeout`` to answer."""
        argv = self._argv(args)
        self.commands.append(argv)
        if self.dry_run:
            self.echo("would run: " + " ".join(argv) + (" < rendered manifests" if stdin else ""))
            return ""
        ok, out, err = self._call(argv, stdin, waits)
        if check and not ok:
            detail = (err or out).strip().splitlines()
            raise KubeError(f"{' '.join(argv[:6])} …: {detail[-1] if detail else 'failed'}")
        return out

    def read(self, *args: str) -> tuple[bool, str]:
        """Run a kubectl command that only reads, for what it says either way: whether it
        succeeded, and its output with its errors (stderr after stdout)."""
        argv = self._argv(args)
        self.commands.append(argv)
        try:
            ok, out, err = self._call(argv, None, 0.0)
        except KubeError as exc:
            return False, str(exc)
        return ok, (out + err).strip()

    def _call(self, argv: list[str], stdin: str | None, waits: float) -> tuple[bool, str, str]:
        """kubectl's success, stdout and stderr; KubeError if it cannot be run or does not
        answer within ``waits`` + ``timeout`` seconds (it is killed then)."""
        limit = waits + self.timeout
        try:
            result = subprocess.run(  # nosec B603 - kubectl with arguments built here
                argv, input=stdin, capture_output=True, text=True, check=False, timeout=limit
            )
        except OSError as exc:  # not installed, not executable
            raise KubeError(f"kubectl could not be run: {exc}") from None
        except subprocess.TimeoutExpired:
            raise KubeError(
                f"{' '.join(argv[:6])} …: no answer within {limit:.0f} s (the cluster's API"
                " server is unreachable or stalled); kubectl was killed"
            ) from None
        return result.returncode == 0, result.stdout, result.stderr

    # -- deployments ------------------------------------------------------------------------

    def revision(self, deployment: str) -> int | None:
        """The deployment's current revision, or None if it does not exist yet."""
        out = self.run(
            "get",
            f"deployment/{deployment}",
            "--ignore-not-found",
            "-o",
            "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
        )
        return int(out) if out.strip().isdigit() else None

    def deployment(self, name: str) -> dict[str, Any] | None:
        """The Deployment as the API server has it, or None if it does not exist."""
        out = self.run("get", f"deployment/{name}", "--ignore-not-found", "-o", "json")
        if not out.strip():
            return None
        found: dict[str, Any] = json.loads(out)
        return found

    def template(self, deployment: str) -> dict[str, Any] | None:
        """The deployment's pod template (images, config, labels), or None if it does not exist."""
        found = self.deployment(deployment)
        return None if found is None else dict(found["spec"]["template"])

    def scale(self, deployment: str, replicas: int) -> None:
        self.run("scale", f"deployment/{deployment}", f"--replicas={replicas}")

    def set_template(self, deployment: str, template: dict[str, Any]) -> None:
        """Give the deployment exactly this pod template (a rollout if it differs)."""
        patch = [{"op": "replace", "path": "/spec/template", "value": template}]
        self.run("patch", f"deployment/{deployment}", "--type", "json", "-p", json.dumps(patch))

    def revision_template(self, deployment: str, revision: int) -> dict[str, Any]:
        """The pod template of one revision in the deployment's rollout history."""
        out = self.run(
            "rollout", "history", f"deployment/{deployment}", f"--revision={revision}", "-o", "json"
        )
        template: dict[str, Any] = json.loads(out) if out.strip() else {}
        template = template.get("spec", {}).get("template", template)  # a ReplicaSet, or bare
        return template

    def revisions(self, deployment: str) -> list[int]:
        """The revision numbers in the deployment's rollout history, oldest first."""
        out = self.run("rollout", "history", f"deployment/{deployment}")
        return sorted(int(line.split()[0]) for line in out.splitlines() if line[:1].isdigit())

    def selector(self, service: str) -> dict[str, str] | None:
        out = self.run("get", "service", service, "--ignore-not-found", "-o", "json")
        if not out.strip():
            return None
        selector: dict[str, str] = json.loads(out).get("spec", {}).get("selector") or {}
        return selector

    def set_selector(self, service: str, selector: dict[str, str]) -> None:
        """Give the Service exactly this selector (a merge patch could only add keys)."""
        patch = [{"op": "replace", "path": "/spec/selector", "value": selector}]
        self.run("patch", "service", service, "--type", "json", "-p", json.dumps(patch))

    def delete(self, kind: str, name: str) -> None:
        self.run("delete", f"{kind}/{name}", "--ignore-not-found")

    def apply(self, manifests: str) -> None:
        self.run("apply", "-f", "-", stdin=manifests)

    def rollout_status(self, deployment: str, timeout: int) -> bool:
        out = self.run(
            "rollout",
            "status",
            f"deployment/{deployment}",
            f"--timeout={timeout}s",
            check=False,
            waits=timeout,
        )
        return self.dry_run or "successfully rolled out" in out

    def undo(self, deployment: str, to_revision: int | None = None) -> None:
        args = ["rollout", "undo", f"deployment/{deployment}"]
        if to_revision is not None:
            args.append(f"--to-revision={to_revision}")
        self.run(*args)

    def run_job(self, manifest: str, name: str, timeout: int) -> bool:
        self.run("delete", f"job/{name}", "--ignore-not-found")
        self.apply(manifest)
        out = self.run(
            "wait",
            "--for=condition=complete",
            f"job/{name}",
            f"--timeout={timeout}s",
            check=False,
            waits=timeout,
        )
        return self.dry_run or "condition met" in out

    @contextmanager
    def port_forward(self, service: str, port: int = 18080) -> Iterator[str]:
        """A local URL to a Service (how a preview is checked before it gets traffic)."""
        argv = self._argv(["port-forward", f"service/{service}", f"{port}:80"])
        if self.dry_run:
            self.echo("would run: " + " ".join(argv))
            yield f"http://127.0.0.1:{port}"
            return
        process = subprocess.Popen(  # nosec B603 - kubectl with arguments built here
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            # "Forwarding from 127.0.0.1:PORT -> 8000", within the time any call has.
            if (
                process.stdout is None
                or not select.select([process.stdout], [], [], self.timeout)[0]
            ):
                raise KubeError(
                    f"kubectl port-forward service/{service}: no answer within"
                    f" {self.timeout:.0f} s (the cluster's API server is unreachable or stalled)"
                )
            process.stdout.readline()
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=10)

    # -- the environment's lock -------------------------------------------------------------

    def lock(self, owner: str) -> None:
        """Take the deploy lock (a ConfigMap: creating it fails if another deploy holds it)."""
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            self.run(
                "create",
                "configmap",
                LOCK,
                f"--from-literal=owner={owner}",
                f"--from-literal=since={since}",
            )
        except KubeError as exc:
            if "AlreadyExists" not in str(exc) and "already exists" not in str(exc):
                raise
            holder = json.loads(self.run("get", "configmap", LOCK, "-o", "json"))
            data = holder.get("data", {})
            taken = datetime.strptime(data.get("since", since), "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=UTC
            )
            minutes = (datetime.now(UTC) - taken).total_seconds() / 60
            raise KubeError(
                f"{self.namespace} is locked by {data.get('owner', '?')} for {minutes:.0f} min; "
                f"if that deploy is dead: kubectl -n {self.namespace} delete configmap {LOCK}"
            ) from None

    def unlock(self) -> None:
        self.run("delete", "configmap", LOCK, "--ignore-not-found")


def render(overlay: Path, image: str, tag: str) -> str:
    """The overlay rendered by kustomize with the image tag set (the repository is not touched)."""
    root = overlay.parent.parent  # k8s/
    with tempfile.TemporaryDirectory(prefix="mlp-render-") as tmp:
        copy = Path(tmp) / "k8s"
        shutil.copytree(root, copy)
        deploy = copy / "deploy"
        deploy.mkdir()
        (deploy / "kustomization.yaml").write_text(
            dump_document(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    "resources": [f"../overlays/{overlay.name}"],
                    "images": [{"name": image, "newTag": tag}],
                }
            )
        )
        result = subprocess.run(  # nosec B603 B607 - kubectl kustomize of our own files
            ["kubectl", "kustomize", str(deploy)], capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        raise KubeError(f"kustomize {overlay}: {result.stderr.strip().splitlines()[-1:]}")
    return result.stdout


def split(manifests: str, kinds: Sequence[str]) -> tuple[str, str]:
    """(documents of these kinds, all the others), as YAML streams."""
    chosen: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    for document in load_documents(manifests):
        (chosen if document.get("kind") in kinds else rest).append(document)
    return dump_documents(chosen), dump_documents(rest)

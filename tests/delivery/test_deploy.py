"""Deploys, rollbacks and their guards, against a kubectl double that keeps real state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from delivery import kube as manifests_io
from delivery import notify
from delivery.deploy import (
    DeployError,
    check_allowed,
    deploy,
    report_history,
    report_status,
    rollback,
    worst_case_seconds,
)
from delivery.environments import EnvironmentError_, load_environment
from delivery.kube import LOCK, Kubectl, KubeError, render
from tests.delivery.kubectl_double import Double

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
IMAGE = "ghcr.io/ml-platform/ml-platform"
CONFIG: dict[str, Any] = {
    "environments": {
        "staging": {
            "cluster": "ml-platform-staging",
            "namespace": "staging",
            "url": "https://staging.ml-platform.example.com",
            "region": "us-east-1",
            "approval": False,
            "branches": ["main"],
            "overlay": str(ROOT / "k8s/overlays/staging"),
            "rollout_timeout": 30,
        },
        "production": {
            "cluster": "ml-platform-production",
            "namespace": "production",
            "url": "https://ml-platform.example.com",
            "region": "us-east-1",
            "approval": True,
            "branches": ["main"],
            "overlay": str(ROOT / "k8s/overlays/production"),
            "rollout_timeout": 30,
        },
    }
}


@dataclass
class Cluster:
    state_file: Path

    @property
    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_file.read_text())
        return data

    def behave(self, **behaviour: object) -> None:
        state = self.state if self.state_file.exists() else {}
        state.setdefault("behaviour", {}).update(behaviour)
        self.state_file.write_text(json.dumps(state))

    def image(self, name: str = "ml-platform") -> str:
        image: str = self.state["deployments"][f"staging/{name}"]["image"]
        return image


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    real = shutil.which("kubectl")
    if real is None:
        pytest.fail("kubectl (the client, for kustomize) is not installed", pytrace=False)
    double = Double(tmp_path / "cluster.json")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "kubectl"
    # The client is test code, not measured: no coverage, no site-packages (kubectl_client.py).
    shim.write_text(
        "#!/bin/sh\nunset COVERAGE_PROCESS_CONFIG COVERAGE_PROCESS_START\n"
        f'exec {sys.executable} -S -I {ROOT}/tests/delivery/kubectl_client.py "$@"\n'
    )
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KUBECTL_REAL", real)
    monkeypatch.setenv("KUBECTL_DOUBLE_SOCKET", double.socket_path)
    yield Cluster(tmp_path / "cluster.json")
    double.close()


def unlocked(cluster: Cluster, namespace: str = "staging") -> bool:
    """The deploy lock is free (other ConfigMaps, such as the verified images, may exist)."""
    return f"{namespace}/{LOCK}" not in cluster.state["configmaps"]


def kube(namespace: str = "staging", dry_run: bool = False) -> Kubectl:
    return Kubectl(namespace, "ml-platform-staging", dry_run=dry_run, echo=lambda _m: None)


def staging_deploy(tag: str, smoke_ok: bool = True, client: Kubectl | None = None) -> Any:
    env = load_environment(CONFIG, "staging")
    return deploy(
        env,
        client or kube(),
        image=IMAGE,
        tag=tag,
        owner="tester",
        smoke=lambda url: smoke_ok,
        say=lambda _m: None,
    )


def test_a_good_rolling_deploy_then_another(cluster: Cluster) -> None:
    first = staging_deploy("main-1111111")
    assert first.succeeded and not first.rolled_back
    assert cluster.image() == f"{IMAGE}:main-1111111"
    assert cluster.image("ml-platform-worker") == f"{IMAGE}:main-1111111"
    second = staging_deploy("main-2222222")
    assert second.succeeded
    state = cluster.state
    assert state["deployments"]["staging/ml-platform"]["revision"] == 2
    assert unlocked(cluster)  # the lock was released
    verbs = [" ".join(cmd[4:6]) for cmd in state["log"]]
    # The migration job runs before the deployments are applied.
    assert verbs.index("wait --for=condition=complete") < verbs.index("rollout status")


def test_a_rollout_past_its_deadline_is_rolled_back(cluster: Cluster) -> None:
    staging_deploy("main-1111111")
    cluster.behave(fail_rollout_of_image="main-bad0000")
    outcome = staging_deploy("main-bad0000")
    assert not outcome.succeeded and outcome.rolled_back
    assert "wait: deployment/ml-platform did not roll out in time" in outcome.message
    assert cluster.image() == f"{IMAGE}:main-1111111"
    assert unlocked(cluster)


def test_failed_smoke_tests_roll_back(cluster: Cluster) -> None:
    staging_deploy("main-1111111")
    outcome = staging_deploy("main-2222222", smoke_ok=False)
    assert outcome.rolled_back and "smoke tests failed" in outcome.message
    assert cluster.image() == f"{IMAGE}:main-1111111"
    assert cluster.image("ml-platform-worker") == f"{IMAGE}:main-1111111"


def test_rollback_to_a_revision_puts_every_deployment_on_that_release(cluster: Cluster) -> None:
    for tag in ("main-1111111", "main-2222222", "main-3333333"):
        staging_deploy(tag)
    # The worker's revision numbers differ from the API's (it was restarted once on its own).
    state = cluster.state
    state["deployments"]["staging/ml-platform-worker"]["revision"] += 5
    cluster.state_file.write_text(json.dumps(state))
    env = load_environment(CONFIG, "staging")
    back = rollback(env, kube(), owner="tester", to_revision=1, say=lambda _m: None)
    assert back.succeeded, back.message
    assert cluster.image() == cluster.image("ml-platform-worker") == f"{IMAGE}:main-1111111"
    previous = rollback(env, kube(), owner="tester", say=lambda _m: None)
    assert previous.succeeded  # the API's previous revision: main-3333333, and the worker too
    assert cluster.image() == cluster.image("ml-platform-worker") == f"{IMAGE}:main-3333333"
    missing = rollback(env, kube(), owner="tester", to_revision=99, say=lambda _m: None)
    assert not missing.succeeded and "has no revision 99" in missing.message
    assert cluster.image() == f"{IMAGE}:main-3333333" and unlocked(cluster)


def test_a_second_deploy_is_refused_while_one_holds_the_lock(cluster: Cluster) -> None:
    staging_deploy("main-1111111")
    holder = kube()
    holder.lock("alice (run 42)")
    with pytest.raises(KubeError, match=r"staging is locked by alice \(run 42\) for 0 min"):
        staging_deploy("main-2222222")
    assert cluster.image() == f"{IMAGE}:main-1111111"
    holder.unlock()
    assert staging_deploy("main-2222222").succeeded


def test_a_failed_migration_rolls_nothing_out(cluster: Cluster) -> None:
    staging_deploy("main-1111111")
    cluster.behave(fail_job=True)
    outcome = staging_deploy("main-2222222")
    assert not outcome.succeeded and "migration job did not complete" in outcome.message
    assert cluster.image() == f"{IMAGE}:main-1111111"
    assert LOCK not in json.dumps(cluster.state["configmaps"])


def test_production_needs_main_and_an_approval_before_any_change(cluster: Cluster) -> None:
    production = load_environment(CONFIG, "production")
    with pytest.raises(DeployError, match="production deploys only from main; this is feature/x"):
        check_allowed(production, "feature/x", approved=True)
    with pytest.raises(DeployError, match="needs an approval"):
        check_allowed(production, "main", approved=False)
    check_allowed(production, "main", approved=True)
    assert not cluster.state_file.exists()  # nothing reached the cluster


def test_status_and_history_read_what_they_can_and_end_with_a_verdict(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`invoke status` and `invoke history` printed a traceback when a read failed (no such
    deployment, no cluster, no kubectl) and exited 0 on an unhealthy environment."""
    staging = load_environment(CONFIG, "staging")
    printed: list[str] = []
    assert not report_status(staging, kube(), printed.append)  # nothing deployed yet
    assert printed[-1].startswith("staging: NOT healthy: deployment/ml-platform: Error from server")
    assert "== pods\npods of staging" in printed  # the other reads went on

    assert staging_deploy("main-1111111").succeeded
    printed.clear()
    assert report_status(staging, kube(), printed.append)
    assert printed[-1] == "staging: every deployment rolled out (ml-platform, ml-platform-worker)"
    printed.clear()
    assert report_history(staging, kube(), printed.append)
    assert printed[0].startswith("== deployment/ml-platform\nREVISION")
    assert printed[-1] == "staging: history read"

    missing = Kubectl("staging", executable=str(tmp_path / "kubectl"))
    printed.clear()
    assert not report_status(staging, missing, printed.append)
    assert printed[-1].startswith(
        "staging: the cluster could not be read: kubectl could not be run:"
    )
    with pytest.raises(KubeError, match="kubectl could not be run"):
        missing.run("get", "pods")


def test_a_dry_run_prints_the_plan_and_changes_nothing(cluster: Cluster) -> None:
    printed: list[str] = []
    client = Kubectl("staging", "ml-platform-staging", dry_run=True, echo=printed.append)
    staging_deploy("main-1111111", client=client)
    assert not cluster.state_file.exists()
    assert any("create configmap ml-platform-deploy-lock" in line for line in printed)
    assert any("rollout status deployment/ml-platform --timeout=30s" in line for line in printed)


def test_the_invoke_tasks(cluster: Cluster) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "invoke", "--list"], cwd=ROOT, capture_output=True, text=True
    )
    for name in (
        "deploy",
        "promote",
        "abort",
        "decommission",
        "rollback",
        "status",
        "history",
        "smoke",
        "notify",
    ):
        assert f"  {name} " in listed.stdout
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "invoke",
            "deploy",
            "--env",
            "staging",
            "--dry-run",
            "--image-tag",
            "X",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert plan.returncode == 0, plan.stderr
    assert (
        "would run: kubectl --context ml-platform-staging --namespace staging apply -f -"
        in plan.stdout
    )
    assert "nothing changed" in plan.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "invoke", "deploy", "--env", "qa"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert unknown.returncode == 2 and "no environment 'qa'" in unknown.stderr + unknown.stdout


def test_manifests_are_read_and_written_by_libyaml_safely_and_as_before() -> None:
    """A deploy reads and writes the rendered overlay a few hundred times: with libyaml's
    parser and emitter (8x and 5x faster here), still the safe subset, and the same
    documents and text as PyYAML's own."""
    manifests = render(ROOT / "k8s/overlays/staging", IMAGE, "v1.2.3")
    if yaml.__with_libyaml__:
        assert manifests_io._LOADER is yaml.CSafeLoader and manifests_io._DUMPER is yaml.CSafeDumper
    documents = manifests_io.load_documents(manifests)
    assert documents == [d for d in yaml.safe_load_all(manifests) if d] and len(documents) > 5
    assert manifests_io.dump_documents(documents) == yaml.safe_dump_all(documents)
    assert manifests_io.dump_document(documents[0]) == yaml.safe_dump(documents[0])
    with pytest.raises(yaml.constructor.ConstructorError):
        manifests_io.load_documents("--- !!python/object/apply:os.system ['true']\n")


def test_environment_validation() -> None:
    with pytest.raises(EnvironmentError_, match="no environment 'qa'"):
        load_environment(CONFIG, "qa")
    broken = {"environments": {"x": {**CONFIG["environments"]["staging"], "url": "staging"}}}
    with pytest.raises(EnvironmentError_, match="is not an http"):
        load_environment(broken, "x")
    missing = {"environments": {"x": {"namespace": "x"}}}
    with pytest.raises(EnvironmentError_, match="needs cluster, url, region, overlay"):
        load_environment(missing, "x")
    from_env = {
        "environments": {
            "x": {
                **CONFIG["environments"]["staging"],
                "approval": "true",
                "branches": "main,release",
            }
        }
    }
    parsed = load_environment(from_env, "x")
    assert parsed.approval and parsed.branches == ("main", "release")


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, Any]]] = []
    status = 202

    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Receiver.received.append((self.path, body))
        self.send_response(_Receiver.status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    _Receiver.received = []
    _Receiver.status = 202
    server = _serving(_Receiver)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _serving(handler: type[BaseHTTPRequestHandler]) -> HTTPServer:
    """An HTTP server on a free port, served by a thread. Its listening socket does not block:
    a client that gives up between the server's select and its accept (a killed deploy) would
    otherwise leave accept() waiting for ever, and shutdown() with it."""
    server = HTTPServer(("127.0.0.1", 0), handler)
    server.socket.setblocking(False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_notifications_reach_slack_and_pagerduty_and_never_raise(receiver: str) -> None:
    env = {
        "SLACK_WEBHOOK": f"{receiver}/slack",
        "PAGERDUTY_TOKEN": "routing-key",
        "PAGERDUTY_EVENTS_URL": f"{receiver}/pagerduty",
    }
    said: list[str] = []
    failed = notify.Event("deploy-failed", "production", "smoke tests failed", "https://x")
    assert notify.send(failed, env, said.append) == {
        "slack": "sent",
        "pagerduty": "sent",
        "email": "skipped: SMTP_HOST and SMTP_TO are not set",
    }
    received = dict(_Receiver.received)
    assert "deploy-failed on production" in received["/slack"]["text"]
    assert received["/slack"]["blocks"][1]["elements"][0]["text"] == "https://x"
    pd = received["/pagerduty"]
    assert pd["event_action"] == "trigger" and pd["routing_key"] == "routing-key"
    assert pd["dedup_key"] == "ml-platform-production-deploy"
    _Receiver.status = 500
    results = notify.send(failed, env, said.append)
    assert results["slack"].startswith("FAILED: HTTPStatusError")
    assert notify.send(failed, {}, said.append) == {
        "slack": "skipped: SLACK_WEBHOOK is not set",
        "pagerduty": "skipped: PAGERDUTY_TOKEN is not set",
        "email": "skipped: SMTP_HOST and SMTP_TO are not set",
    }
    assert "notify slack: skipped: SLACK_WEBHOOK is not set" in said


@pytest.mark.parametrize(
    ("kind", "channels"),
    [
        ("build-failed", {"/slack"}),  # and e-mail: not configured here
        ("security-alert", {"/pagerduty"}),
        ("deploy-succeeded", {"/slack", "/pagerduty"}),  # PagerDuty: only the resolve
        ("deploy-failed", {"/slack", "/pagerduty"}),
        ("restore-failed", {"/slack", "/pagerduty"}),
    ],
)
def test_events_go_where_the_spec_routes_them(receiver: str, kind: str, channels: set[str]) -> None:
    env = {
        # Secrets pasted with a trailing newline or spaces still work.
        "SLACK_WEBHOOK": f" {receiver}/slack\n",
        "PAGERDUTY_TOKEN": "routing-key\n",
        "PAGERDUTY_EVENTS_URL": f"{receiver}/pagerduty",
    }
    results = notify.send(notify.Event(kind, "staging", "summary"), env, lambda _m: None)
    assert {path for path, _ in _Receiver.received} == channels, results
    for path, body in _Receiver.received:
        if path == "/pagerduty":
            action = "resolve" if kind == "deploy-succeeded" else "trigger"
            assert body["event_action"] == action and body["routing_key"] == "routing-key"


def test_incidents_are_kept_apart_by_environment_and_class(receiver: str) -> None:
    env = {"PAGERDUTY_TOKEN": "key", "PAGERDUTY_EVENTS_URL": f"{receiver}/pagerduty"}
    for kind, where in [
        ("security-alert", "production"),
        ("deploy-failed", "production"),
        ("deploy-failed", "staging"),
        ("deploy-succeeded", "production"),
    ]:
        notify.send(notify.Event(kind, where, "x"), env, lambda _m: None)
    keys = [(body["event_action"], body["dedup_key"]) for _, body in _Receiver.received]
    assert keys == [
        ("trigger", "ml-platform-production-security"),
        ("trigger", "ml-platform-production-deploy"),
        ("trigger", "ml-platform-staging-deploy"),
        ("resolve", "ml-platform-production-deploy"),  # the security incident stays open
    ]


def test_a_broken_webhook_setting_is_one_line_and_never_fails_anything() -> None:
    said: list[str] = []
    results = notify.send(
        notify.Event("deploy-succeeded", "staging", "ok"),
        {"SLACK_WEBHOOK": "hooks.slack.com/services/x y"},
        said.append,
    )
    assert results == {"slack": "skipped: SLACK_WEBHOOK is not an http(s) URL"}
    assert said == ["notify slack: skipped: SLACK_WEBHOOK is not an http(s) URL"]


def _live_images(client: Kubectl, service: str = "ml-platform") -> set[str]:
    """The images of the pods a Service reaches now (what its users get)."""
    out = json.loads(client.run("get", "endpoints", service, "-o", "json") or "{}")
    pods = [a["targetRef"]["name"] for sub in out.get("subsets", []) for a in sub["addresses"]]
    images = set()
    for name in ("ml-platform", "ml-platform-blue", "ml-platform-green"):
        template = client.template(name)
        if template and any(
            p.startswith(f"{name}-") and p.count("-") == name.count("-") + 2 for p in pods
        ):
            images.add(template["spec"]["containers"][0]["image"])
    return images


def test_blue_green_never_moves_live_traffic_before_promote(cluster: Cluster) -> None:
    from delivery import bluegreen

    env = load_environment(CONFIG, "staging")
    client = kube()
    staging_deploy("main-1111111")  # a namespace that ran rolling deploys
    old = {f"{IMAGE}:main-1111111"}
    assert _live_images(client) == old
    previews: list[set[str]] = []

    def preview(url: str, ok: bool = True) -> bool:
        previews.append(_live_images(client, "ml-platform-preview"))  # what the check reaches
        assert _live_images(client) == old  # and live users still get the old release
        return ok

    def idle(tag: str, ok: bool = True) -> Any:
        return bluegreen.deploy_idle(
            env,
            kube(),
            image=IMAGE,
            tag=tag,
            owner="tester",
            preview_smoke=lambda url: preview(url, ok),
            say=lambda _m: None,
        )

    # A bad build: its rollout fails. Live never moved; everything recorded is back.
    cluster.behave(fail_rollout_of_image="main-bad0000")
    bad = idle("main-bad0000")
    assert not bad.succeeded and bad.rolled_back, bad.message
    assert _live_images(client) == old and unlocked(cluster)
    deployments = cluster.state["deployments"]
    assert deployments["staging/ml-platform"]["replicas"] == 2  # the adoption is undone too
    assert "staging/ml-platform-blue" not in deployments
    assert "staging/ml-platform-green" not in deployments
    assert client.selector("ml-platform") == {
        "app.kubernetes.io/name": "ml-platform",
        "app.kubernetes.io/component": "api",
    }
    # A build that rolls out but fails its preview: the check reached the new pods, not live.
    unhealthy = idle("main-2222222", ok=False)
    assert not unhealthy.succeeded and unhealthy.rolled_back
    assert previews == [{f"{IMAGE}:main-2222222"}] and _live_images(client) == old
    # Promote with nothing deployed behind the preview: refused, nothing switched.
    with pytest.raises(DeployError, match="no blue-green deployment to promote"):
        bluegreen.promote(env, kube(), owner="tester", live_smoke=lambda: True)
    # A good build: live stays on the old release until promote.
    good = idle("main-3333333")
    assert good.succeeded and "green runs" in good.message, good.message
    assert previews[-1] == {f"{IMAGE}:main-3333333"} and _live_images(client) == old
    assert (client.selector("ml-platform") or {})["app.kubernetes.io/colour"] == "blue"  # adopted
    promoted = bluegreen.promote(env, kube(), owner="tester", live_smoke=lambda: True)
    assert promoted.succeeded, promoted.message
    assert _live_images(client) == {f"{IMAGE}:main-3333333"}
    assert cluster.image("ml-platform-worker") == f"{IMAGE}:main-3333333"
    old = {f"{IMAGE}:main-3333333"}  # what users must keep getting from here on
    # Once the old colour is decommissioned, there is nothing to promote: refused.
    assert bluegreen.decommission(env, kube(), owner="tester").succeeded
    with pytest.raises(DeployError, match="absent or scaled to 0"):
        bluegreen.promote(env, kube(), owner="tester", live_smoke=lambda: True)
    # The next release passes its preview but fails after the switch: switched back.
    assert idle("main-4444444").succeeded
    failed = bluegreen.promote(env, kube(), owner="tester", live_smoke=lambda: False)
    assert not failed.succeeded and failed.rolled_back, failed.message
    assert _live_images(client) == {f"{IMAGE}:main-3333333"}
    assert cluster.image("ml-platform-worker") == f"{IMAGE}:main-3333333"
    assert bluegreen.abort(env, kube(), owner="tester").succeeded
    assert cluster.state["deployments"]["staging/ml-platform-blue"]["replicas"] == 0
    assert unlocked(cluster)


def test_a_preview_whose_port_forward_never_answers_fails_in_time(cluster: Cluster) -> None:
    """`kubectl port-forward` to the preview that never says it forwards (a stalled API
    server) fails after kubectl_timeout: the blue-green deploy restores and the lock is
    released, instead of waiting on the port-forward's first line for good."""
    from delivery import bluegreen

    staging_deploy("main-1111111")
    client = kube()
    client.timeout = 2
    cluster.behave(slow={"port-forward": 40})
    began = time.monotonic()
    outcome = bluegreen.deploy_idle(
        load_environment(CONFIG, "staging"),
        client,
        image=IMAGE,
        tag="main-2222222",
        owner="tester",
        preview_smoke=lambda url: True,
        say=lambda _m: None,
    )
    assert time.monotonic() - began < 30
    assert not outcome.succeeded and outcome.rolled_back, outcome.message
    assert "port-forward service/ml-platform-preview: no answer within 2 s" in outcome.message
    assert _live_images(client) == {f"{IMAGE}:main-1111111"} and unlocked(cluster)


def test_a_first_blue_green_release_goes_live_only_after_its_preview(cluster: Cluster) -> None:
    from delivery import bluegreen

    env = load_environment(CONFIG, "staging")
    client = kube()
    seen: list[set[str]] = []

    def check(url: str) -> bool:
        seen.append(_live_images(client, "ml-platform-preview"))
        assert client.selector("ml-platform") is None  # nothing live during the check
        return True

    first = bluegreen.deploy_idle(
        env, client, image=IMAGE, tag="main-1111111", owner="t", preview_smoke=check, say=print
    )
    assert first.succeeded and "the first release" in first.message, first.message
    assert seen == [{f"{IMAGE}:main-1111111"}]
    assert _live_images(client) == {f"{IMAGE}:main-1111111"}
    assert cluster.image("ml-platform-worker") == f"{IMAGE}:main-1111111"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_email_goes_through_starttls_or_not_at_all(tmp_path: Path) -> None:
    from aiosmtpd.controller import Controller

    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(tmp_path / "key.pem"),
            "-out",
            str(tmp_path / "cert.pem"),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    received: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            received.append(envelope)
            return "250 OK"

    port = _free_port()
    controller = Controller(
        Handler(), hostname="127.0.0.1", port=port, tls_context=tls, require_starttls=True
    )
    controller.start()
    event = notify.Event("deploy-failed", "production", "smoke tests failed", "https://x")
    env = {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(port),
        "SMTP_TO": "oncall@example.com",
        "SMTP_CA_FILE": str(tmp_path / "cert.pem"),
    }
    try:
        assert notify.send_email(event, env) == "sent"
    finally:
        controller.stop()
    [envelope] = received
    assert envelope.rcpt_tos == ["oncall@example.com"]
    assert b"Subject: [ml-platform] deploy-failed on production" in envelope.content
    plain_port = _free_port()
    plain = Controller(Handler(), hostname="127.0.0.1", port=plain_port)
    plain.start()
    try:
        refused = notify.send_email(event, {**env, "SMTP_PORT": str(plain_port)})
    finally:
        plain.stop()
    assert refused == "FAILED: the server does not offer STARTTLS; not sending in clear text"
    assert len(received) == 1


def invoke_task(
    cluster: Cluster,
    receiver: str,
    *args: str,
    extra_env: dict[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[str]:
    """`invoke ARGS` as CI runs it: against the kubectl double, notifying the local receiver."""
    env = {
        **os.environ,
        "SLACK_WEBHOOK": f"{receiver}/slack",
        "PAGERDUTY_TOKEN": "routing-key",
        "PAGERDUTY_EVENTS_URL": f"{receiver}/pagerduty",
        "INVOKE_ENVIRONMENTS_STAGING_ROLLOUT_TIMEOUT": "30",
        "INVOKE_ENVIRONMENTS_STAGING_SMOKE_TIMEOUT": "30",
        **(extra_env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "invoke", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def test_a_partly_refused_apply_restores_what_it_had_changed(cluster: Cluster) -> None:
    staging_deploy("main-1111111")
    cluster.behave(reject_apply_of="ml-platform-worker")  # the API is applied, then a refusal
    outcome = staging_deploy("main-2222222")
    assert not outcome.succeeded and outcome.rolled_back, outcome.message
    assert "admission webhook denied" in outcome.message
    assert cluster.image() == cluster.image("ml-platform-worker") == f"{IMAGE}:main-1111111"
    assert cluster.state["services"]["staging/ml-platform"] == {
        "app.kubernetes.io/name": "ml-platform",
        "app.kubernetes.io/component": "api",
    }
    assert unlocked(cluster)


def test_a_restore_that_fails_pages_says_what_is_live_and_exits_1(
    cluster: Cluster, receiver: str
) -> None:
    staging_deploy("main-1111111")
    # The new release never rolls out, and the old one does not come back either.
    cluster.behave(fail_rollout_of_image=["main-2222222", "main-1111111"])
    task = invoke_task(
        cluster, receiver, "deploy", "--env", "staging", "--image-tag", "main-2222222"
    )
    out, _ = task.communicate(timeout=120)
    assert task.returncode == 1, out
    assert "the restore FAILED (paged)" in out and "live now: deployment/ml-platform:" in out
    page = dict(_Receiver.received)["/pagerduty"]
    assert page["event_action"] == "trigger" and page["payload"]["severity"] == "critical"
    assert "restore-failed on staging" in page["payload"]["summary"]
    assert "did not roll back" in page["payload"]["summary"]
    assert "restore-failed on staging" in dict(_Receiver.received)["/slack"]["text"]
    assert unlocked(cluster)  # the lock is released, last


def test_a_stalled_api_server_fails_the_deploy_in_time_and_what_was_live_stays(
    cluster: Cluster, receiver: str
) -> None:
    """The cluster's API server takes kubectl's connections and stops answering when the
    deploy applies: the call gives up after the environment's kubectl_timeout (killed), the
    deploy fails, what was live stays live, the lock is released and people are told. Before,
    the deploy waited as long as the API server did, and a CI job's timeout would have
    killed it there: nothing restored, no one told, the lock held."""
    staging_deploy("main-1111111")
    cluster.behave(slow={"apply": 40})
    task = invoke_task(
        cluster,
        receiver,
        *("deploy", "--env", "staging", "--image-tag", "main-2222222"),
        extra_env={"INVOKE_ENVIRONMENTS_STAGING_KUBECTL_TIMEOUT": "2"},
    )
    try:
        out, _ = task.communicate(timeout=30)
    finally:
        task.kill()
    assert task.returncode == 1, out
    assert "no answer within 2 s" in out and "kubectl was killed" in out, out
    assert cluster.image() == cluster.image("ml-platform-worker") == f"{IMAGE}:main-1111111"
    assert unlocked(cluster)
    assert "no answer within 2 s" in dict(_Receiver.received)["/slack"]["text"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_deploy_stopped_by_a_signal_restores_verifies_and_tells(
    cluster: Cluster, receiver: str, signum: signal.Signals
) -> None:
    staging_deploy("main-1111111")
    cluster.behave(slow={"rollout": 2})  # every rollout takes 2 s: time to be interrupted
    busy = cluster.state_file.with_suffix(".busy")
    task = invoke_task(
        cluster, receiver, "deploy", "--env", "staging", "--image-tag", "main-2222222"
    )
    deadline = time.monotonic() + 60
    while not (busy.exists() and "rollout status" in busy.read_text()):
        assert time.monotonic() < deadline and task.poll() is None, "the deploy never rolled out"
        time.sleep(0.05)
    task.send_signal(signum)  # a cancelled CI job
    out, _ = task.communicate(timeout=60)
    assert task.returncode == 1, out
    assert f"stopped by {signum.name}" in out and "what was live is back" in out
    assert cluster.image() == cluster.image("ml-platform-worker") == f"{IMAGE}:main-1111111"
    assert unlocked(cluster)
    received = dict(_Receiver.received)
    assert f"stopped by {signum.name}" in received["/slack"]["text"]
    assert received["/pagerduty"]["event_action"] == "trigger"


def test_the_ci_jobs_outlast_the_deploys_they_run() -> None:
    """A job killed by its timeout in the middle of a restore would leave anything live."""
    config = yaml.safe_load((ROOT / "invoke.yaml").read_text())
    workflow = yaml.safe_load((ROOT / ".github/workflows/ci-cd.yml").read_text())
    for name in ("staging", "production"):
        env = load_environment(config, name)
        job = workflow["jobs"][f"deploy-{name}"]
        # Five minutes for checkout and set-up besides the deploy's own worst case.
        assert job["timeout-minutes"] * 60 >= worst_case_seconds(env) + 300, name


class _Platform(BaseHTTPRequestHandler):
    """A platform's /readyz and /metrics: ``errors`` 5xx appear once the release is out."""

    errors = 0
    scrapes = 0

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if self.path == "/readyz":
            body = b'{"status":"ready"}'
        else:
            _Platform.scrapes += 1
            bad = _Platform.errors if _Platform.scrapes > 1 else 0
            counter = 'mlp_http_responses_total{instance="p",status_class="%s"} %d\n'
            body = (
                counter % ("2xx", 100 * _Platform.scrapes)
                + counter % ("5xx", bad)
                + "mlp_lease_expiries_total 0\n"
            ).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("errors", "succeeds"), [(0, True), (90, False)])
def test_the_watch_window_restores_a_release_that_starts_failing(
    cluster: Cluster, errors: int, succeeds: bool
) -> None:
    _Platform.errors, _Platform.scrapes = errors, 0
    server = _serving(_Platform)
    watched = {
        **CONFIG["environments"]["staging"],
        "url": f"http://127.0.0.1:{server.server_address[1]}",
        "watch_seconds": 1,
        "watch_interval": 0,
    }
    env = load_environment({"environments": {"staging": watched}}, "staging")
    try:
        staging_deploy("main-1111111")
        said: list[str] = []
        outcome = deploy(
            env,
            kube(),
            image=IMAGE,
            tag="main-2222222",
            owner="t",
            smoke=lambda u: True,
            say=said.append,
        )
    finally:
        server.shutdown()
    assert outcome.succeeded is succeeds, outcome.message
    if succeeds:
        assert cluster.image() == f"{IMAGE}:main-2222222"
        assert any(line.startswith("watched http://127.0.0.1") for line in said)
    else:
        assert "watch: 90 of " in outcome.message and outcome.rolled_back
        assert cluster.image() == cluster.image("ml-platform-worker") == f"{IMAGE}:main-1111111"


def test_production_takes_only_what_staging_verified(cluster: Cluster, receiver: str) -> None:
    refused = invoke_task(
        cluster,
        receiver,
        "deploy",
        "--env",
        "production",
        "--image-tag",
        "main-7777777",
        "--approve",
    )
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode == 1, out
    assert "refused: main-7777777 has not passed a deploy on staging" in out
    assert not any(key.startswith("production/") for key in cluster.state.get("deployments", {}))
    staging_deploy("main-7777777")  # passes on staging: recorded there as verified
    assert "main-7777777" in cluster.state["configmaps"]["staging/ml-platform-verified-images"]
    config = yaml.safe_load((ROOT / "invoke.yaml").read_text())
    assert load_environment(config, "production").verified_in == "staging"
    from delivery.deploy import verified_on

    assert verified_on(kube("staging"), "main-7777777") is not None
    assert verified_on(kube("staging"), "main-8888888") is None
    forced = invoke_task(
        cluster,
        receiver,
        "deploy",
        "--env",
        "production",
        "--image-tag",
        "main-8888888",
        "--force-unverified",
    )
    out, _ = forced.communicate(timeout=60)
    assert forced.returncode == 2 and "needs the deploy's approval" in out, out
    # With the approval it goes ahead, and everyone is told it was not verified. (Its smoke
    # tests cannot reach the production URL from here: it ends restored, and says both.)
    approved = invoke_task(
        cluster,
        receiver,
        "deploy",
        "--env",
        "production",
        "--image-tag",
        "main-8888888",
        "--force-unverified",
        "--approve",
    )
    out, _ = approved.communicate(timeout=120)
    assert "WARNING: main-8888888 has not passed a deploy on staging" in out, out
    slack = dict(_Receiver.received)["/slack"]["text"]
    assert "FORCED, unverified: main-8888888 has not passed a deploy on staging" in slack


@pytest.mark.parametrize("killed", [True, False])
def test_the_double_never_lets_a_killed_kubectl_reach_the_cluster(
    cluster: Cluster, killed: bool
) -> None:
    """What the signal tests rely on: a kubectl killed while its command is slow changes
    nothing, as a real one killed before its request left would not; one left alone does."""
    cluster.behave(slow={"create": 1.0})
    client = subprocess.Popen(
        ["kubectl", "--namespace", "staging", "create", "configmap", "marker"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    busy = cluster.state_file.with_suffix(".busy")
    deadline = time.monotonic() + 10
    while not busy.exists():  # the double has the request and sleeps on it
        assert time.monotonic() < deadline and client.poll() is None
        time.sleep(0.02)
    if killed:
        client.kill()
    client.wait(timeout=10)
    time.sleep(1.3)  # past the slow command's second: the double has decided
    commands = [argv[-3:] for argv in cluster.state.get("log", [])]
    assert (["create", "configmap", "marker"] in commands) is not killed
    assert ("staging/marker" in cluster.state.get("configmaps", {})) is not killed

"""The critical paths of a deployment, checked after every deploy (no credentials needed)."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.smoke


def test_the_process_is_alive(client: httpx.Client) -> None:
    response = client.get("/livez")
    assert response.status_code == 200 and response.json() == {"status": "alive"}


def test_database_redis_and_migrations_are_ready(client: httpx.Client) -> None:
    response = client.get("/healthz")
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "ready"
    assert all(state == "ok" for state in body["checks"].values()), body["checks"]


def test_the_api_answers_and_requires_authentication(client: httpx.Client) -> None:
    assert "/api/v1/projects/{project}/runs" in client.get("/openapi.json").json()["paths"]
    response = client.get("/api/v1/users/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"


def test_metrics_are_exported(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    assert "mlp_runs" in text and "mlp_queue_depth" in text


def test_log_in_refresh_submit_and_read_back_a_run(
    client: httpx.Client, credentials: tuple[str, str]
) -> None:
    user, password = credentials
    login = client.post("/api/v1/auth/token", json={"username": user, "password": password})
    assert login.status_code == 200, login.text
    refreshed = client.post(
        "/api/v1/auth/refresh", json={"refresh_token": login.json()["refresh_token"]}
    )
    assert refreshed.status_code == 200, refreshed.text
    headers = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
    run = client.post(
        "/api/v1/projects/default/runs",
        json={"workflow": "ml_platform.examples.smoke:smoke", "params": {"message": "smoke"}},
        headers=headers,
    )
    assert run.status_code == 201, run.text
    run_id = run.json()["id"]
    deadline = time.monotonic() + 60
    state = run.json()["state"]
    while state not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        state = client.get(f"/api/v1/projects/default/runs/{run_id}", headers=headers).json()[
            "state"
        ]
    assert state == "succeeded"

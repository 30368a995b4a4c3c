"""The critical paths of a deployment, checked after every deploy (no credentials needed)."""

from __future__ import annotations

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

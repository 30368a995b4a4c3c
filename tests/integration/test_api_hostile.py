"""The API against hostile and malformed requests, on PostgreSQL: it answers 4xx and lives on."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ml_platform.accounts import Accounts, Role
from ml_platform.api import create_app
from ml_platform.config import Settings
from ml_platform.service import Platform
from tests.integration.test_api import PASSWORD, SECRET, Api

pytestmark = pytest.mark.integration


@pytest.fixture
def api(postgres_clean: str, home: Path) -> Iterator[Api]:
    settings = Settings(home=home, database_url_override=postgres_clean, secret_key=SECRET)
    platform = Platform(settings).start()
    accounts = Accounts(platform.db, timedelta(days=1))
    admin = accounts.create_user("alice", PASSWORD, is_admin=True)
    accounts.create_user("carol", PASSWORD)
    project = accounts.create_project("vision", admin)
    accounts.set_member(project.id, "carol", Role.EDITOR)
    try:
        with TestClient(create_app(settings, platform=platform)) as client:
            yield Api(client, platform, accounts)
    finally:
        platform.close()


@pytest.mark.parametrize(
    "reference",
    [
        "venv.__main__:x",
        "unittest.__main__:x",
        "ml_platform.__main__:x",
        "..:x",
        ".os:x",
        "os:system",
        "tests._private:x",
        "tests.exiting_module:x",  # allowed, but exits at import: contained in its tracer
    ],
)
def test_no_workflow_reference_takes_the_server_down(api: Api, reference: str) -> None:
    carol = api.login("carol")
    for path, body in [
        ("/api/v1/projects/vision/workflows", {"reference": reference}),
        ("/api/v1/projects/vision/runs", {"workflow": reference}),
        (
            "/api/v1/projects/vision/schedules",
            {"name": "s", "workflow": reference, "cron": "0 * * * *"},
        ),
    ]:
        response = api.client.post(path, json=body, headers=carol)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_workflow"
    assert api.client.get("/livez").status_code == 200


def test_modules_outside_the_project_need_the_allow_list(api: Api) -> None:
    carol = api.login("carol")
    outside = {"reference": "json:dumps"}
    refused = api.client.post("/api/v1/projects/vision/workflows", json=outside, headers=carol)
    assert refused.status_code == 422 and "MLP_WORKFLOW_MODULES" in refused.text
    allowed = {"reference": "ml_platform.examples.classifier:training_pipeline"}
    ok = api.client.post("/api/v1/projects/vision/workflows", json=allowed, headers=carol)
    assert ok.status_code == 201, ok.text

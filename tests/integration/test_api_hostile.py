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


def _refused(response: object) -> bool:
    status = getattr(response, "status_code")
    return bool(status == 422 and getattr(response, "json")()["error"]["code"])


LONE_SURROGATE_LOGIN = (
    b'{"username": "\\ud800", "password": "xxxxxxxxxxxx"}'  # pragma: allowlist secret
)


def test_text_no_database_can_store_is_a_422_wherever_it_comes(api: Api) -> None:
    carol = api.login("carol")
    runs = "/api/v1/projects/vision/runs"
    attacks = [
        api.client.post("/api/v1/auth/token", json={"username": "a\x00", "password": "x" * 12}),
        api.client.post(
            "/api/v1/auth/token",
            content=LONE_SURROGATE_LOGIN,
            headers={"content-type": "application/json"},
        ),
        api.client.get("/api/v1/projects/vis%00ion/runs", headers=carol),
        api.client.get(f"{runs}?workflow=a%00b", headers=carol),
        api.client.post(
            runs,
            content=b'{"workflow": "tests.workflows:echo_pipeline", '
            b'"params": {"value": "\\ud800"}}',
            headers={**carol, "content-type": "application/json"},
        ),
        api.client.put(
            "/api/v1/projects/vision/members",
            json={"username": "b\x00b", "role": "viewer"},
            headers=api.login("alice"),
        ),
        api.client.post("/ui/login", data={"username": "x\x00", "password": "y"}),
    ]
    assert [a.status_code for a in attacks] == [422] * len(attacks), [a.text for a in attacks]
    assert all(_refused(a) for a in attacks)
    # Nothing was stored: the run list still answers for every member.
    listed = api.client.get(runs, headers=carol)
    assert listed.status_code == 200 and listed.json()["items"] == []


def test_out_of_range_numbers_impossible_crons_and_huge_params_are_422(api: Api) -> None:
    carol = api.login("carol")
    runs = "/api/v1/projects/vision/runs"
    too_big = 9223372036854775808
    assert api.client.get(f"{runs}?offset={too_big}", headers=carol).status_code == 422
    body = {"workflow": "tests.workflows:arithmetic", "max_concurrency": 2147483648}
    assert api.client.post(runs, json=body, headers=carol).status_code == 422
    run = api.client.post(runs, json={"workflow": "tests.workflows:arithmetic"}, headers=carol)
    logs = f"{runs}/{run.json()['id']}/tasks/total/logs?attempt=2147483648"
    assert api.client.get(logs, headers=carol).status_code == 422
    never = {"name": "never", "workflow": "tests.workflows:arithmetic", "cron": "0 0 30 2 *"}
    response = api.client.post("/api/v1/projects/vision/schedules", json=never, headers=carol)
    assert response.status_code == 422 and "never fires" in response.text
    api.platform.settings.max_params_bytes = 1000
    huge = {"workflow": "tests.workflows:echo_pipeline", "params": {"value": "x" * 2000}}
    response = api.client.post(runs, json=huge, headers=carol)
    assert response.status_code == 422 and "MLP_MAX_PARAMS_BYTES" in response.text


def test_every_response_carries_the_security_headers(api: Api) -> None:
    for path in ["/livez", "/api/v1/users/me", "/ui/login", "/nowhere"]:
        headers = api.client.get(path).headers
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["x-frame-options"] == "DENY", path
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path

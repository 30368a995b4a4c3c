"""The API against hostile and malformed requests, on PostgreSQL: it answers 4xx and lives on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from ml_platform import accounts as accounts_module
from ml_platform import security
from ml_platform.accounts import (
    Accounts,
    LoginBlocked,
    LoginLimiter,
    MemoryLoginLimiter,
    RedisLoginLimiter,
    Role,
)
from ml_platform.api import create_app
from ml_platform.config import Settings, load_settings
from ml_platform.errors import SettingsError
from ml_platform.security import AuthError
from ml_platform.service import Platform
from tests.conftest import RedisTarget
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
    assert "(json would be imported from outside it)" in refused.text
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


def test_logout_ends_the_access_token_and_every_refresh_token_of_the_sign_in(api: Api) -> None:
    tokens = api.client.post(
        "/api/v1/auth/token", json={"username": "carol", "password": PASSWORD}
    ).json()
    rotated = api.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
    ).json()
    other = api.login("carol")  # another sign-in of the same user: it must live on
    bearer = {"Authorization": f"Bearer {rotated['access_token']}"}
    assert api.client.get("/api/v1/users/me", headers=bearer).status_code == 200
    assert api.client.post("/api/v1/auth/logout", headers=bearer).status_code == 204
    for access in (tokens["access_token"], rotated["access_token"]):  # both of that sign-in
        after = api.client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {access}"})
        assert after.status_code == 401 and after.json()["error"]["code"] == "token_revoked"
    renew = api.client.post(
        "/api/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]}
    )
    assert renew.status_code == 401
    assert api.client.get("/api/v1/users/me", headers=other).status_code == 200
    assert api.client.post("/api/v1/auth/logout").status_code == 401  # nobody to sign out


def test_logout_may_name_a_refresh_token_but_only_one_of_the_callers_own(api: Api) -> None:
    alice = api.client.post(
        "/api/v1/auth/token", json={"username": "alice", "password": PASSWORD}
    ).json()
    carol = api.login("carol")
    body = {"refresh_token": alice["refresh_token"]}
    assert api.client.post("/api/v1/auth/logout", json=body, headers=carol).status_code == 204
    still = api.client.post("/api/v1/auth/refresh", json=body)
    assert still.status_code == 200  # carol cannot end alice's sign-in


def test_unknown_users_cost_the_same_password_check_as_wrong_passwords(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[str] = []
    real = security._hasher

    class Counting:
        def hash(self, password: str) -> str:
            return real.hash(password)

        def verify(self, password_hash: str, password: str) -> bool:
            checks.append(password)
            return real.verify(password_hash, password)

    monkeypatch.setattr(security, "_hasher", Counting())
    for username in ("carol", "nobody-at-all"):
        body = {"username": username, "password": "a wrong password"}  # pragma: allowlist secret
        response = api.client.post("/api/v1/auth/token", json=body)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_credentials"
    assert checks == ["a wrong password", "a wrong password"]  # one argon2 check each


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_parallel_guesses_get_exactly_the_limit_of_password_checks(
    api: Api,
    store: str,
    redis_target: RedisTarget,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limiter: LoginLimiter = (
        MemoryLoginLimiter(10, 300)
        if store == "memory"
        else RedisLoginLimiter(redis_client, f"{redis_target.prefix}:race", 10, 300)
    )
    checked = []
    real = security.verify_password

    def slow_check(password_hash: str, password: str) -> bool:
        checked.append(password)
        time.sleep(0.01)  # a real check takes ≈ 0.1 s: the window a racy limiter lets through
        return real(password_hash, password)

    monkeypatch.setattr(accounts_module, "verify_password", slow_check)
    start = threading.Barrier(40)

    def guess(n: int) -> str:
        start.wait()
        try:
            api.accounts.login(limiter, "carol", f"guess number {n}", "198.51.100.7")
        except LoginBlocked:
            return "blocked"
        except AuthError:
            return "wrong"
        return "in"

    with ThreadPoolExecutor(40) as pool:
        outcomes = list(pool.map(guess, range(40)))
    assert len(checked) == 10, len(checked)
    assert outcomes.count("wrong") == 10 and outcomes.count("blocked") == 30
    # The right password, now: still blocked until the window ends.
    with pytest.raises(LoginBlocked):
        api.accounts.login(limiter, "carol", PASSWORD, "198.51.100.7")


def test_a_good_login_does_not_use_up_the_addresss_limit(api: Api) -> None:
    limiter = MemoryLoginLimiter(3, 300)
    for _ in range(10):  # a busy office behind one address
        api.accounts.login(limiter, "carol", PASSWORD, "198.51.100.8")
    with pytest.raises(AuthError):
        api.accounts.login(limiter, "alice", "a wrong password", "198.51.100.8")


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("aaaaaaaaaaaa", "too weak"),
        ("password1234", "too weak"),
        ("qwertyuiop12", "too weak"),
        ("erin-the-great-1", "must not contain the username"),
        ("short", "at least 12 characters"),
    ],
)
def test_weak_passwords_are_refused(api: Api, password: str, reason: str) -> None:
    alice = api.login("alice")
    body = {"username": "erin", "password": password}
    response = api.client.post("/api/v1/users", json=body, headers=alice)
    assert response.status_code == 422 and reason in response.text, response.text
    with pytest.raises(ValueError, match=reason):
        api.accounts.create_user("erin", password)


def test_the_openapi_document_declares_the_errors_the_api_answers(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    runs = schema["paths"]["/api/v1/projects/{project}/runs"]["get"]["responses"]
    for status in ("401", "403", "404", "422"):
        assert status in runs, status
        assert runs[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"
        }


def test_environment_is_one_of_three_and_production_hides_the_docs(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings(environment="PRODUCTION").environment == "production"
    monkeypatch.setenv("ENVIRONMENT", "prod")
    with pytest.raises(SettingsError, match="ENVIRONMENT must be one of"):
        load_settings()
    production = replace(api.platform.settings, environment="production")
    with TestClient(create_app(production, platform=api.platform)) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404, path
        assert client.get("/livez").headers["x-content-type-options"] == "nosniff"
    asked = replace(production, api_docs=True)
    with TestClient(create_app(asked, platform=api.platform)) as client:
        assert client.get("/openapi.json").status_code == 200


def test_a_wrong_method_names_every_method_the_path_answers(api: Api) -> None:
    carol = api.login("carol")
    response = api.client.request("TRACE", "/api/v1/projects/vision/runs", headers=carol)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_json_body_that_is_not_utf8_is_a_422(api: Api) -> None:
    response = api.client.post(
        "/api/v1/auth/token",
        content=b'{"username": "\xff", "password": "x"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422 and "not UTF-8" in response.text

"""The UI's pages over HTTP (no browser): sessions, CSRF, roles, project scoping, escaping."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ml_platform.accounts import Accounts, Role
from ml_platform.api import create_app
from ml_platform.engine.states import RunState
from ml_platform.service import LogPiece, Platform
from tests import workflows
from tests.helpers import run_inline

pytestmark = pytest.mark.integration
PASSWORD = "correct horse battery"  # pragma: allowlist secret


@pytest.fixture
def accounts(sqlite_platform: Platform) -> Accounts:
    found = Accounts(sqlite_platform.db, timedelta(days=1))
    found.create_user("alice", PASSWORD, is_admin=True)
    found.create_user("bob", PASSWORD)
    found.set_member(sqlite_platform.default_project_id(), "bob", Role.VIEWER)
    return found


@pytest.fixture
def client(sqlite_platform: Platform, accounts: Accounts) -> Iterator[TestClient]:
    with TestClient(create_app(sqlite_platform.settings, platform=sqlite_platform)) as c:
        yield c


def sign_in(client: TestClient, user: str) -> str:
    """Sign in; return the CSRF token the pages embed."""
    response = client.post("/ui/login", data={"username": user, "password": PASSWORD})
    assert response.status_code == 200, response.text
    match = re.search(r'name="csrf" value="([^"]+)"', response.text)
    assert match
    return match.group(1)


def test_pages_need_a_session_and_send_a_strict_content_security_policy(
    client: TestClient,
) -> None:
    response = client.get("/ui/p/default/runs", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=%2Fui%2Fp%2Fdefault%2Fruns"
    page = client.get("/ui/login")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"


def test_sign_in_sets_strict_http_only_cookies_and_refuses_open_redirects(
    client: TestClient,
) -> None:
    wrong = client.post("/ui/login", data={"username": "alice", "password": "nope nope nope"})
    assert wrong.status_code == 401 and "Wrong username or password." in wrong.text
    response = client.post(
        "/ui/login",
        data={"username": "alice", "password": PASSWORD, "next": "https://evil.example/"},
        follow_redirects=False,
    )
    assert response.headers["location"] == "/ui/"
    cookies = response.headers.get_list("set-cookie")
    assert len(cookies) == 3
    assert all("HttpOnly" in c and "SameSite=strict" in c and "Path=/ui" in c for c in cookies)


def test_an_expired_access_cookie_is_renewed_from_the_refresh_cookie(client: TestClient) -> None:
    sign_in(client, "alice")
    client.cookies.set("mlp_access", "not-a-token", path="/ui")
    page = client.get("/ui/p/default/runs", follow_redirects=False)
    assert page.status_code == 200
    renewed = page.headers.get_list("set-cookie")
    assert any(c.startswith("mlp_access=") for c in renewed)
    assert any(c.startswith("mlp_refresh=") for c in renewed)  # rotated, like the API's


def test_state_changes_need_the_csrf_token(client: TestClient, sqlite_platform: Platform) -> None:
    run_id = sqlite_platform.submit(workflows.arithmetic, {"n": 2}).run_id
    csrf = sign_in(client, "alice")
    forged = client.post(f"/ui/p/default/runs/{run_id}/cancel", data={"csrf": "guess"})
    assert forged.status_code == 403
    assert sqlite_platform.run(run_id)[0].state == "queued"
    done = client.post(f"/ui/p/default/runs/{run_id}/cancel", data={"csrf": csrf})
    assert done.status_code == 200 and sqlite_platform.run(run_id)[0].state == "cancelled"
    rerun = client.post(
        f"/ui/p/default/runs/{run_id}/rerun", data={"csrf": csrf}, follow_redirects=False
    )
    new_id = rerun.headers["location"].rsplit("/", 1)[1]
    assert new_id != run_id and sqlite_platform.run(new_id)[0].params == {"n": 2}


def test_a_viewer_gets_no_buttons_and_is_refused(
    client: TestClient, sqlite_platform: Platform
) -> None:
    run_id = sqlite_platform.submit(workflows.arithmetic, {"n": 2}).run_id
    csrf = sign_in(client, "bob")
    page = client.get(f"/ui/p/default/runs/{run_id}")
    assert page.status_code == 200 and 'id="cancel"' not in page.text and "rerun" not in page.text
    refused = client.post(f"/ui/p/default/runs/{run_id}/cancel", data={"csrf": csrf})
    assert refused.status_code == 403 and "you are viewer" in refused.text
    assert sqlite_platform.run(run_id)[0].state == "queued"


def test_an_editor_pauses_and_resumes_a_schedule_from_the_workflows_page(
    client: TestClient, sqlite_platform: Platform
) -> None:
    project = sqlite_platform.default_project_id()
    sqlite_platform.create_schedule(
        project, "nightly", "tests.workflows:arithmetic", "0 2 * * *", {}
    )
    viewer = sign_in(client, "bob")
    page = client.get("/ui/p/default/workflows").text
    assert "nightly" in page and "/schedules/nightly/pause" not in page  # no button to look at
    refused = client.post("/ui/p/default/schedules/nightly/pause", data={"csrf": viewer})
    assert refused.status_code == 403 and sqlite_platform.find_schedule(project, "nightly").enabled
    csrf = sign_in(client, "alice")
    forged = client.post("/ui/p/default/schedules/nightly/pause", data={"csrf": "guess"})
    assert forged.status_code == 403 and sqlite_platform.find_schedule(project, "nightly").enabled
    paused = client.post("/ui/p/default/schedules/nightly/pause", data={"csrf": csrf})
    assert paused.status_code == 200 and "paused" in paused.text  # back on the workflows page
    assert "/schedules/nightly/resume" in paused.text
    assert not sqlite_platform.find_schedule(project, "nightly").enabled
    resumed = client.post("/ui/p/default/schedules/nightly/resume", data={"csrf": csrf})
    assert "/schedules/nightly/pause" in resumed.text
    assert sqlite_platform.find_schedule(project, "nightly").enabled
    missing = client.post("/ui/p/default/schedules/nope/pause", data={"csrf": csrf})
    assert missing.status_code == 404 and "no such schedule" in missing.text
    due = sqlite_platform.find_schedule(project, "nightly").next_fire_at
    [made] = sqlite_platform.fire_schedules(due + timedelta(minutes=1))
    run_page = client.get(f"/ui/p/default/runs/{made.run_id}").text
    assert "made by a schedule for its tick of" in run_page


def test_another_projects_runs_are_invisible_even_by_url(
    client: TestClient, sqlite_platform: Platform, accounts: Accounts
) -> None:
    owner = accounts.authenticate("alice", PASSWORD)
    secret = accounts.create_project("secret", owner)
    run_id = sqlite_platform.submit(workflows.arithmetic, {"n": 2}, project_id=secret.id).run_id
    sign_in(client, "bob")
    assert client.get(f"/ui/p/secret/runs/{run_id}").status_code == 404
    assert client.get(f"/ui/p/default/runs/{run_id}").status_code == 404
    assert client.get(f"/ui/p/default/runs/{run_id}/artifacts/{'0' * 64}").status_code == 404
    listed = client.get("/ui/p/default/runs")
    assert run_id[:8] not in listed.text


def test_everything_a_user_wrote_is_escaped(client: TestClient, sqlite_platform: Platform) -> None:
    run_id = sqlite_platform.submit(
        workflows.echo_pipeline, {"value": "<script>x()</script>"}
    ).run_id
    run_inline(sqlite_platform, run_id)
    sign_in(client, "alice")
    for url in ("/ui/p/default/runs", f"/ui/p/default/runs/{run_id}"):
        text = client.get(url).text
        assert "<script>x()" not in text
    listed = client.get("/ui/p/default/runs?fragment=1").text
    assert "\\u003cscript\\u003ex()\\u003c/script\\u003e" in listed  # tojson escapes < and >


def test_the_run_page_draws_the_dag_timeline_and_metrics(
    client: TestClient, sqlite_platform: Platform
) -> None:
    run_id = sqlite_platform.submit(workflows.arithmetic, {"n": 3}).run_id
    assert run_inline(sqlite_platform, run_id) == "succeeded"
    sign_in(client, "alice")
    page = client.get(f"/ui/p/default/runs/{run_id[:8]}").text
    tasks = sqlite_platform.task_runs(run_id)
    assert page.count('<g class="node"') == len(tasks)
    assert page.count('class="bar"') == len(sqlite_platform.attempts(run_id))
    assert "data-done" in page  # finished: the script stops refreshing
    compare = client.get("/ui/p/default/compare").text
    assert "count" in compare  # the metric the workflow logs
    bad_day = client.get("/ui/p/default/runs?day=yesterday")
    assert bad_day.status_code == 400 and "must be a date" in bad_day.text


def test_compare_opens_the_workflow_that_logged_metrics_last_with_named_series(
    client: TestClient, sqlite_platform: Platform, tmp_path: Path
) -> None:
    with_metrics = sqlite_platform.submit(workflows.arithmetic, {"n": 2}).run_id
    assert run_inline(sqlite_platform, with_metrics) == "succeeded"
    # A later run of a workflow without metrics, whose name sorts first: not the default.
    marks = tmp_path / "marks"
    marks.mkdir()
    later = sqlite_platform.submit(workflows.five_steps, {"folder": str(marks)}).run_id
    assert run_inline(sqlite_platform, later) == "succeeded"
    sign_in(client, "alice")
    page = client.get("/ui/p/default/compare").text
    assert '<option value="tests.workflows:arithmetic" selected>' in page
    assert '<option value="count" selected>' in page
    assert page.count("<circle") == 1


def test_a_mapped_task_is_one_node_and_its_elements_are_on_the_timeline(
    client: TestClient, sqlite_platform: Platform, tmp_path: Path
) -> None:
    params = {"n": 12, "folder": str(tmp_path), "fail": 3}
    run_id = sqlite_platform.submit(workflows.mapped, params).run_id
    assert run_inline(sqlite_platform, run_id) == "succeeded"
    sign_in(client, "alice")
    page = client.get(f"/ui/p/default/runs/{run_id}").text
    assert page.count('<g class="node"') == 3  # shards, shard_work ×12, gather
    assert "shard_work ×12" in page
    assert "12 elements, 12 succeeded" in page
    # 1 + 12 elements (one retried) + 1: every attempt is a bar.
    assert page.count('class="bar"') == len(sqlite_platform.attempts(run_id)) == 15


def test_a_large_runs_page_lists_the_failed_tasks_first_and_draws_every_node(
    client: TestClient,
    sqlite_platform: Platform,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ml_platform.ui import views

    monkeypatch.setattr(views, "ROWS_SHOWN", 5)
    params = {"n": 12, "folder": str(tmp_path), "fail": 7, "fail_times": 5}
    run_id = sqlite_platform.submit(workflows.mapped, params).run_id
    assert run_inline(sqlite_platform, run_id) == "failed"
    sign_in(client, "alice")
    page = client.get(f"/ui/p/default/runs/{run_id}").text
    rows = re.findall(r'<tr data-task="([^"]+)">', page)
    assert len(rows) == 5
    assert {"shard_work[7]", "shard_work", "gather"} <= set(rows)  # failed ones first
    assert "5 of 15 tasks: the failed, running and queued ones first" in page
    assert page.count('<g class="node"') == 3  # the graph: shards, shard_work ×12, gather


def test_sign_out_ends_the_session_on_the_server_not_only_in_the_browser(
    client: TestClient,
) -> None:
    csrf = sign_in(client, "alice")
    copied = dict(client.cookies.items())  # what a thief (or a shared machine) kept
    out = client.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    for name, value in copied.items():
        client.cookies.set(name, value, path="/ui")
    again = client.get("/ui/p/default/runs", follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"].startswith("/ui/login")
    client.cookies.set("mlp_access", "expired-so-renew", path="/ui")  # the refresh cookie too
    assert client.get("/ui/p/default/runs", follow_redirects=False).status_code == 303


def test_another_site_cannot_post_the_sign_in_form(client: TestClient) -> None:
    form = {"username": "alice", "password": PASSWORD}
    for headers in (
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"sec-fetch-site": "cross-site"},
    ):
        forged = client.post("/ui/login", data=form, headers=headers, follow_redirects=False)
        assert forged.status_code == 403, headers
        assert "set-cookie" not in forged.headers
    ours = client.post(
        "/ui/login",
        data=form,
        headers={"origin": "http://testserver", "sec-fetch-site": "same-origin"},
        follow_redirects=False,
    )
    assert ours.status_code == 303


def test_an_unknown_ui_address_is_an_html_page_not_json(client: TestClient) -> None:
    sign_in(client, "alice")
    for path in ("/ui/nowhere", "/ui/p/default/runs/x/y/z", "/ui/static/missing.css"):
        page = client.get(path)
        assert page.status_code == 404, path
        if "static" not in path:
            assert page.headers["content-type"].startswith("text/html"), path
            assert "There is no such page here." in page.text
    assert client.get("/ui/static/app.js").status_code == 200  # the real files still load


def test_a_run_being_cancelled_says_so_and_offers_no_second_cancel(
    client: TestClient, sqlite_platform: Platform
) -> None:
    submitted = sqlite_platform.submit(workflows.arithmetic, {"n": 2})
    assert sqlite_platform.claim(submitted.queued[0].attempt_id, "worker-x") is not None
    csrf = sign_in(client, "alice")
    page = client.post(f"/ui/p/default/runs/{submitted.run_id}/cancel", data={"csrf": csrf})
    assert page.status_code == 200
    assert 'id="run-state">cancelling</span>' in page.text  # its own state, at once
    assert 'id="cancel"' not in page.text  # the button is gone
    assert "its running tasks are being stopped" in page.text


def test_a_run_page_read_while_a_map_expands_shows_what_it_read(
    client: TestClient, sqlite_platform: Platform, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The page reads the run's tasks, then its attempts. When the run moves on in between
    (here: its map expands into elements and they all run), the attempts of task runs the
    page has not read wait for the next refresh; the page does not fail (it did, with a 500,
    and a browser watching it stopped refreshing)."""
    sign_in(client, "alice")
    run_id = sqlite_platform.submit(workflows.mapped, {"n": 3, "folder": str(tmp_path)}).run_id
    read_tasks = sqlite_platform.task_rows

    def tasks_then_the_run_moves_on(run: str) -> list[Any]:
        rows = read_tasks(run)
        if run == run_id:
            run_inline(sqlite_platform, run_id)  # elements made, run, attempts recorded
        return rows

    monkeypatch.setattr(sqlite_platform, "task_rows", tasks_then_the_run_moves_on)
    page = client.get(f"/ui/p/default/runs/{run_id}")
    assert page.status_code == 200, page.text
    assert "shard_work[0]" not in page.text  # not read yet: on the next refresh
    monkeypatch.undo()
    assert "shard_work[0]" in client.get(f"/ui/p/default/runs/{run_id}").text


def test_the_log_page_says_what_was_not_kept_and_follows_from_the_whole_outputs_offsets(
    client: TestClient, sqlite_platform: Platform
) -> None:
    submitted = sqlite_platform.submit(workflows.chatty_pipeline, {"seconds": 1.0})
    attempt_id = submitted.queued[0].attempt_id
    assert sqlite_platform.claim(attempt_id, "worker-x") is not None
    sqlite_platform.ship_logs(
        {attempt_id: LogPiece(2_000_000, "kept line\n", kept_from=2_000_000)}, "worker-x"
    )
    sign_in(client, "alice")
    base = f"/ui/p/default/runs/{submitted.run_id}/tasks/chatty/log"
    page = client.get(base)
    assert "The first 2,000,000 characters of this output were not kept" in page.text
    assert 'data-offset="2000010"' in page.text  # where the script asks from
    sqlite_platform.ship_logs({attempt_id: LogPiece(2_000_010, "next\n")}, "worker-x")
    part = client.get(f"{base}.json?attempt=1&offset=2000010").json()
    assert (part["text"], part["offset"], part["next_offset"]) == ("next\n", 2_000_010, 2_000_015)
    cut = client.get(f"{base}.json?attempt=1&offset=10").json()  # what it had was cut away
    assert (cut["text"], cut["offset"]) == ("kept line\nnext\n", 2_000_000)


def test_a_task_with_a_point_per_step_is_one_row_of_the_run_pages_metrics(
    client: TestClient, sqlite_platform: Platform
) -> None:
    submitted = sqlite_platform.submit(workflows.curve, {"steps": 3000})
    assert run_inline(sqlite_platform, submitted.run_id) is RunState.SUCCEEDED
    sign_in(client, "alice")
    page = client.get(f"/ui/p/default/runs/{submitted.run_id}").text
    metrics = page[page.index('id="metrics"') :].split("</table>")[0]
    assert metrics.count("<tr>") == 2 and "last of 3,000, 0.0003333 to 1" in metrics

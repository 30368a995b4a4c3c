"""The web UI in a real headless Chromium: `mlp server` (embedded) driven by Playwright.

Covers what a person does: sign in, watch the demo's states turn green without reloading,
open its DAG and timeline, compare two runs' metrics, cancel a run as an editor, and be
refused as a viewer (buttons hidden, the request refused, another project's run invisible
even by URL). Screenshots of every page go to reports/ui-screenshots/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from ml_platform.accounts import Accounts, Role
from ml_platform.config import Settings
from ml_platform.service import Platform
from tests import workflows
from tests.helpers import wait_until_ready
from tests.services import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "reports" / "ui-screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PASSWORD = "correct horse battery"  # pragma: allowlist secret
TEST_SECRET_KEY = "k3y-for-tests-only-7f0c4e2a9b1d8e6f5a4c3b2a1908f7e6"  # pragma: allowlist secret
DEMO = "ml_platform.examples.classifier:training_pipeline"
# The flags the machine's notes give: without the background-networking ones, Chromium's
# calls home are refused by this machine's closed network, many at a time.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError("Chromium is missing: .ci/run installs it (apt-get install chromium)")
    pytest.skip("no Chromium here (apt-get install chromium)", allow_module_level=True)


class Site:
    def __init__(self, url: str, home: Path, secret_run: str) -> None:
        self.url = url
        self.home = home
        self.secret_run = secret_run

    @contextmanager
    def client(self) -> Iterator[httpx.Client]:
        """An API client signed in as alice."""
        with httpx.Client(base_url=self.url, timeout=30) as client:
            token = client.post(
                "/api/v1/auth/token", json={"username": "alice", "password": PASSWORD}
            ).json()["access_token"]
            client.headers["Authorization"] = f"Bearer {token}"
            yield client

    def submit(self, workflow: str, params: dict[str, object]) -> str:
        with self.client() as client:
            created = client.post(
                "/api/v1/projects/default/runs", json={"workflow": workflow, "params": params}
            )
            assert created.status_code == 201, created.text
            run_id: str = created.json()["id"]
            return run_id

    def story(self, run_id: str) -> str:
        """What the API says of a run's tasks and the server's last log lines: the message of
        a test that waited in vain."""
        with self.client() as client:
            tasks = client.get(f"/api/v1/projects/default/runs/{run_id}/tasks").text
        log = (self.home / "server.log").read_text(errors="replace").splitlines()
        return f"tasks: {tasks[:3000]}\nserver log (last 30 lines):\n" + "\n".join(log[-30:])


def _wait_for_state(page: Page, site: Site, run_id: str, state: str, seconds: float) -> None:
    """The run page (open on ``run_id``) shows ``state`` within ``seconds``, or the test fails
    with what the API and the server's log say."""
    try:
        page.wait_for_selector(f"#run-state:text('{state}')", timeout=seconds * 1000)
    except PlaywrightTimeout:
        pytest.fail(f"run {run_id} not {state} on its page in {seconds} s\n{site.story(run_id)}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("ui-home")
    settings = Settings(home=home)
    platform = Platform(settings).start()
    accounts = Accounts(platform.db, timedelta(days=1))
    alice = accounts.create_user("alice", PASSWORD, is_admin=True)
    accounts.create_user("bob", PASSWORD)
    accounts.set_member(platform.default_project_id(), "bob", Role.VIEWER)
    secret = accounts.create_project("secret", alice)
    secret_run = platform.submit(workflows.arithmetic, {"n": 2}, project_id=secret.id).run_id
    platform.close()
    with embedded_server(home) as url:
        yield Site(url, home, secret_run)


@contextmanager
def embedded_server(home: Path) -> Iterator[str]:
    """`mlp server` (embedded, 2 task slots) on ``home`` and a free port: its URL, until the
    block ends and it has stopped."""
    port = free_port()
    env = dict(
        os.environ,
        ML_PLATFORM_HOME=str(home),
        PYTHONPATH=str(ROOT),
        MLP_POLL_SECONDS="0.2",
        # The default lease (30 s): a cancelled task still stops within a second or two.
        SECRET_KEY=TEST_SECRET_KEY,
    )
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    log = (home / "server.log").open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "ml_platform", "server", "--port", str(port), "--concurrency", "2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Browser]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def _sign_in(
    browser: Browser, site: Site, user: str, viewport: tuple[int, int] = (1360, 900)
) -> Page:
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.goto(f"{site.url}/ui/")
    assert "/ui/login" in page.url  # signed out: sent to the sign-in page
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui/p/default/runs")
    return page


def test_sign_in_refuses_a_wrong_password(browser: Browser, site: Site) -> None:
    page = browser.new_page()
    page.goto(f"{site.url}/ui/login")
    page.screenshot(path=str(SHOTS / "01-sign-in.png"))
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "not the password")
    page.click("button[type=submit]")
    assert page.locator("[role=alert]").inner_text() == "Wrong username or password."
    page.close()


def test_an_editor_watches_the_demo_and_compares_two_runs(browser: Browser, site: Site) -> None:
    page = _sign_in(browser, site, "alice")
    first = site.submit(DEMO, {})
    page.goto(f"{site.url}/ui/p/default/runs")
    row = page.locator(f"tr:has(a[href$='{first}'])")
    assert row.get_attribute("data-state") in ("queued", "running")
    # No reload: the page's script refreshes the rows until nothing runs.
    page.wait_for_selector(f"tr[data-state=succeeded]:has(a[href$='{first}'])", timeout=180_000)
    page.screenshot(path=str(SHOTS / "02-runs.png"), full_page=True)

    page.click(f"a[href$='{first}']")
    page.wait_for_selector("#dag")
    nodes = page.locator("#dag g.node")
    # 7 nodes: the grid's 4 trainings and 4 evaluations are the mapped nodes train ×4 and
    # evaluate ×4; the timeline has a bar for each of the 13 attempts.
    assert nodes.count() == 7
    assert page.locator("#dag g.node text:text-is('train ×4')").count() == 1
    states = {nodes.nth(i).get_attribute("data-state") for i in range(nodes.count())}
    assert states <= {"succeeded", "cached"}
    assert page.locator("#dag path.edge").count() >= 6  # every task but the roots has an edge in
    # The graph's frame is the drawing's size (up to the page's width): no empty half-frame.
    frame, drawing = (
        page.locator(".scroll.graph").bounding_box(),
        page.locator("#dag").bounding_box(),
    )
    assert frame is not None and drawing is not None and drawing["width"] >= frame["width"] - 4
    assert page.locator("#timeline rect.bar").count() == 13
    assert "roc_auc" in page.locator("#metrics").inner_text()
    page.screenshot(path=str(SHOTS / "03-run.png"), full_page=True)
    with page.expect_download() as download:
        page.click("a[href*='/artifacts/']")
    assert download.value.suggested_filename == "model"

    second = site.submit(DEMO, {"seed": 11})
    page.goto(f"{site.url}/ui/p/default/runs/{second}")
    _wait_for_state(page, site, second, "succeeded", 180)
    page.goto(f"{site.url}/ui/p/default/compare?workflow={DEMO}&metric=roc_auc")
    assert page.locator("#compare-table tbody tr").count() == 2
    assert page.locator("#chart circle").count() == 2 * 4  # 4 grid points in each run
    page.screenshot(path=str(SHOTS / "04-compare.png"), full_page=True)
    page.goto(f"{site.url}/ui/p/default/workflows")
    assert DEMO in page.inner_text("main")
    page.screenshot(path=str(SHOTS / "05-workflows.png"), full_page=True)
    page.close()


def test_live_updates_outlive_a_lost_connection_and_stop_when_signed_out(
    browser: Browser, site: Site
) -> None:
    """The run page's refresh survives a dropped connection and a 503 (it says so, tries again
    later, and catches up), and stops for good once the answer is "signed out"."""
    page = _sign_in(browser, site, "alice")
    run_id = site.submit("tests.workflows:mapped_naps", {"n": 4, "seconds": 0.2})
    faults: list[str | int] = ["abort", 503]
    asked: list[str] = []

    def flaky_network(route: Route) -> None:
        asked.append(route.request.url)
        fault = faults.pop(0) if faults else None
        if fault == "abort":
            route.abort("connectionreset")
        elif fault is not None:
            route.fulfill(status=int(fault), body="busy")
        else:
            route.continue_()

    page.route("**/runs/*?fragment=1", flaky_network)
    page.goto(f"{site.url}/ui/p/default/runs/{run_id}")
    note = page.locator("#run-body-stale")
    note.wait_for(timeout=10_000)
    assert "trying again" in note.inner_text()
    _wait_for_state(page, site, run_id, "succeeded", 60)
    assert note.count() == 0 and len(asked) >= 3  # it recovered, and the note went away

    # Signed out (the server now answers 401): no note, and no more requests.
    page.unroute("**/runs/*?fragment=1")
    second = site.submit("tests.workflows:long_pipeline", {"marker": str(site.home / "live")})
    asked.clear()

    def signed_out(route: Route) -> None:
        asked.append(route.request.url)
        route.fulfill(status=401, body="signed out")

    page.route("**/runs/*?fragment=1", signed_out)
    page.goto(f"{site.url}/ui/p/default/runs/{second}")
    page.wait_for_function("() => document.querySelector('#run-body')", timeout=10_000)
    deadline = time.monotonic() + 10
    while not asked and time.monotonic() < deadline:  # the first refresh comes after 2 s
        page.wait_for_timeout(100)
    page.wait_for_timeout(3_000)  # a retry would come 2 s after it
    assert len(asked) == 1 and page.locator("#run-body-stale").count() == 0
    page.close()
    with site.client() as client:  # let the long run go
        client.post(f"/api/v1/projects/default/runs/{second}/cancel").raise_for_status()


def test_an_editor_cancels_a_running_run(browser: Browser, site: Site, tmp_path: Path) -> None:
    page = _sign_in(browser, site, "alice")
    run_id = site.submit("tests.workflows:long_pipeline", {"marker": str(tmp_path / "m")})
    page.goto(f"{site.url}/ui/p/default/runs/{run_id}")
    page.wait_for_selector("#dag g.node[data-state=running]", timeout=60_000)
    page.click("#cancel")
    _wait_for_state(page, site, run_id, "cancelled", 60)
    assert page.locator("#cancel").count() == 0
    page.screenshot(path=str(SHOTS / "06-cancelled.png"), full_page=True)
    page.goto(f"{site.url}/ui/p/default/runs")
    assert page.locator(f"tr[data-state=cancelled]:has(a[href$='{run_id}'])").count() == 1
    page.screenshot(path=str(SHOTS / "08-runs-later.png"), full_page=True)
    page.close()


def test_a_viewer_sees_no_buttons_is_refused_and_never_sees_another_project(
    browser: Browser, site: Site, tmp_path: Path
) -> None:
    run_id = site.submit("tests.workflows:long_pipeline", {"marker": str(tmp_path / "m")})
    page = _sign_in(browser, site, "bob")
    page.goto(f"{site.url}/ui/p/default/runs/{run_id}")
    assert page.locator("#run-state").count() == 1
    assert page.locator("#cancel").count() == 0 and page.locator("#rerun").count() == 0
    # The buttons are not only hidden: the request itself is refused.
    status = page.evaluate(
        """async ([url, token]) => {
            const body = new URLSearchParams({csrf: token});
            const r = await fetch(url, {method: "POST", body});
            return r.status;
        }""",
        [
            f"/ui/p/default/runs/{run_id}/cancel",
            page.locator("form.who input[name=csrf]").get_attribute("value"),
        ],
    )
    assert status == 403
    page.goto(f"{site.url}/ui/p/secret/runs/{site.secret_run}")
    assert "not yours to see" in page.inner_text("main")
    page.goto(f"{site.url}/ui/p/default/runs/{site.secret_run}")
    assert "There is no run" in page.inner_text("main")
    page.screenshot(path=str(SHOTS / "07-viewer-refused.png"), full_page=True)
    page.close()
    with site.client() as client:  # let the long run go
        client.post(f"/api/v1/projects/default/runs/{run_id}/cancel").raise_for_status()


def test_the_log_page_follows_a_running_task(browser: Browser, site: Site) -> None:
    page = _sign_in(browser, site, "alice")
    run_id = site.submit("tests.workflows:chatty_pipeline", {"seconds": 4.0})
    log = f"{site.url}/ui/p/default/runs/{run_id}/tasks/chatty/log"
    deadline = time.monotonic() + 30
    while True:  # until the task has printed its first line and still runs
        page.goto(log)
        text = page.locator("pre.log").inner_text()
        if "first line" in text and page.locator("[data-follow]").count():
            break
        assert time.monotonic() < deadline, f"the log page shows {text!r}\n{site.story(run_id)}"
        time.sleep(0.3)
    assert "second line" not in text
    # No reload: the script appends what follows and says how it ended.
    page.wait_for_selector("[data-follow-state]:has-text('ended: succeeded')", timeout=30_000)
    text = page.locator("pre.log").inner_text()
    assert text.count("first line") == 1 and "second line" in text
    page.screenshot(path=str(SHOTS / "07-log-followed.png"), full_page=True)
    page.close()


def test_every_page_fits_a_phone_without_sideways_scrolling(browser: Browser, site: Site) -> None:
    """390×844 (a phone): nothing makes the page wider than the screen; wide pictures and
    tables scroll inside their own boxes, and the header's links are all on screen."""
    page = _sign_in(browser, site, "alice", viewport=(390, 844))
    run_id = site.submit("tests.workflows:mapped", {"n": 30, "folder": str(site.home)})
    page.goto(f"{site.url}/ui/p/default/runs/{run_id}")
    _wait_for_state(page, site, run_id, "succeeded", 60)
    for path in (
        "runs",
        f"runs/{run_id}",
        "compare",
        "workflows",
        f"runs/{run_id}/tasks/gather/log",
        "no-such-page",
    ):
        page.goto(f"{site.url}/ui/p/default/{path}")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"/{path} is {width} px wide on a 390 px screen"
        for link in page.locator("header a, header button").all():
            box = link.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, path
    page.goto(f"{site.url}/ui/p/default/runs/{run_id}")
    page.screenshot(path=str(SHOTS / "09-run-on-a-phone.png"), full_page=True)
    page.close()

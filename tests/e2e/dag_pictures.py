"""Screenshots of the run page's graph, for docs/images: ``python -m tests.e2e.dag_pictures DIR``.

Starts an embedded `mlp server` in a temporary home, runs three workflows through its API and
saves the graph of each, as the web UI draws it, to DIR:

- ``dag-demo.png``: the example ML pipeline (edges that skip a layer; a task with two inputs);
- ``dag-retry.png``: a retry of the demo whose grid has a point that cannot train (reused,
  failed and upstream_failed tasks);
- ``dag-fan-out-200.png``: 200 tasks between one root and one join (a grid, bundled edges).

Needs the test group (Playwright) and the machine's Chromium, as the browser tests do.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from ml_platform.accounts import Accounts
from ml_platform.config import Settings
from ml_platform.service import Platform
from tests.e2e.test_ui_browser import CHROMIUM, FLAGS, PASSWORD, embedded_server

ROOT = Path(__file__).resolve().parents[2]
DEMO = "ml_platform.examples.classifier:training_pipeline"
BAD_GRID = [
    {"model": "logistic_regression", "C": 1.0},
    {"model": "random_forest", "n_estimators": 20, "max_depth": 3},
    {"model": "gradient_magic"},  # cannot train: the retry fails it again
]


def _wait(client: httpx.Client, run_id: str) -> None:
    for _ in range(600):
        state = client.get(f"/api/v1/projects/default/runs/{run_id}").json()["state"]
        if state in ("succeeded", "failed", "cancelled"):
            return
        time.sleep(0.5)
    raise TimeoutError(run_id)


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="mlp-dag-pictures-"))
    platform = Platform(Settings(home=home)).start()
    Accounts(platform.db, timedelta(days=1)).create_user("alice", PASSWORD, is_admin=True)
    platform.close()
    with embedded_server(home) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            token = client.post(
                "/api/v1/auth/token", json={"username": "alice", "password": PASSWORD}
            ).json()["access_token"]
            client.headers["Authorization"] = f"Bearer {token}"
            runs = "/api/v1/projects/default/runs"
            demo = client.post(runs, json={"workflow": DEMO, "params": {"n_samples": 400}})
            bad = client.post(
                runs, json={"workflow": DEMO, "params": {"n_samples": 400, "grid": BAD_GRID}}
            )
            wide = client.post(
                runs,
                json={"workflow": "tests.workflows:naps", "params": {"n": 200, "seconds": 0}},
            )
            for made in (demo, bad, wide):
                made.raise_for_status()
                _wait(client, made.json()["id"])
            retry = client.post(f"{runs}/{bad.json()['id']}/retry", json={})
            retry.raise_for_status()
            _wait(client, retry.json()["id"])
        shots = {
            "dag-demo.png": demo.json()["id"],
            "dag-retry.png": retry.json()["id"],
            "dag-fan-out-200.png": wide.json()["id"],
        }
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.goto(f"{url}/ui/login")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url("**/ui/p/default/runs")
            for name, run_id in shots.items():
                page.goto(f"{url}/ui/p/default/runs/{run_id}")
                page.locator("section:has(#dag)").screenshot(path=str(folder / name))
                print(f"wrote {folder / name}")
            browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))

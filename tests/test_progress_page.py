"""End to end: the progress page of examples/progress in headless Chromium.

The example app runs in a thread of this process (werkzeug's ``make_server``) on the
test Redis, with a real local worker; Playwright drives Debian's ``/usr/bin/chromium``
(never a downloaded browser). Outside CI the test is skipped when that Chromium or
Playwright is missing; under CI (``CI`` set) it fails instead.
``FLASK_EXECUTE_SCREENSHOT=1`` also copies the screenshot to
``examples/progress/screenshot.png``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STEPS = 8
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "progress"


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set: .ci/run installs Debian's chromium and Playwright).")
    pytest.skip(f"{what}; install Debian's 'chromium' package and the 'test' extra.")


@pytest.fixture
def sync_api() -> t.Any:
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"{CHROMIUM} is missing")
    try:
        from playwright import sync_api
    except ImportError:
        _missing("Playwright for Python is not installed")
    return sync_api


@pytest.fixture
def progress_app(broker_url: str, log_dir: str) -> Flask:
    from examples.progress import app as example

    return example.create_app(
        {
            "CELERY_BROKER_URL": broker_url,
            "CELERY_LOG_DIR": log_dir,
            "PROGRESS_STEPS": STEPS,
            "PROGRESS_STEP_SECONDS": 0.4,
        }
    )


@pytest.fixture
def server_url(progress_app: Flask) -> Iterator[str]:
    """The example app on a free port; its local worker is stopped afterwards."""
    from examples.progress.app import celery

    app = progress_app
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="progress-page", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
        with app.app_context():
            celery.stop()


def test_progress_page(sync_api: t.Any, server_url: str, tmp_path: Path) -> None:
    url = server_url
    seen: list[int] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 420})
            page.goto(url)
            bar = page.locator("#bar")
            assert bar.get_attribute("aria-valuenow") == "0"
            page.click("#start")

            # Sample the bar until the result shows (worker start-up included).
            deadline = time.monotonic() + 60
            while not page.locator("#result").inner_text() and time.monotonic() < deadline:
                value = int(bar.get_attribute("aria-valuenow") or 0)
                if not seen or seen[-1] != value:
                    seen.append(value)
                page.wait_for_timeout(50)

            result = page.locator("#result").inner_text()
            assert result.startswith(f"Finished {STEPS} steps in "), result
            intermediate = [v for v in seen if 0 < v < 100]
            print(f"bar values seen: {seen}")
            assert len(set(intermediate)) >= 2, f"the bar did not advance live: {seen}"
            assert intermediate == sorted(intermediate), f"the bar went back: {seen}"
            assert bar.get_attribute("aria-valuenow") == "100"
            assert page.locator("#count").inner_text() == f"{STEPS}/{STEPS}"
            assert page.locator("#state").inner_text() == "SUCCESS"
            # the screenshot must show the bar full, not still animating
            page.wait_for_function(
                "() => document.getElementById('bar').getBoundingClientRect().width"
                " === document.querySelector('.track').getBoundingClientRect().width",
                timeout=5000,
            )

            screenshot = tmp_path / "progress.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 0
    if os.environ.get("FLASK_EXECUTE_SCREENSHOT"):
        shutil.copyfile(screenshot, EXAMPLE / "screenshot.png")


@pytest.mark.parametrize("steps", [0, 101, "ten", None])
def test_bad_steps_are_refused(progress_app: Flask, steps: object) -> None:
    response = progress_app.test_client().post("/jobs", json={"steps": steps})
    assert response.status_code == 400
    assert response.json == {"error": "'steps' must be an integer from 1 to 100."}


def test_unknown_job_is_pending(progress_app: Flask) -> None:
    client = progress_app.test_client()
    assert client.get("/jobs/not-a-task-id").status_code == 404
    task_id = "00000000-0000-4000-8000-000000000000"
    assert client.get(f"/jobs/{task_id}").json == {"id": task_id, "state": "PENDING"}

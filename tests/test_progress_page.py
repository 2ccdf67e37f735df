"""End to end: the progress page of examples/progress in headless Chromium: the bar
advances on server-sent events with no further request, and the job stays in the URL
(reload, back and forward, a second tab follow it; another browser may not).

The example app runs in a thread of this process (werkzeug's ``make_server``) on the
test Redis, with a real local worker; Playwright drives Debian's ``/usr/bin/chromium``
(never a downloaded browser). Outside CI the test is skipped when that Chromium or
Playwright is missing; under CI (``CI`` set) it fails instead.
``FLASK_EXECUTE_SCREENSHOT=1`` also copies the screenshot to
``examples/progress/screenshot.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

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
STEPS = 10
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


def sample(page: t.Any, until: t.Callable[[int], bool], seen: list[int]) -> None:
    """Note each new value of the bar until ``until(value)`` or a result shows."""
    bar = page.locator("#bar")
    deadline = time.monotonic() + 60  # worker start-up included
    while time.monotonic() < deadline:
        value = int(bar.get_attribute("aria-valuenow") or 0)
        if not seen or seen[-1] != value:
            seen.append(value)
        if until(value) or page.locator("#result").inner_text():
            return
        page.wait_for_timeout(30)
    raise AssertionError(f"the page did not get there in 60 s: {seen}")


def test_progress_page(sync_api: t.Any, server_url: str, tmp_path: Path) -> None:
    url = server_url
    first: list[int] = []
    second: list[int] = []
    requests: list[tuple[str, str]] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 800, "height": 420})
            page = context.new_page()
            # every request of the page but the browser's own favicon.ico
            page.on(
                "request",
                lambda r: "favicon" in r.url or requests.append((r.method, urlparse(r.url).path)),
            )
            page.goto(url)
            bar = page.locator("#bar")
            assert bar.get_attribute("aria-valuenow") == "0"
            page.click("#start")

            # the bar advances by several steps while no request is made
            sample(page, lambda v: v > 0, first)
            job_url = page.url
            assert re.fullmatch(rf"{url}/jobs/[0-9a-f-]{{36}}", job_url), job_url
            job = urlparse(job_url).path
            made = list(requests)
            sample(page, lambda v: v >= 40, first)
            assert requests == made, f"requests while the bar advanced: {requests[len(made) :]}"
            steps = [v for v in first if 0 < v < 100]
            print(f"bar values seen before the reload: {first}")
            assert len(set(steps)) >= 2, f"the bar did not advance live: {first}"

            # a reload follows the same job, from where it is now
            page.reload()
            assert page.url == job_url
            sample(page, lambda v: False, second)
            print(f"bar values seen after the reload: {second}")
            after = [v for v in second if 0 < v < 100]
            assert after and min(after) >= max(steps), (first, second)

            result = page.locator("#result").inner_text()
            assert result.startswith(f"Finished {STEPS} steps in "), result
            assert bar.get_attribute("aria-valuenow") == "100"
            assert page.locator("#count").inner_text() == f"{STEPS}/{STEPS}"
            assert page.locator("#state").inner_text() == "SUCCESS"
            assert requests == [
                ("GET", "/"),
                ("POST", "/jobs"),
                ("GET", f"{job}/events"),
                ("GET", job),
                ("GET", f"{job}/events"),
            ], requests
            # the screenshot must show the bar full, not still animating
            page.wait_for_function(
                "() => document.getElementById('bar').getBoundingClientRect().width"
                " === document.querySelector('.track').getBoundingClientRect().width",
                timeout=5000,
            )
            screenshot = tmp_path / "progress.png"
            page.screenshot(path=str(screenshot), full_page=True)

            # back to the start page, forward to the job: it is followed again
            page.go_back()
            page.wait_for_function("() => location.pathname === '/'", timeout=5000)
            page.wait_for_function(
                "() => document.getElementById('state').textContent === 'Idle'", timeout=5000
            )
            page.go_forward()
            page.wait_for_function(
                "() => document.getElementById('result').textContent.startsWith('Finished')",
                timeout=10000,
            )
            assert page.url == job_url

            # a second tab of this browser follows it; another browser may not
            tab = context.new_page()
            tab.goto(job_url)
            tab.wait_for_function(
                "() => document.getElementById('result').textContent.startsWith('Finished')",
                timeout=10000,
            )
            assert tab.locator("#count").inner_text() == f"{STEPS}/{STEPS}"
            stranger = browser.new_context().new_page()
            assert stranger.goto(job_url).status == 404
            assert stranger.request.get(f"{job_url}/events").status == 404
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


def test_a_job_this_browser_did_not_start_is_not_found(progress_app: Flask) -> None:
    client = progress_app.test_client()
    task_id = "00000000-0000-4000-8000-000000000000"
    assert client.get("/jobs/not-a-task-id").status_code == 404
    assert client.get(f"/jobs/{task_id}").status_code == 404
    assert client.get(f"/jobs/{task_id}/events").status_code == 404
    with client.session_transaction() as session:
        session["jobs"] = [["11111111-1111-4111-8111-111111111111", 3]]
    assert client.get(f"/jobs/{task_id}/events").status_code == 404

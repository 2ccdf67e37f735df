"""A page that runs a long job on Celery and follows it live.

Run it with ``python examples/progress/app.py`` (or ``make serve``) and open
http://127.0.0.1:5000. The Start button posts to ``/jobs``, which submits
``long_job`` with ``celery.submit``; the job reports each step with
``current_task.update_state(state="PROGRESS", ...)``. The page then moves to
``/jobs/<id>`` (the job stays in the URL: a reload, a second tab or the back
button follows the same job) and opens an ``EventSource`` on
``/jobs/<id>/events``, which returns ``flask_execute.stream(id)``: every step is
pushed to the page the moment the worker reports it, and nothing polls.

Who may follow a job is this app's decision, as for any view: the signed session
cookie lists the jobs this browser started, and any other id is a 404. The job's
result text is shown (the app chose it for display); an error shows its type only.

The first Start starts a local worker (and, when nothing answers on
localhost:6379, a private Redis); both stop with the server. Worker logs go to
``examples/progress/logs/``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import typing as t
import uuid
from collections.abc import Mapping

from flask import abort
from flask import Blueprint
from flask import current_app
from flask import Flask
from flask import render_template
from flask import request
from flask import session
from flask import url_for
from flask.typing import ResponseReturnValue

from flask_execute import Celery
from flask_execute import current_task
from flask_execute import ExecuteError
from flask_execute import stream

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_STEPS = 100
KEEP_JOBS = 20  # jobs remembered per browser

celery = Celery()
bp = Blueprint("progress", __name__)


def long_job(steps: int) -> str:
    """Work through ``steps`` steps, reporting progress after each one.

    Runs on a worker, inside the app context, so the app's config is at hand.
    """
    delay = current_app.config["PROGRESS_STEP_SECONDS"]
    started = time.monotonic()
    for done in range(1, steps + 1):
        time.sleep(delay)
        current_task.update_state(state="PROGRESS", meta={"done": done, "total": steps})
    return f"Finished {steps} steps in {time.monotonic() - started:.1f} s"


@bp.get("/")
def index() -> ResponseReturnValue:
    return render_template("index.html", steps=current_app.config["PROGRESS_STEPS"], job=None)


@bp.post("/jobs")
def start_job() -> ResponseReturnValue:
    data = request.get_json(silent=True) or request.form
    try:
        steps = int(data.get("steps", current_app.config["PROGRESS_STEPS"]))
    except (TypeError, ValueError):
        steps = 0
    if not 1 <= steps <= MAX_STEPS:
        return {"error": f"'steps' must be an integer from 1 to {MAX_STEPS}."}, 400
    try:
        future = celery.submit(long_job, steps)
    except ExecuteError as exc:  # no broker, or the worker would not start
        return {"error": str(exc)}, 503
    # the jobs this browser may follow: the session cookie is signed, so it cannot
    # be edited to follow someone else's job
    session["jobs"] = [*session.get("jobs", [])[-(KEEP_JOBS - 1) :], [future.id, steps]]
    job = _job(future.id, steps)
    return job, 202, {"Location": job["url"]}


@bp.get("/jobs/<uuid:task_id>")
def job_page(task_id: uuid.UUID) -> ResponseReturnValue:
    """The page following one job: a reload or a second tab opens it again."""
    job = _job(str(task_id), _allowed(str(task_id)))
    return render_template("index.html", steps=job["total"], job=job)


@bp.get("/jobs/<uuid:task_id>/events")
def job_events(task_id: uuid.UUID) -> ResponseReturnValue:
    """The job's states as server-sent events, pushed as the worker reports them."""
    _allowed(str(task_id))
    return stream(
        str(task_id),
        result=True,  # long_job returns a sentence written to be shown
        error=lambda exc: f"The job failed ({type(exc).__name__}).",  # not its message
    )


def _allowed(task_id: str) -> int:
    """The number of steps of a job this browser started; 404 for any other id (not
    403: whether the id exists is nobody else's business)."""
    for job_id, steps in session.get("jobs", []):
        if job_id == task_id:
            return int(steps)
    abort(404)


def _job(task_id: str, steps: int) -> dict[str, t.Any]:
    return {
        "id": task_id,
        "total": steps,
        "url": url_for(".job_page", task_id=task_id),
        "events": url_for(".job_events", task_id=task_id),
    }


def create_app(config: Mapping[str, t.Any] | None = None) -> Flask:
    """Build the app; ``config`` overrides the defaults (tests pass their broker)."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=os.environ.get("SECRET_KEY", "progress-example-only-change-me"),
        CELERY_FLOWER=False,
        CELERY_LOG_DIR=os.path.join(HERE, "logs"),
        PROGRESS_STEPS=10,
        PROGRESS_STEP_SECONDS=0.5,
    )
    if config:
        app.config.update(config)
    os.makedirs(app.config["CELERY_LOG_DIR"], exist_ok=True)
    celery.init_app(app)
    app.register_blueprint(bp)
    return app


def main() -> None:
    app = create_app()
    # `kill <pid>` should stop the workers as cleanly as Ctrl+C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        app.run(host="127.0.0.1", port=5000, debug=False, use_reloader=False)
    finally:
        with app.app_context():
            celery.stop()


if __name__ == "__main__":
    main()

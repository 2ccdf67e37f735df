"""A page that runs a long job on Celery and follows it live.

Run it with ``python examples/progress/app.py`` (or ``make serve``) and open
http://127.0.0.1:5000. The Start button posts to ``/jobs``, which submits
``long_job`` with ``celery.submit``; the job reports each step with
``current_task.update_state(state="PROGRESS", ...)``. The page polls
``/jobs/<id>``, which reads the task back with ``celery.get(id)`` (only the id is
needed, so any web process can answer), and draws the bar, then the result.

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

from flask import Blueprint
from flask import current_app
from flask import Flask
from flask import render_template
from flask import request
from flask import url_for
from flask.typing import ResponseReturnValue

from flask_execute import Celery
from flask_execute import current_task
from flask_execute import ExecuteError

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_STEPS = 100

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
    return render_template("index.html", steps=current_app.config["PROGRESS_STEPS"])


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
    url = url_for(".job", task_id=future.id)
    return {"id": future.id, "total": steps, "url": url}, 202, {"Location": url}


@bp.get("/jobs/<uuid:task_id>")
def job(task_id: uuid.UUID) -> ResponseReturnValue:
    # celery.get() reads the task's current state at once; nothing here waits.
    future = celery.get(str(task_id))
    body: dict[str, t.Any] = {"id": future.id, "state": future.state}
    if future.cancelled():
        body["error"] = "The job was cancelled."
    elif future.done():
        exc = future.exception(timeout=0)
        if exc is None:
            body["result"] = future.result(timeout=0)
        else:
            body["error"] = f"{type(exc).__name__}: {exc}"
    elif isinstance(future.info, dict):
        body["info"] = future.info  # {"done": i, "total": n} while PROGRESS
    return body


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

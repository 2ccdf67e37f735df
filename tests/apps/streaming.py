"""An app whose views stream task states as server-sent events (tests/test_stream.py).

Its blueprint also serves the tests' other apps on the same broker: an observer without
workers of its own (another web process, for which every task is foreign) and an eager
app.
"""

from __future__ import annotations

import os

from flask import abort
from flask import Blueprint
from flask import current_app
from flask import Flask
from flask import request
from flask import session
from flask.typing import ResponseReturnValue

from flask_execute import Celery
from flask_execute import stream
from tests.apps import tasks

BROKER_URL = os.environ.get("FLASK_EXECUTE_TEST_REDIS", "redis://localhost") + "/3"
CONFIG = {
    "SECRET_KEY": "streaming-tests-secret-long-enough-for-a-signing-key",
    "CELERY_BROKER_URL": BROKER_URL,
    "CELERY_LOG_DIR": os.environ.get("FLASK_EXECUTE_TEST_LOGS"),
    "CELERY_FLOWER": False,
}
bp = Blueprint("streams", __name__)


@bp.get("/events/<task_id>")
def events(task_id: str) -> ResponseReturnValue:
    """Any task: the query string chooses what is shown and the timeouts."""
    args = request.args
    return stream(
        task_id,
        info="noinfo" not in args,
        result="result" in args,
        error="error" in args,
        idle_timeout=float(args.get("idle", 30)),
        heartbeat=float(args.get("heartbeat", 15)),
    )


@bp.post("/jobs")
def start_job() -> ResponseReturnValue:
    future = current_app.extensions["celery"].submit(tasks.report_progress, 3, 0.1)
    session["jobs"] = [*session.get("jobs", [])[-9:], future.id]
    return {"id": future.id}, 202


@bp.get("/jobs/<task_id>/events")
def job_events(task_id: str) -> ResponseReturnValue:
    # the authorisation of any Flask view: only the session that started a job follows it
    if task_id not in session.get("jobs", ()):
        abort(404)
    return stream(task_id, result=True)


def make_app(name: str, **config: object) -> Flask:
    """Another app on the same broker with these views (no workers of its own)."""
    other = Flask(name)
    other.config.update(CONFIG, CELERY_START_LOCAL_WORKERS=False, **config)
    Celery(other)
    other.register_blueprint(bp)
    return other


app = Flask(__name__)
app.config.update(CONFIG, CELERY_WORKERS={"streaming": {"concurrency": 2}})
celery = Celery(app)
app.register_blueprint(bp)

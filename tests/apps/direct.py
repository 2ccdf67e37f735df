"""The direct setup: ``celery = Celery(app)`` at import time."""

from __future__ import annotations

import os

from flask import Flask

from flask_execute import Celery

app = Flask(__name__)
app.config.update(
    SECRET_KEY="direct-secret",
    CELERY_BROKER_URL=os.environ.get("FLASK_EXECUTE_TEST_REDIS", "redis://localhost") + "/1",
    CELERY_WORKERS={"direct": {"concurrency": 2, "queues": ["celery", "high-priority"]}},
    CELERY_LOG_DIR=os.environ.get("FLASK_EXECUTE_TEST_LOGS"),
    CELERY_FLOWER=False,
    MARKER="direct",
)
celery = Celery(app)
TEARDOWNS = []


@app.teardown_appcontext
def count_teardown(exc):
    TEARDOWNS.append(os.getpid())

"""A second flask-execute app for the cold start (first submit on a fresh app).

A module of its own: local services are locked per app (import name), so this app
starts its own worker ``cold@<host>`` instead of finding the orchestrator's. It uses its
own Redis db (``BENCH_COLD_BROKER``), so no other worker can take its first task.
"""

from __future__ import annotations

from flask import Flask

from bench import env_value
from flask_execute import Celery

app = Flask(__name__)
app.config.update(
    SECRET_KEY="flask-execute-benchmark-only",
    CELERY_BROKER_URL=env_value("BENCH_COLD_BROKER"),
    CELERY_WORKERS={"cold": {"concurrency": 2, "without_gossip": True}},
    CELERY_START_TIMEOUT=30,
    CELERY_LOG_LEVEL="WARNING",
    CELERY_LOG_DIR=env_value("BENCH_LOG_DIR"),
    CELERY_FLOWER=False,
)
celery = Celery(app)

"""The flask-execute side: a Flask app whose first ``submit`` auto-starts one local
worker ``bench@<host>`` (prefork, concurrency 2, no gossip; mingle is off by default).

Configured from the environment by the orchestrator (``BENCH_FE_BROKER``,
``BENCH_LOG_DIR``); ``BENCH_FE_LOCAL=0`` makes a child process use the orchestrator's
running worker instead of starting its own (the signing key is the same).
"""

from __future__ import annotations

import os

from flask import Flask

from bench import env_value
from flask_execute import Celery

WORKER = "bench"

app = Flask(__name__)
app.config.update(
    SECRET_KEY="flask-execute-benchmark-only",
    CELERY_BROKER_URL=env_value("BENCH_FE_BROKER"),
    CELERY_WORKERS={WORKER: {"concurrency": 2, "without_gossip": True}},
    CELERY_START_LOCAL_WORKERS=os.environ.get("BENCH_FE_LOCAL", "1") == "1",
    CELERY_START_TIMEOUT=30,
    # the plain worker runs at `celery worker`'s default level too: no per-task lines
    CELERY_LOG_LEVEL="WARNING",
    CELERY_LOG_DIR=env_value("BENCH_LOG_DIR"),
    CELERY_FLOWER=False,
)
celery = Celery(app)

"""The flask-execute side of the "P web processes" scenario (:mod:`bench.webprocs`).

:mod:`bench.fe_app` with a Redis db (``BENCH_WEBP_BROKER``), a worker
``bench-webp@<host>`` (the same shape: prefork, concurrency 2, no gossip) and result
keys (prefix ``webp:``) of its own. The prefix matters: pub/sub channels are not per
db, and the orchestrator's own result watcher for :mod:`bench.fe_app` (a pattern
subscription to ``celery-task-meta-*`` on today's main) would otherwise receive every
result of the scenario too — one more "web process" than the scenario says.

The orchestrator starts the worker with ``celery.start()`` (no submit, so it holds no
result watcher of this app); the web processes are children
(``python -m bench.child webproc --side=fe``) with ``BENCH_WEBP_LOCAL=0``, which use
that worker instead of starting their own (the signing key is the same).
"""

from __future__ import annotations

import os

from flask import Flask

from bench import env_value
from flask_execute import Celery

WORKER = "bench-webp"

app = Flask(__name__)
app.config.update(
    SECRET_KEY="flask-execute-benchmark-only",
    CELERY_BROKER_URL=env_value("BENCH_WEBP_BROKER"),
    CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS={"global_keyprefix": "webp:"},
    CELERY_WORKERS={WORKER: {"concurrency": 2, "without_gossip": True}},
    CELERY_START_LOCAL_WORKERS=os.environ.get("BENCH_WEBP_LOCAL", "1") == "1",
    CELERY_START_TIMEOUT=30,
    CELERY_LOG_LEVEL="WARNING",
    CELERY_LOG_DIR=env_value("BENCH_LOG_DIR"),
    CELERY_FLOWER=False,
)
celery = Celery(app)

"""The encrypted flask-execute side: :mod:`bench.fe_app` with ``CELERY_ENCRYPT = True``.

The same worker shape (``bench-crypt@<host>``: prefork, concurrency 2, no gossip),
auto-started by the first ``submit``, on a Redis db of its own (``BENCH_CRYPT_BROKER``).
Its result keys carry a ``crypt:`` prefix: pub/sub channels are not per db, and
without it the unencrypted side's result watcher (one pattern subscription to
``celery-task-meta-*``) would also receive every encrypted result, and vice versa.
"""

from __future__ import annotations

from flask import Flask

from bench import env_value
from flask_execute import Celery

WORKER = "bench-crypt"

app = Flask(__name__)
app.config.update(
    SECRET_KEY="flask-execute-benchmark-only",
    CELERY_BROKER_URL=env_value("BENCH_CRYPT_BROKER"),
    CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS={"global_keyprefix": "crypt:"},
    CELERY_WORKERS={WORKER: {"concurrency": 2, "without_gossip": True}},
    CELERY_START_TIMEOUT=30,
    CELERY_LOG_LEVEL="WARNING",
    CELERY_LOG_DIR=env_value("BENCH_LOG_DIR"),
    CELERY_FLOWER=False,
    CELERY_ENCRYPT=True,
)
celery = Celery(app)

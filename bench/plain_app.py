"""The plain-Celery side: a registered task, JSON serializers, its own queue and Redis db.

``celery -A bench.plain_app worker`` runs it. Configured from the environment by the
orchestrator (``BENCH_PLAIN_BROKER``, ``BENCH_PLAIN_QUEUE``). Its result keys carry a
``plain:`` prefix: Redis pub/sub channels are not per db, and without the prefix the
flask-execute result watcher (one pattern subscription to ``celery-task-meta-*``) of the
same process would also receive — and decode — every plain result, slowing the plain side.
"""

from __future__ import annotations

from celery import Celery

from bench import env_value

BROKER = env_value("BENCH_PLAIN_BROKER")
QUEUE = env_value("BENCH_PLAIN_QUEUE")

app = Celery("bench_plain", set_as_current=False)
app.conf.update(
    broker_url=BROKER,
    result_backend=BROKER,
    result_backend_transport_options={"global_keyprefix": "plain:"},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.add")
def add(x: int, y: int) -> int:
    return x + y

"""Registered tasks in the direct setup (``@celery.task`` after ``Celery(app)``)."""

from __future__ import annotations

import os

from celery import Task
from flask import current_app
from flask import Flask

from flask_execute import Celery


class BaseTask(Task):
    marker = "base"


app = Flask(__name__)
app.config.update(
    SECRET_KEY="registered",
    CELERY_BROKER_URL=os.environ.get("FLASK_EXECUTE_TEST_REDIS", "redis://localhost") + "/13",
    CELERY_WORKERS=["registered"],
    CELERY_LOG_DIR=os.environ.get("FLASK_EXECUTE_TEST_LOGS"),
    CELERY_FLOWER=False,
    MARKER="registered",
)
celery = Celery(app, base_task=BaseTask)


@celery.task
def mul(x, y):
    return x * y


@celery.task(bind=True, max_retries=3)
def whoami(self):
    return {"id": self.request.id, "retries": self.max_retries, "marker": self.marker}


@celery.task(name="custom.name")
def named():
    return current_app.config["MARKER"]

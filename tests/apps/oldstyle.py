"""An app written for Flask-Execute 0.1.6, from the examples of its docs/usage.rst and
its test fixtures, with only what docs/migrating.md says to change (the pickle keys
deleted, a real SECRET_KEY)."""

from __future__ import annotations

import os
import time

from celery.schedules import solar
from flask import Flask

from flask_execute import Celery
from flask_execute import current_task

celery = Celery()


# 0.1.6's documented development config, plus its own test suite's keys
class Config:
    SECRET_KEY = "oldstyle-secret-for-the-migration-tests"
    CELERY_WORKERS = ["quorra"]
    CELERYD_CONCURRENCY = 2  # 0.1.6's tests used 4; 2 keeps a 2-core machine sane
    CELERY_START_LOCAL_WORKERS = True
    CELERY_START_TIMEOUT = 30
    CELERY_SANITIZE_ARGUMENTS = True
    CELERY_ALWAYS_EAGER = False
    CELERY_LOG_LEVEL = "info"
    CELERY_FLOWER = False
    CELERY_FLOWER_PORT = 5555
    CELERY_FLOWER_ADDRESS = "127.0.0.1"
    CELERY_SCHEDULER = False  # 0.1.6's ProdConfig: no beat for these tests
    CELERYBEAT_SCHEDULE: dict[str, object] = {}


def create_app(**config: object) -> Flask:
    app = Flask(__name__)
    app.config.from_object(Config)
    app.config.update(config)
    celery.init_app(app)
    return app


def add(x, y):
    return x + y


def add_all(*args):
    return sum(args)


def sleep(n=5):
    for _ in range(n):
        time.sleep(0.1)
    return True


def fail():
    raise AssertionError("fail")


def task_id():
    return current_task.id


def add_with_progress(a, b):
    if current_task:
        current_task.update_state(state="PROGRESS")
    return a + b


def pid():
    return os.getpid()


@celery.task
def registered():
    return True


@celery.schedule(hour=0, minute=0, name="scheduled-task-to-run-at-midnight")
def scheduled_task():
    return True


@celery.schedule(30, args=(1, 2), kwargs=dict(arg3="foo"))
def task_to_run_every_30_seconds(arg1, arg2, arg3="test"):
    return arg1, arg2, arg3


@celery.schedule(hour=7, minute=30, day_of_week=1)
def task_to_run_every_monday_morning():
    return True


@celery.schedule(solar("sunset", -37.81753, 144.96715), name="solar-task")
def task_to_run_every_sunset():
    return True

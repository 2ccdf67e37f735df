"""The factory setup: ``celery = Celery()`` then ``init_app`` in ``create_app``."""

from __future__ import annotations

import os

from flask import Flask

from flask_execute import Celery

celery = Celery()
CREATED = []


class Config:
    SECRET_KEY = "factory-secret"
    CELERY_BROKER_URL = os.environ.get("FLASK_EXECUTE_TEST_REDIS", "redis://localhost") + "/2"
    CELERY_WORKERS = {"factory": {"concurrency": 2}}
    CELERY_LOG_DIR = os.environ.get("FLASK_EXECUTE_TEST_LOGS")
    CELERY_FLOWER = False
    MARKER = "factory"


def create_app(config=None):
    app = Flask(__name__)
    app.config.from_object(Config)
    if config:
        app.config.update(config)
    celery.init_app(app)
    CREATED.append(os.getpid())
    return app


def created():
    """How many apps this process built (a worker must build exactly one)."""
    return len(CREATED)

"""An app whose worker the admission tests attack: registered tasks next to the
dispatch tasks, gzip-compressed messages, a small message size limit."""

from __future__ import annotations

from flask import Flask

from flask_execute import Celery

celery = Celery()


def create_app(**config: object) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="guarded-secret", CELERY_FLOWER=False)
    app.config.update(config)
    celery.init_app(app)
    return app


@celery.task
def echo(value):
    return value

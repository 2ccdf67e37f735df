"""A tiny user project: a Flask app factory with flask-execute and one slow job."""

from __future__ import annotations

from flask import Flask

from flask_execute import Celery
from flask_execute import current_task

celery = Celery()


def create_app(config: dict[str, object] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="shop-dev", CELERY_FLOWER=False)
    app.config.update(config or {})
    celery.init_app(app)
    return app


def invoice_total(prices: list[float], tax: float = 0.2) -> float:
    """The job the shop sends to a worker."""
    if current_task:
        current_task.update_state(state="PROGRESS", meta={"items": len(prices)})
    return round(sum(prices) * (1 + tax), 2)


@celery.task
def ping() -> str:
    return "pong"

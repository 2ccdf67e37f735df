"""A schedule firing every second (beat auto-start); the file it appends to comes
from the environment."""

from __future__ import annotations

import json
import os

from flask import Flask

from flask_execute import Celery

app = Flask(__name__)
app.config.update(
    SECRET_KEY="scheduled",
    CELERY_BROKER_URL=os.environ.get("FLASK_EXECUTE_TEST_REDIS", "redis://localhost") + "/14",
    CELERY_WORKERS=["scheduled"],
    CELERY_LOG_DIR=os.environ.get("FLASK_EXECUTE_TEST_LOGS"),
    CELERY_FLOWER=False,
)
app.config.update(json.loads(os.environ.get("SCHEDULED_CONFIG", "{}")))
celery = Celery(app)


@celery.schedule(1.0, args=(os.environ.get("SCHEDULED_FILE", os.devnull),))
def tick(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")

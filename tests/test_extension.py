"""``app.extensions["celery"]`` is the extension object (issue 11.2), as Flask-SQLAlchemy
stores itself and as Flask-Execute 0.1.6 did: code written for 0.1.6 calls
``current_app.extensions["celery"].submit(...)``."""

from __future__ import annotations

from flask import current_app
from flask import Flask

from flask_execute import Celery
from tests.apps import tasks


def test_the_app_holds_the_extension_itself(setup):
    app, celery = setup
    assert app.extensions["celery"] is celery
    # 0.1.6-style code that only has the app
    assert current_app.extensions["celery"].submit(tasks.add, 1, 2).result(timeout=10) == 3
    assert celery.runtime(app) is celery.runtime()
    assert celery.runtime(app).controller is celery.controller


def test_one_extension_keeps_each_apps_own_runtime():
    celery = Celery()
    first, second = Flask("ext_first"), Flask("ext_second")
    for app in (first, second):
        app.config.update(CELERY_ALWAYS_EAGER=True)
        celery.init_app(app)
    assert first.extensions["celery"] is second.extensions["celery"] is celery
    assert celery.runtime(first) is not celery.runtime(second)
    assert celery.runtime(first).app is first
    with second.app_context():
        assert celery.runtime() is celery.runtime(second)

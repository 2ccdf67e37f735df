"""The SPEC's examples of sections 1, 6 and 7, as written, against real workers."""

from __future__ import annotations

import socket
import textwrap

import pytest
from celery import Task
from flask import Flask

from flask_execute import Celery
from tests.apps import tasks


def test_base_task_routes_every_task(broker_url, log_dir):
    class MyBaseTask(Task):
        queue = "hipri"

    app = Flask(__name__)
    app.config.update(SECRET_KEY="s", CELERY_BROKER_URL=broker_url, CELERY_LOG_DIR=log_dir)
    celery = Celery(base_task=MyBaseTask)
    celery.init_app(app)
    try:
        state = app.extensions["celery"].runtime(app)
        assert isinstance(state.dispatch, MyBaseTask)
        future = celery.submit(tasks.add, 1, 2)
        assert future.result(timeout=20) == 3
        active = celery.inspect.active_queues()
        (queues,) = active.values()
        assert {q["name"] for q in queues} == {"celery", "hipri"}
    finally:
        celery.stop()


def test_workers_dict_queues_and_status(broker_url, log_dir):
    class Config:
        SECRET_KEY = "s"
        CELERY_BROKER_URL = broker_url
        CELERY_LOG_DIR = log_dir
        CELERY_FLOWER = False
        CELERY_WORKERS = {
            "foo": {
                "concurrency": 3,  # the SPEC says 10; 3 keeps a 2-core CI machine sane
                "loglevel": "error",
                "queues": ["low-priority", "high-priority"],
            },
            "bar": {"concurrency": 2, "queues": ["high-priority"]},
            "baz": {},
        }

    celery = Celery()
    app = Flask(__name__)
    app.config.from_object(Config)
    celery.init_app(app)
    host = socket.gethostname()
    try:
        celery.start()
        assert celery.status() == {f"foo@{host}": "OK", f"bar@{host}": "OK", f"baz@{host}": "OK"}
        queues = {
            node.split("@")[0]: sorted(q["name"] for q in qs)
            for node, qs in celery.inspect.active_queues().items()
        }
        assert queues == {
            "foo": ["high-priority", "low-priority"],
            "bar": ["high-priority"],
            "baz": ["celery"],
        }
        assert celery.submit(tasks.add, 1, 2).result(timeout=10) == 3
        assert celery.submit(tasks.add, 1, 2, queue="high-priority").result(timeout=10) == 3
        assert celery.submit(tasks.add, 1, 2, queue="low-priority").result(timeout=10) == 3
        # routing: only foo consumes low-priority, only foo and bar high-priority
        low = celery.map(tasks.worker_name, *[()] * 6, queue="low-priority").result(10)
        assert set(low) == {f"foo@{host}"}
        high = celery.map(tasks.worker_name, *[()] * 12, queue="high-priority").result(10)
        assert set(high) <= {f"foo@{host}", f"bar@{host}"}
    finally:
        celery.stop()


@pytest.mark.parametrize("workers", [2, ["foo", "bar"]])
def test_worker_count_and_names(workers, broker_url, log_dir):
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="s", CELERY_BROKER_URL=broker_url, CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS=workers, CELERY_FLOWER=False,
    )  # fmt: skip
    celery = Celery(app)
    host = socket.gethostname()
    names = ["worker1", "worker2"] if workers == 2 else workers
    try:
        celery.start()
        assert celery.status() == {f"{n}@{host}": "OK" for n in names}
    finally:
        celery.stop()


def test_flask_sqlalchemy_session_in_tasks(tmp_path, tmp_modules, broker_url, log_dir):
    pytest.importorskip("flask_sqlalchemy")
    tmp_modules.write(
        "dbapp",
        textwrap.dedent(
            f"""
            from flask import Flask
            from flask_sqlalchemy import SQLAlchemy
            from flask_execute import Celery

            db = SQLAlchemy()
            celery = Celery()

            class Item(db.Model):
                id = db.Column(db.Integer, primary_key=True)
                name = db.Column(db.String(50))

            def create_app():
                app = Flask(__name__)
                app.config.update(
                    SECRET_KEY="db", CELERY_BROKER_URL={broker_url!r},
                    CELERY_LOG_DIR={log_dir!r}, CELERY_WORKERS=["db"], CELERY_FLOWER=False,
                    SQLALCHEMY_DATABASE_URI="sqlite:///{tmp_path / "db.sqlite"}",
                )
                db.init_app(app)
                celery.init_app(app)
                return app

            def count_items():
                return db.session.query(Item).count()

            def add_item(name):
                db.session.add(Item(name=name))
                db.session.commit()
                return db.session.query(Item).filter_by(name=name).one().id
            """
        ),
    )
    dbapp = tmp_modules.load("dbapp")
    app = dbapp.create_app()
    with app.app_context():
        dbapp.db.create_all()
        dbapp.db.session.add(dbapp.Item(name="first"))
        dbapp.db.session.commit()
        try:
            assert dbapp.celery.submit(dbapp.count_items).result(timeout=20) == 1
            item_id = dbapp.celery.submit(dbapp.add_item, "second").result(timeout=20)
            assert dbapp.db.session.get(dbapp.Item, item_id).name == "second"
            counts = dbapp.celery.map(dbapp.count_items, *[()] * 4).result(timeout=20)
            assert counts == [2] * 4
        finally:
            dbapp.celery.stop()

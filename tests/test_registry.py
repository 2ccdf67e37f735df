"""@celery.task and @celery.schedule: before and after init_app, with real workers
and a real beat."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

import pytest
from celery.schedules import crontab
from flask import Flask

from flask_execute import Celery
from tests.conftest import descendants
from tests.conftest import wait_gone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def registered():
    from tests.apps import registered

    with registered.app.app_context():
        registered.celery.start()
        try:
            yield registered
        finally:
            registered.celery.stop()


def test_direct_registration(registered):
    with registered.app.app_context():
        assert registered.mul.delay(6, 7).get(timeout=10) == 42
        assert registered.celery.task.mul.delay(2, 3).get(timeout=10) == 6
        assert registered.celery.task["tests.apps.registered.mul"].name == registered.mul.name
        assert registered.mul(2, 5) == 10  # called directly: runs here
        result = registered.whoami.apply_async()
        facts = result.get(timeout=10)
        assert facts == {"id": result.id, "retries": 3, "marker": "base"}
        assert registered.named.delay().get(timeout=10) == "registered"
        (names,) = registered.celery.inspect.registered().values()
        assert {"tests.apps.registered.mul", "custom.name", "flask_execute.dispatch"} <= set(names)
        # the base task is honoured by submitted and registered tasks alike
        state = registered.app.extensions["celery"].runtime(registered.app)
        assert isinstance(state.dispatch, registered.BaseTask)
        assert isinstance(registered.mul.task, registered.BaseTask)
        assert registered.celery.submit(registered.mul, 3, 3).result(timeout=10) == 9


def test_factory_registration_before_and_after_init_app(broker_url):
    celery = Celery()

    @celery.task
    def before(x):
        return x

    app = Flask(__name__)
    app.config.update(SECRET_KEY="f", CELERY_BROKER_URL=broker_url, CELERY_ALWAYS_EAGER=True)
    celery.init_app(app)

    @celery.task(name="late.task")
    def after(x):
        return x * 2

    state = app.extensions["celery"].runtime(app)
    assert "tests.test_registry.before" not in state.controller.tasks  # a local function
    assert f"{__name__}.test_factory_registration_before_and_after_init_app.<locals>.before" in (
        state.controller.tasks
    )
    assert "late.task" in state.controller.tasks
    with app.app_context():
        assert celery.task.before.apply(args=(4,)).get() == 4
        assert celery.task.after.apply(args=(4,)).get() == 8
    with pytest.raises(AttributeError, match="No task 'nope' is registered"):
        celery.task.nope  # noqa: B018


def test_one_instance_two_apps_both_know_the_tasks(broker_url):
    celery = Celery()

    @celery.task
    def shared():
        return 1

    apps = []
    for name in ("one", "two"):
        app = Flask(name)
        app.config.update(SECRET_KEY=name, CELERY_BROKER_URL=broker_url, CELERY_ALWAYS_EAGER=True)
        celery.init_app(app)
        apps.append(app)
    for app in apps:
        assert shared.name in app.extensions["celery"].runtime(app).controller.tasks
        with app.app_context():
            assert celery.task.shared.task.app is app.extensions["celery"].runtime(app).controller


def test_schedule_forms_and_merge(broker_url):
    celery = Celery()

    @celery.schedule(30, args=(1, 2), kwargs=dict(arg3="foo"))
    def every_30(arg1, arg2, arg3="test"):
        pass

    @celery.schedule(hour=0, minute=0, name="midnight")
    def at_midnight():
        pass

    @celery.schedule(hour=7, minute=30, day_of_week=1)
    def monday_morning():
        pass

    @celery.schedule(datetime.timedelta(minutes=5))
    def every_5_minutes():
        pass

    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="s",
        CELERY_BROKER_URL=broker_url,
        CELERYBEAT_SCHEDULE={"from-config": {"task": "x.y", "schedule": 10.0}},
    )
    celery.init_app(app)
    schedule = app.extensions["celery"].runtime(app).controller.conf.beat_schedule
    prefix = f"{__name__}.test_schedule_forms_and_merge.<locals>."
    assert schedule["from-config"] == {"task": "x.y", "schedule": 10.0}
    assert schedule[prefix + "every_30"] == {
        "task": prefix + "every_30", "schedule": 30.0, "args": (1, 2), "kwargs": {"arg3": "foo"},
    }  # fmt: skip
    assert schedule["midnight"]["schedule"] == crontab(hour=0, minute=0)
    assert schedule[prefix + "monday_morning"]["schedule"] == crontab(
        hour=7, minute=30, day_of_week=1
    )
    assert schedule[prefix + "every_5_minutes"]["schedule"] == datetime.timedelta(minutes=5)
    with pytest.raises(TypeError, match="unexpected keyword 'hours'"):
        celery.schedule(hours=1)
    with pytest.raises(TypeError, match="not both"):
        celery.schedule(30, hour=1)


def test_solar_schedule():
    pytest.importorskip("ephem")
    from celery.schedules import solar

    celery = Celery()

    @celery.schedule(solar("sunset", -37.81753, 144.96715), name="solar-task")
    def at_sunset():
        pass

    app = Flask(__name__)
    app.config.update(SECRET_KEY="s", CELERY_ALWAYS_EAGER=True)
    celery.init_app(app)
    assert isinstance(
        app.extensions["celery"]
        .runtime(app)
        .controller.conf.beat_schedule["solar-task"]["schedule"],
        solar,
    )


def _beats():
    found = []
    for pid in descendants():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"beat" in args and b"flask_execute.celery" in args:
            found.append(pid)
    return found


def test_beat_auto_starts_once_and_fires(tmp_path, log_dir):
    ticks = tmp_path / "ticks"
    release = tmp_path / "release"
    env = {**os.environ, "SCHEDULED_FILE": str(ticks)}
    script = (
        "import sys, time, os\n"
        "from tests.apps.scheduled import app, celery\n"
        "celery.start()\n"
        "print('STARTED', flush=True)\n"
        "while not os.path.exists(sys.argv[1]): time.sleep(0.05)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(release)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "STARTED"
        assert len(_beats()) == 1
        time.sleep(5)
        fired = ticks.read_text().splitlines() if ticks.exists() else []
        assert 3 <= len(fired) <= 7, fired
        assert len(_beats()) == 1
    finally:
        release.touch()
        for proc in procs:
            proc.wait(30)
            proc.stdout.close()
    assert not wait_gone(set(_beats()), 10)


def test_flower_starts_and_stops(broker_url, log_dir):
    pytest.importorskip("flower")
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    app = Flask("flower_app")
    app.config.update(
        SECRET_KEY="f", CELERY_BROKER_URL=broker_url, CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS=["flowered"], CELERY_FLOWER=True, CELERY_FLOWER_PORT=port,
    )  # fmt: skip
    celery = Celery(app)
    try:
        celery.start()
        services = app.extensions["celery"].runtime(app).services
        assert services.flower_url == f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{services.flower_url}/healthcheck", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "Flower did not answer"
                time.sleep(0.2)
    finally:
        celery.stop()


def test_flower_missing_is_one_log_line(broker_url, log_dir, monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flower" else real(name, *a)
    )
    app = Flask("noflower_app")
    app.config.update(
        SECRET_KEY="f", CELERY_BROKER_URL=broker_url, CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS=["noflower"], CELERY_FLOWER=True,
    )  # fmt: skip
    celery = Celery(app)
    caplog.set_level("INFO", logger="flask_execute.flower")
    try:
        celery.start()
        lines = [r.getMessage() for r in caplog.records if "Flower is not installed" in r.message]
        assert len(lines) == 1
        assert celery.submit(json.dumps, [1]).result(timeout=10) == "[1]"
    finally:
        celery.stop()


def test_eager_delay_runs_inline():
    celery = Celery()

    @celery.task
    def double(x):
        return 2 * x

    app = Flask("eager_registered")
    app.config.update(SECRET_KEY="e", CELERY_ALWAYS_EAGER=True)
    celery.init_app(app)
    with app.app_context():
        result = double.delay(21)
        assert result.get(timeout=1) == 42
        assert result.state == "SUCCESS"


def test_delay_starts_local_workers(tmp_modules, broker_url, log_dir):
    import textwrap

    tmp_modules.write(
        "delayapp",
        textwrap.dedent(
            f"""
            from flask import Flask
            from flask_execute import Celery

            app = Flask(__name__)
            app.config.update(SECRET_KEY="d", CELERY_BROKER_URL={broker_url!r},
                              CELERY_LOG_DIR={log_dir!r}, CELERY_WORKERS=["delayed"],
                              CELERY_FLOWER=False)
            celery = Celery(app)

            @celery.task
            def triple(x):
                return 3 * x
            """
        ),
    )
    delayapp = tmp_modules.load("delayapp")
    try:
        assert delayapp.triple.delay(3).get(timeout=20) == 9  # no start() before
        assert delayapp.celery.task.triple.apply_async((4,)).get(timeout=10) == 12
    finally:
        delayapp.celery.stop()

"""A newcomer's script, run as ``python usage.py`` or piped to ``python -``, against
real local workers: a top-level submit fails at once with the cause and the fix
(local workers import the script), a piped script runs, and a function that uses the
script's own ``app`` and ``celery`` travels by value and finds the worker's own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from flask import current_app

from flask_execute import current_task
from flask_execute import SerializationError
from tests.apps import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")  # first: the venv's own install may be another checkout
FIX = 'Put the code that submits under `if __name__ == "__main__":`'


def header(broker_url: str, **config: object) -> str:
    """The top of a script: an app with local workers on the test's own Redis db."""
    settings = {
        "SECRET_KEY": "script-secret-for-tests",
        "CELERY_BROKER_URL": broker_url,
        "CELERY_WORKERS": ["scripted"],
        "CELERY_FLOWER": False,
        **config,
    }
    return textwrap.dedent(
        f"""\
        from flask import Flask
        from flask_execute import Celery

        app = Flask(__name__)
        app.config.update({settings!r})
        celery = Celery(app)

        def add(x, y):
            return x + y
        """
    )


def run(cwd: object, *argv: str, stdin: str | None = None, timeout: float = 60) -> tuple[
    subprocess.CompletedProcess[str], float
]:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, input=stdin, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip
    return out, time.monotonic() - start


# --- item 2: a script that submits at import -------------------------------------------
TOP_LEVEL = {  # how: (the script's last lines, the call that is refused)
    "submit": (
        "with app.app_context():\n    print(celery.submit(add, 1, 2).result(timeout=10))\n",
        "print(celery.submit(add, 1, 2).result(timeout=10))",
    ),
    "map": (
        "print(celery.map(add, [1, 2], [3, 4]).result(timeout=10))\n",
        "print(celery.map(add, [1, 2], [3, 4]).result(timeout=10))",
    ),
    "delay": (
        "@celery.task\ndef ping():\n    return 'pong'\n\nprint(ping.delay().get(timeout=10))\n",
        "print(ping.delay().get(timeout=10))",
    ),
}


@pytest.mark.parametrize("how", sorted(TOP_LEVEL))
def test_top_level_submit_fails_at_once_with_the_fix(how, tmp_path, broker_url):
    script = tmp_path / "usage.py"
    tail, call = TOP_LEVEL[how]
    # a start timeout far longer than the test waits: only a prompt failure passes
    source = header(broker_url, CELERY_START_TIMEOUT=120, CELERY_LOG_DIR=str(tmp_path)) + tail
    script.write_text(source)
    line = 1 + [x.strip() for x in source.splitlines()].index(call)
    out, took = run(tmp_path, "usage.py", timeout=40)
    assert out.returncode == 1
    assert took < 30, took
    assert (
        "flask_execute.errors.ServiceStartError: Local service scripted exited during start-up"
        in out.stderr
    ), out.stderr
    cause = f"{script} sends a task when it is imported (line {line}: `{call}`)."
    assert cause in out.stderr and FIX in out.stderr, out.stderr
    log = (tmp_path / "scripted.log").read_text()
    assert cause in log and FIX in log


def test_guarded_script_runs(tmp_path, broker_url):
    script = tmp_path / "usage.py"
    script.write_text(
        header(broker_url, CELERY_LOG_DIR=str(tmp_path))
        + '\nif __name__ == "__main__":\n'
        + "    with app.app_context():\n"
        + "        print(celery.submit(add, 1, 2).result(timeout=10))\n"
    )
    out, _ = run(tmp_path, "usage.py")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3"]


def test_script_piped_to_python_runs(tmp_path, broker_url):
    """``python - < usage.py``: no file for a worker to import; it builds a bare app of
    the same config, and the script's functions travel by value."""
    source = header(broker_url, CELERY_LOG_DIR=str(tmp_path)) + textwrap.dedent(
        """
        with app.app_context():
            print(celery.submit(add, 1, 2).result(timeout=10))
        """
    )
    out, _ = run(tmp_path, "-", stdin=source)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3"]


# --- item 3: a by-value function that uses the script's own app and celery --------------
def test_script_function_uses_its_own_app_and_celery(tmp_path, broker_url):
    script = tmp_path / "usage.py"
    script.write_text(
        header(broker_url, CELERY_LOG_DIR=str(tmp_path), GREETING="hello")
        + textwrap.dedent(
            """
            from flask import current_app
            from flask_execute import current_task

            def greet(name):
                return (
                    app.config["GREETING"] + " " + name,
                    app is current_app._get_current_object(),
                    celery.controller is current_task.app,
                )

            if __name__ == "__main__":
                with app.app_context():
                    print(celery.submit(greet, "world").result(timeout=20))
            """
        )
    )
    out, _ = run(tmp_path, "usage.py")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["('hello world', True, True)"]


def test_closure_over_app_and_extension_finds_the_workers_own(setup):
    app, celery = setup

    def facts():
        return (
            app.config["MARKER"],
            app is current_app._get_current_object(),
            celery.controller is current_task.app,
        )

    marker = app.config["MARKER"]
    assert celery.submit(facts).result(timeout=20) == (marker, True, True)
    assert celery.map(facts, (), ()).result(timeout=20) == [(marker, True, True)] * 2


def test_another_app_does_not_travel(setup):
    from flask import Flask

    app, celery = setup
    other = Flask("other")

    def uses_other():
        return other.name

    with pytest.raises(SerializationError) as info:
        celery.submit(uses_other)
    assert "The Flask app 'other' cannot be sent to a worker: only the app the call is" in str(
        info.value
    )
    assert celery.submit(tasks.add, 1, 2).result(timeout=20) == 3


def test_another_extension_does_not_travel(setup):
    from flask_execute import Celery

    app, celery = setup
    unused = Celery()

    def uses_it():
        return unused.base_task

    with pytest.raises(SerializationError) as info:
        celery.submit(uses_it)
    assert (
        f"This flask-execute extension does not serve the app {app.import_name!r} the call"
        " is submitted for" in str(info.value)
    )


def test_factory_with_required_arguments_explains(tmp_modules, broker_url, log_dir):
    """A worker calls the app factory without arguments: one that requires some
    fails the start at once, saying to give them defaults."""
    from flask_execute import ServiceStartError

    tmp_modules.write(
        "needsargs",
        textwrap.dedent(
            """
            from flask import Flask
            from flask_execute import Celery

            celery = Celery()

            def create_app(config):
                app = Flask(__name__)
                app.config.update(config)
                celery.init_app(app)
                return app
            """
        ),
    )
    module = tmp_modules.load("needsargs")
    app = module.create_app(
        {"SECRET_KEY": "needs-args-secret", "CELERY_BROKER_URL": broker_url,
         "CELERY_LOG_DIR": log_dir, "CELERY_WORKERS": ["needsargs"], "CELERY_FLOWER": False}
    )  # fmt: skip
    with app.app_context(), pytest.raises(ServiceStartError) as info:
        module.celery.start()
    assert (
        "The app factory needsargs:create_app needs arguments, but a worker builds the app by"
        " calling it without any (the web process's config reaches the worker anyway). Give"
        " its parameters defaults: def create_app(config=None)."
    ) in str(info.value)

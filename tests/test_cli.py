"""`flask celery ...`: through app.test_cli_runner() and as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import descendants
from tests.conftest import read_until
from tests.conftest import wait_gone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")


def test_status_table_and_json(direct_app):
    runner = direct_app.test_cli_runner()
    result = runner.invoke(args=["celery", "status"])
    assert result.exit_code == 0, result.output
    node = next(line.split()[0] for line in result.output.splitlines() if "@" in line)
    assert node.startswith("direct@")
    assert "1 node online." in result.output
    result = runner.invoke(args=["celery", "status", "--json"])
    assert json.loads(result.output) == {node: "OK"}


def test_status_exit_code_when_no_worker(broker_url):
    from flask import Flask

    from flask_execute import Celery

    app = Flask("lonely")
    app.config.update(SECRET_KEY="x-secret-for-tests", CELERY_BROKER_URL=broker_url,
                      CELERY_START_LOCAL_WORKERS=False)  # fmt: skip
    Celery(app)
    result = app.test_cli_runner().invoke(args=["celery", "status", "--timeout", "0.3"])
    assert result.exit_code == 1
    assert "No worker answered." in result.output


def test_inspect_and_control(direct_app):
    runner = direct_app.test_cli_runner()
    result = runner.invoke(args=["celery", "inspect", "ping"])
    assert result.exit_code == 0, result.output
    (node,) = json.loads(result.output)
    assert json.loads(result.output) == {node: {"ok": "pong"}}
    result = runner.invoke(args=["celery", "inspect", "registered", "-d", node])
    assert "flask_execute.dispatch" in json.loads(result.output)[node]
    result = runner.invoke(args=["celery", "control", "pool_grow", "1"])
    assert result.exit_code == 0 and node in json.loads(result.output)
    result = runner.invoke(args=["celery", "control", "pool_shrink", "1"])
    assert result.exit_code == 0 and node in json.loads(result.output)
    result = runner.invoke(args=["celery", "inspect", "no_such_command"])
    assert result.exit_code == 2
    assert "Celery has no inspect command 'no_such_command'" in result.output


def test_help_lists_commands(direct_app):
    result = direct_app.test_cli_runner().invoke(args=["celery", "--help"])
    assert result.exit_code == 0
    for command in ("worker", "cluster", "beat", "flower", "status", "inspect", "control"):
        assert command in result.output


def _flask(args, tmp_path, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "flask", *args],
        cwd=tmp_path,
        # this checkout's src first: the venv's own install may be another checkout
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC, ROOT]),
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _write_app(modules, broker_url, log_dir, workers=None, extra=""):
    config = dict(SECRET_KEY="cli-secret-for-tests", CELERY_BROKER_URL=broker_url,
                  CELERY_LOG_DIR=log_dir,
                  CELERY_WORKERS=workers or ["cli"], CELERY_FLOWER=False,
                  CELERY_START_LOCAL_WORKERS=False)  # fmt: skip
    modules.write_factory_app("cliapp", config, extra)


def test_worker_subprocess_with_options_from_config(tmp_path, tmp_modules, broker_url, log_dir):
    _write_app(tmp_modules, broker_url, log_dir,
               workers={"foo": {"concurrency": 1, "queues": ["special"]}})  # fmt: skip
    proc = _flask(["--app", "cliapp:create_app", "celery", "worker", "-n", "foo@%h"], tmp_path,
                  start_new_session=True)  # fmt: skip
    try:
        read_until(proc, "ready.")
        cliapp = tmp_modules.load("cliapp")
        app = cliapp.create_app()
        with app.app_context():
            (queues,) = cliapp.celery.inspect.active_queues().values()
            assert [q["name"] for q in queues] == ["special"]
            (stats,) = cliapp.celery.inspect.stats().values()
            assert stats["pool"]["max-concurrency"] == 1
            from tests.apps.tasks import add

            assert cliapp.celery.submit(add, 1, 2, queue="special").result(timeout=20) == 3
        group = {p for p in descendants() if os.getpgid(p) == proc.pid}
        proc.send_signal(signal.SIGTERM)  # reaches the real worker: it runs in-process
        proc.wait(20)
        assert not wait_gone(group, 10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def test_cluster_streams_logs_and_stops_on_sigterm(tmp_path, tmp_modules, broker_url, log_dir):
    _write_app(tmp_modules, broker_url, str(tmp_path / "logs"), workers=["c1", "c2"],
               extra="\n@celery.schedule(2.0)\ndef tick():\n    return 1\n")  # fmt: skip
    proc = _flask(["--app", "cliapp:create_app", "celery", "cluster"], tmp_path)
    try:
        lines = read_until(proc, "[cluster] running")
        assert "c1, c2, beat" in lines[-1]
        read_until(proc, "ready.")
        read_until(proc, "Sending due task")  # beat's own log line, streamed
        children = descendants(proc.pid)
        assert len(children) >= 5  # 2 workers (+ pool children) and beat
        proc.send_signal(signal.SIGTERM)
        # Warm shutdown takes a second or two. Rarely, Celery's main process hangs
        # joining a pool child when a task arrives as it shuts down; the stop then
        # escalates (SIGQUIT after 10 s, SIGKILL 5 s later: test_local covers it), so the
        # bound here is the escalation's, not a performance figure.
        proc.wait(40)
        assert proc.returncode == 0
        assert not wait_gone(children, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_passthrough_subcommand(tmp_path, tmp_modules, broker_url, log_dir):
    _write_app(tmp_modules, broker_url, log_dir)
    proc = _flask(["--app", "cliapp:create_app", "celery", "report"], tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "software -> celery" in out
    assert broker_url.split("://")[0] in out


@pytest.mark.parametrize("command", [["worker", "--help"], ["beat", "--help"]])
def test_celery_help_passes_through(tmp_path, tmp_modules, broker_url, log_dir, command):
    _write_app(tmp_modules, broker_url, log_dir)
    proc = _flask(["--app", "cliapp:create_app", "celery", *command], tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "--loglevel" in out


def test_control_shutdown_is_not_an_error(tmp_path, tmp_modules, broker_url, log_dir):
    _write_app(tmp_modules, broker_url, log_dir)
    worker = _flask(["--app", "cliapp:create_app", "celery", "worker", "-n", "bye@%h",
                     "--pool=solo"], tmp_path)  # fmt: skip
    try:
        read_until(worker, "ready.")
        proc = _flask(["--app", "cliapp:create_app", "celery", "control", "shutdown"], tmp_path)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert worker.wait(20) == 0  # it did shut down
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        worker.stdout.close()


def test_sigterm_stops_flowers_event_loop_instead_of_raising_anywhere():
    """Flower's SIGTERM handler raised SystemExit wherever the main thread was; raised
    while a thread pool started a thread, it left a thread nothing stopped, and
    `flask celery flower` never exited (3 stops in 6 on a loaded machine). SIGTERM now
    stops Flower's event loop, from where the signal lands: the loop returns."""
    import asyncio

    from flower import command
    from tornado.ioloop import IOLoop

    from flask_execute.flower import stop_on_sigterm

    original = command.sigterm_handler
    loop = asyncio.new_event_loop()
    try:
        stop_on_sigterm()
        asyncio.set_event_loop(loop)
        io_loop = IOLoop.current()
        io_loop.add_callback(command.sigterm_handler, signal.SIGTERM, None)
        io_loop.start()  # returns: the handler asked the loop to stop, raised nothing
    finally:
        command.sigterm_handler = original
        asyncio.set_event_loop(None)
        loop.close()


def test_flower_subprocess_asks_for_a_login(tmp_path, tmp_modules, broker_url, log_dir):
    """`flask celery flower` without CELERY_FLOWER_BASIC_AUTH: a password generated and
    printed once, passed to Flower in its environment, never on its command line."""
    from tests.conftest import free_port
    from tests.test_leaks import fetch

    port = free_port()
    config = dict(SECRET_KEY="cli-secret-for-tests", CELERY_BROKER_URL=broker_url,
                  CELERY_LOG_DIR=log_dir, CELERY_FLOWER_PORT=port,
                  CELERY_START_LOCAL_WORKERS=False)  # fmt: skip
    tmp_modules.write_factory_app("cliapp", config)
    proc = _flask(["--app", "cliapp:create_app", "celery", "flower"], tmp_path,
                  start_new_session=True)  # fmt: skip
    try:
        lines = read_until(proc, "Flower login: ")
        password = lines[-1].split("password ", 1)[1].split(" ", 1)[0]
        assert len(password) >= 20
        lines += read_until(proc, "Visit me at")
        url = f"http://127.0.0.1:{port}"
        assert fetch(url + "/workers")[0] == 401
        assert fetch(url + "/workers", f"flower:{password}")[0] == 200
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert password.encode() not in f.read()
        assert sum(password in line for line in lines) == 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


# --- every documented command: its help, and its exit code when it failed ------------
def _offline_app(broker_url, **config):
    from flask import Flask

    from flask_execute import Celery

    app = Flask("cli_offline")
    app.config.update(SECRET_KEY="x-secret-for-tests", CELERY_BROKER_URL=broker_url,
                      CELERY_START_LOCAL_WORKERS=False, CELERY_FLOWER=False)  # fmt: skip
    app.config.update(config)
    Celery(app)
    return app


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["worker"], "--concurrency"),
        (["beat"], "--max-interval"),
        (["flower"], "--basic-auth"),
        (["cluster"], "Ctrl-C"),
        (["status"], "--timeout"),
        (["inspect"], "--destination"),
        (["control"], "--destination"),
        (["purge"], "--force"),  # any other Celery subcommand
    ],
)
def test_each_documented_command_has_its_help(broker_url, command, shown):
    result = _offline_app(broker_url).test_cli_runner().invoke(args=["celery", *command, "--help"])
    assert result.exit_code == 0, result.output
    # the runner names the program after the app: "Usage: cli_offline celery worker"
    assert f"Usage: cli_offline celery {command[0]}" in result.output
    assert shown in result.output
    assert "Flower login" not in result.output  # --help generates no password


def test_worker_exits_1_after_an_unrecoverable_error(tmp_path, tmp_modules):
    # stock `celery worker` exits 1 here: systemd's Restart=on-failure relies on it
    config = dict(SECRET_KEY="cli-secret-for-tests", CELERY_BROKER_URL="redis://127.0.0.1:1/0",
                  CELERY_START_LOCAL_WORKERS=False,
                  CELERY_BROKER_CONNECTION_MAX_RETRIES=1)  # fmt: skip
    tmp_modules.write_factory_app("cliapp", config)
    proc = _flask(["--app", "cliapp:create_app", "celery", "worker", "--pool=solo"], tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "Unrecoverable error" in out or "Cannot connect" in out


def test_control_exit_codes(direct_app, broker_url):
    runner = direct_app.test_cli_runner()
    result = runner.invoke(args=["celery", "control", "rate_limit", "no.such.task", "1/m"])
    assert result.exit_code == 1  # every node replied with an error
    assert "Every node replied with an error (direct@" in result.output
    lonely = _offline_app(broker_url).test_cli_runner()
    result = lonely.invoke(args=["celery", "control", "shutdown", "-t", "0.3"])
    assert result.exit_code == 1
    assert "No worker answered." in result.output


def test_cluster_waits_for_services_running_elsewhere(tmp_path, tmp_modules, broker_url, log_dir):
    _write_app(tmp_modules, broker_url, str(tmp_path / "logs"), workers=["elsewhere"])
    cliapp = tmp_modules.load("cliapp")
    app = cliapp.create_app()
    with app.app_context():
        cliapp.celery.start()  # this process holds the services of the app
        proc = _flask(["--app", "cliapp:create_app", "celery", "cluster"], tmp_path)
        try:
            read_until(proc, "another process on this host already runs")
            time.sleep(1.0)
            assert proc.poll() is None  # it waits, as docs/cli.md says
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            cliapp.celery.stop()

"""`flask run --debug` (issue 12, item 8): one terminal line per started service with
its log; a schedule-only app runs its schedules without a first submit; a code
reload while a task runs does not freeze the server (the new generation serves at
once while the old drains)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import redis

from tests.conftest import free_port
from tests.conftest import fresh_db_url

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")

APP = """
import os
import redis
from flask import Flask
from flask_execute import Celery
from tests.apps import tasks

app = Flask(__name__)
app.config.update(SECRET_KEY="devserver-secret-for-tests", CELERY_BROKER_URL={broker!r},
                  CELERY_LOG_DIR={logs!r}, CELERY_FLOWER=False,
                  CELERY_WORKERS={{"dw": {{"concurrency": 2}}}})
celery = Celery(app)

@celery.schedule(0.5, name="tick")
def tick():
    redis.Redis.from_url({counter!r}).incr("ticks")

@app.route("/slow")
def slow():
    return celery.submit(tasks.mark_and_wait, {mark!r}, {release!r}, 60).id

@app.route("/pid")
def pid():
    return str(os.getpid())
# generation {generation}
"""


def _get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def _until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_flask_run_debug_shows_services_runs_schedules_and_reloads_at_once(
    tmp_path, broker_url, redis_url
):
    counter = fresh_db_url(redis_url)
    logs, mark, release = tmp_path / "logs", tmp_path / "mark", tmp_path / "release"
    fields = dict(broker=broker_url, logs=str(logs), counter=counter, mark=str(mark),
                  release=str(release))  # fmt: skip
    source = tmp_path / "devapp.py"
    source.write_text(textwrap.dedent(APP.format(generation=1, **fields)))
    port = free_port()
    output: list[str] = []
    proc = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "devapp", "run", "--debug", "--port", str(port)],
        cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SRC, ROOT])},
    )  # fmt: skip
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")))
    reader.start()
    base = f"http://127.0.0.1:{port}"
    try:
        # a schedule-only app: beat runs with no submit and no request
        client = redis.Redis.from_url(counter)
        _until(lambda: int(client.get("ticks") or 0) >= 2, 40, "the schedule to run")
        text = "".join(output)
        worker = re.search(r" \* flask-execute: worker dw started \(pid (\d+)\), log: (.+)", text)
        assert worker and worker.group(2) == str(logs / "dw.log"), text
        beat = re.search(r" \* flask-execute: beat started \(pid (\d+)\), log: (.+)", text)
        assert beat and beat.group(2) == str(logs / "beat.log"), text
        # a reload while a task runs: the new generation serves at once
        first = _until(lambda: _get(f"{base}/pid"), 20, "the server")
        _get(f"{base}/slow", timeout=20)
        _until(mark.exists, 20, "the task to start")
        source.write_text(textwrap.dedent(APP.format(generation=2, **fields)))
        changed = time.monotonic()
        second = _until(lambda: (p := _get(f"{base}/pid")) != first and p, 30, "a reload")
        took = time.monotonic() - changed
        assert second != first
        assert took < 8, f"the reload took {took:.1f} s: the old generation blocked it"
    finally:
        release.touch()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(10)
        proc.stdout.close()

"""Test harness: a private Redis per session, the direct and factory apps with real
workers, and a check that no test leaves a process behind.

The private Redis is started with the extension's own :class:`EmbeddedRedis` on a free
port (``FLASK_EXECUTE_TEST_REDIS=redis://host:port`` uses an existing server instead).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types
import typing as t
from collections.abc import Iterator

import pytest

from flask_execute.local import EmbeddedRedis
from flask_execute.processes import free_port

_redis: EmbeddedRedis | None = None
_tmp = tempfile.TemporaryDirectory(prefix="fe-tests-")
LOG_DIR = os.path.join(_tmp.name, "logs")


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module imports the test apps: they read the URL at import.
    global _redis
    os.makedirs(LOG_DIR, exist_ok=True)
    # the apps' private runtime directories (signing key, locks, boot files, sockets)
    # go to this session's own directory, not to the home of whoever runs the tests
    runtime = os.path.join(_tmp.name, "run")
    os.mkdir(runtime, 0o700)
    os.environ["XDG_RUNTIME_DIR"] = runtime
    os.environ.setdefault("FLASK_EXECUTE_TEST_LOGS", LOG_DIR)
    if "FLASK_EXECUTE_TEST_REDIS" not in os.environ:
        _redis = EmbeddedRedis(
            os.path.join(_tmp.name, "redis"), port=free_port(), extra_args=["--databases", "1024"]
        )
        _redis.start()
        os.environ["FLASK_EXECUTE_TEST_REDIS"] = _redis.url


def pytest_unconfigure(config: pytest.Config) -> None:
    from flask_execute.watcher import stop_all

    stop_all()  # before the Redis they watch goes away
    if _redis is not None:
        _redis.stop()
    _tmp.cleanup()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ["FLASK_EXECUTE_TEST_REDIS"]


# dbs 1-2: the shared apps, 3: tests/apps/streaming.py, 13-15: the app modules of
# test_registry, 16+: one per test
_db = iter(range(16, 1024))


def fresh_db_url(redis_url: str) -> str:
    """The URL of a Redis db of its own (the private Redis has 1024; an external one
    given by FLASK_EXECUTE_TEST_REDIS needs `databases 1024` too)."""
    return f"{redis_url}/{next(_db)}"


@pytest.fixture
def broker_url(redis_url: str) -> str:
    """A Redis db of its own for one test's app (``fresh_db_url``)."""
    return fresh_db_url(redis_url)


@pytest.fixture(scope="session")
def log_dir() -> str:
    return LOG_DIR


class TmpModules:
    """Write modules into a temporary directory on ``sys.path`` and import them;
    ``sys.path`` and ``sys.modules`` are restored after the test. Local workers see
    the directory too (they get the web process's ``sys.path``)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.names: list[str] = []

    def write(self, name: str, source: str) -> str:
        path = os.path.join(self.directory, f"{name}.py")
        with open(path, "w") as f:
            f.write(source)
        self.names.append(name)
        return path

    def load(self, name: str) -> types.ModuleType:
        return importlib.import_module(name)

    def write_factory_app(self, name: str, config: dict[str, object], extra: str = "") -> str:
        """Write an app-factory module: ``celery = Celery()`` and a ``create_app()``
        applying ``config`` then ``celery.init_app(app)``; ``extra`` is appended."""
        source = textwrap.dedent(
            f"""
            from flask import Flask
            from flask_execute import Celery

            celery = Celery()

            def create_app():
                app = Flask(__name__)
                app.config.update({config!r})
                celery.init_app(app)
                return app
            """
        )
        return self.write(name, source + extra)


@pytest.fixture
def tmp_modules(tmp_path: object) -> Iterator[TmpModules]:
    directory = str(tmp_path)
    modules = TmpModules(directory)
    sys.path.insert(0, directory)
    try:
        yield modules
    finally:
        sys.path.remove(directory)
        for name in modules.names:
            sys.modules.pop(name, None)


# --- processes ---------------------------------------------------------------------
def descendants(pid: int | None = None) -> set[int]:
    """Every live descendant of ``pid`` (default: this process), from /proc."""
    pid = pid or os.getpid()
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def wait_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    """Wait until none of ``pids`` is alive; return the ones still alive."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p)}
        if alive:
            time.sleep(0.05)
    return alive


def progress_seen(future: t.Any) -> set[int]:
    """Wait for ``future`` (a task reporting ``{"done": n}``), returning every ``done``
    count seen in its PROGRESS state on the way."""
    seen = set()
    while not future.done():
        if future.state == "PROGRESS":
            seen.add(future.info["done"])
        time.sleep(0.01)
    return seen


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


_session_groups: set[int] = set()


def keep_alive(app: object) -> None:
    """Let the local services of ``app`` outlive the current test (module fixtures)."""
    state = app.extensions["celery"].runtime(app)  # type: ignore[attr-defined]
    _session_groups.update(child.pid for child in state.services.children)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _ours(pids: set[int]) -> set[int]:
    """Drop the session's own long-lived processes (shared workers, private Redis)."""
    groups = set(_session_groups)
    if _redis is not None and _redis.pid:
        groups.add(_redis.pid)
    return {p for p in pids if _pgid(p) not in groups and _alive(p)}


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every test must stop what it started (shared-app workers excepted)."""
    before = descendants()
    yield
    leftovers = wait_gone(_ours(descendants() - before), timeout=10)
    leftovers = _ours(leftovers)
    assert not leftovers, f"processes left behind: {_describe(leftovers)}"


def _describe(pids: set[int]) -> list[str]:
    out = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
            out.append(f"{pid}: {cmdline[:200]}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


@pytest.fixture
def private_redis(tmp_path: t.Any) -> Iterator[EmbeddedRedis]:
    """A Redis of the test's own, with an append-only file (queued messages survive
    its restart), for tests that stop and start their broker. Some modules define their
    own (other persistence settings)."""
    server = EmbeddedRedis(str(tmp_path / "redis"), port=free_port(), appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def read_until(proc: t.Any, needle: str, timeout: float = 30) -> list[str]:
    """Lines of ``proc``'s text stdout up to the first one containing ``needle``.

    :raises AssertionError: not seen before EOF or ``timeout`` (with what was seen).
    """
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not seen:\n" + "".join(lines))


# --- the shared apps ----------------------------------------------------------------
def _started(celery: object, app: object) -> Iterator[object]:
    with app.app_context():  # type: ignore[attr-defined]
        celery.start()  # type: ignore[attr-defined]
        state = app.extensions["celery"].runtime(app)  # type: ignore[attr-defined]
        groups = {child.pid for child in state.services.children}
    _session_groups.update(groups)
    try:
        yield app
    finally:
        members = {p for p in descendants() if _pgid(p) in groups}
        with app.app_context():  # type: ignore[attr-defined]
            celery.stop()  # type: ignore[attr-defined]
        _session_groups.difference_update(groups)
        assert not wait_gone(members), "shared workers survived celery.stop()"


@pytest.fixture(scope="session")
def direct_app() -> Iterator[object]:
    from tests.apps import direct

    yield from _started(direct.celery, direct.app)


@pytest.fixture(scope="session")
def factory_app() -> Iterator[object]:
    from tests.apps import factory

    yield from _started(factory.celery, factory.create_app())


@pytest.fixture(params=["direct", "factory"])
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[object, object]]:
    """(app, celery) for the direct and the factory setup, workers running, with an
    app context pushed (the factory extension serves several apps)."""
    if request.param == "direct":
        from tests.apps import direct

        app, celery = request.getfixturevalue("direct_app"), direct.celery
    else:
        from tests.apps import factory

        app, celery = request.getfixturevalue("factory_app"), factory.celery
    with app.app_context():  # type: ignore[attr-defined]
        yield app, celery


def stop_sessions(procs: list[t.Any]) -> None:
    """SIGTERM each process started in a session of its own (its whole group), wait
    20 s, then SIGKILL the group; close their piped stdout."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()

"""Local services in development: workers (and later beat and Flower) and the
embedded Redis, started, watched and stopped by the web process.

Policy for children, written down before the code:

* Children are ``sys.executable -m ...`` argv lists (no PATH, no shell), each in its
  own session (process group), with stdout and stderr appended to its log file —
  never an unread pipe.
* Readiness: each worker writes ``R`` to an inherited *ready pipe* from Celery's
  ``worker_ready`` signal. EOF before that means it died: we raise at once with the
  tail of its log. Then ``start()`` waits until every worker answers a broadcast
  ping (so ``status()`` right after it is exact). Nothing polls a CLI.
* Parent death: every child inherits the read end of a *lifeline pipe* whose only
  write end lives in this process. When this process dies, however it dies (exit,
  SIGTERM, SIGKILL), the kernel closes it; children read EOF and shut down (warm, then
  cold after a grace period). The embedded Redis runs under a tiny guard process that
  does the same for it.
* Death: a child that dies on its own is given back its messages and restarted with
  a backoff, and given up after a bounded number of tries (:mod:`.supervisor` writes
  the policy down).
* Stop: SIGTERM to each main process (warm shutdown: running tasks finish), then after
  the timeout SIGQUIT, then SIGKILL to the whole process group; every child is reaped.
  Stop is idempotent; start works again after it.
* One set per host: an ``flock`` on a lock file in the private runtime directory
  (:mod:`.rundir`). The process holding it starts the services; other processes of
  the same app (gunicorn -w 4) wait for the workers to answer and take over if the
  holder dies.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import typing as t

from . import bootfile
from .config import Settings
from .devserver import serving_with_reloader
from .embedded import EmbeddedRedis
from .embedded import redis_answers
from .embedded import redis_binary
from .errors import ServiceStartError
from .flower import flower_installed
from .flower import spawn_flower
from .processes import Child
from .processes import log_tail
from .processes import spawn
from .processes import terminate
from .processes import wait_ready
from .rundir import create_private
from .rundir import open_private
from .supervisor import Supervised
from .supervisor import Supervisor
from .worker_options import worker_argv

__all__ = [
    "EmbeddedRedis",
    "LocalServices",
    "ServiceHost",
    "log_tail",
    "redis_answers",
    "redis_binary",
]

log = logging.getLogger(__name__)

CHILD_ENV = "FLASK_EXECUTE_CHILD"
BOOT_ENV = "FLASK_EXECUTE_BOOT"
#: The one-shot key of that child's boot file (environment only: never argv, never disk).
BOOT_KEY_ENV = "FLASK_EXECUTE_BOOT_KEY"
LIFELINE_FD_ENV = "FLASK_EXECUTE_LIFELINE_FD"


# --- the services of one app ---------------------------------------------------------
class ServiceHost(t.Protocol):
    """What the local services need of the app they serve."""

    settings: Settings
    broker_url: str
    embedded_broker: EmbeddedRedis | None

    @property
    def log_dir(self) -> str:
        """Where the services log (and beat keeps its schedule file)."""

    @property
    def runtime_dir(self) -> str: ...

    def boot_content(self) -> dict[str, object]:
        """What a child needs to rebuild the app (written to its boot file)."""

    def worker_options(self, name: str, local: bool = True) -> dict[str, object]:
        """The ``celery worker`` options of one configured worker."""

    def has_schedule(self) -> bool:
        """Does beat have anything to run?"""

    def ping(self, timeout: float = 1.0, limit: int | None = None) -> dict[str, str]:
        """``{node: "OK"}`` of the workers answering a broadcast ping."""

    def give_back(self, pid: int, name: str) -> int:
        """Give the unacknowledged messages of the dead worker ``name`` (process
        ``pid``) back to the broker, and log it; return how many it held."""


class LocalServices:
    """Workers (and the embedded Redis) of one app, started once per host."""

    def __init__(self, state: ServiceHost) -> None:
        self._state = state
        self._lock = threading.RLock()
        self._children: list[Child] = []
        self._supervisor: Supervisor | None = None
        self._redis: EmbeddedRedis | None = None
        self._lifeline_r: int | None = None
        self._lifeline_w: int | None = None
        self._lock_fd: int | None = None
        self._boot_paths: list[str] = []
        self._running = False
        self._atexit = False
        self._takeover: threading.Thread | None = None
        self._stopping = threading.Event()
        self.flower_url: str | None = None

    @property
    def running(self) -> bool:
        return self._running

    @property
    def children(self) -> list[Child]:
        """The services running now (restarted ones replace the dead)."""
        if self._supervisor is not None:
            return self._supervisor.children
        return list(self._children)

    @property
    def given_up(self) -> list[str]:
        """Services that kept dying and are no longer restarted."""
        return [s.name for s in self._supervisor.given_up] if self._supervisor else []

    @property
    def owner(self) -> bool:
        """True if this process started (and will stop) the services."""
        return self._lock_fd is not None

    def expected_nodes(self) -> list[str]:
        host = socket.gethostname()
        return [
            str(options.get("hostname") or f"{name}@%h").replace("%h", host)
            for name, options in self._state.settings.workers.items()
        ]

    def start(self) -> None:
        """Start every configured service exactly once (thread- and process-safe).

        :raises ServiceStartError: a service failed to start or to answer in time.
        """
        with self._lock:
            if self._running:
                return
            self._stopping.clear()
            if not self._atexit:
                atexit.register(self._at_exit)
                self._atexit = True
            settings = self._state.settings
            deadline = time.monotonic() + settings.start_timeout
            if self._acquire_lock():
                try:
                    self._start_owned(deadline)
                except BaseException:
                    self._stop_owned(timeout=2)
                    self._release_lock()
                    raise
            else:
                self._wait_answering(deadline, other=True)
                self._watch_for_takeover()
            self._running = True

    def _acquire_lock(self) -> bool:
        # one set per broker and node names: the same app on another broker (a test's
        # private Redis) is a different set
        identity = "|".join([self._state.broker_url, *sorted(self.expected_nodes())])
        digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
        path = os.path.join(self._state.runtime_dir, f"services-{digest}.lock")
        try:
            fd = create_private(path, os.O_RDWR)
        except FileExistsError:
            fd = open_private(path, os.O_RDWR)  # a link or another user's: refused
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.set_inheritable(fd, False)
        self._lock_fd = fd
        return True

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _start_owned(self, deadline: float) -> None:
        state = self._state
        settings = state.settings
        if state.embedded_broker is not None:
            self._redis = state.embedded_broker
            self._redis.start(timeout=max(1.0, deadline - time.monotonic()))
        # the read end stays open here too: restarted children inherit it
        self._lifeline_r, self._lifeline_w = os.pipe()
        read = self._lifeline_r
        env = _BootEnv(os.environ, self, state.boot_content())
        env.update({CHILD_ENV: "1", LIFELINE_FD_ENV: str(read), "PYTHONUNBUFFERED": "1"})
        log_dir = state.log_dir
        supervised: list[Supervised] = []
        for name in settings.workers:
            spawn_worker = functools.partial(self._spawn_worker, name, env, read, log_dir)
            child = spawn_worker()
            supervised.append(Supervised(name, "worker", child, spawn_worker, self._give_back))
        if settings.scheduler and state.has_schedule():
            spawn_beat = functools.partial(self._spawn_beat, env, read, log_dir)
            supervised.append(Supervised("beat", "beat", spawn_beat(), spawn_beat))
        started = [s.child for s in supervised]
        self._children.extend(started)
        if settings.flower and flower_installed():
            spawn_flower = functools.partial(self._spawn_flower, env, read, log_dir)
            flower = spawn_flower()
            self._children.append(flower)
            supervised.append(Supervised("flower", "Flower", flower, spawn_flower))
        wait_ready(started, deadline)
        self._wait_answering(deadline)
        self._supervisor = Supervisor(supervised, settings.start_timeout)
        self._supervisor.start()

    def _spawn_worker(self, name: str, env: dict[str, str], read: int, log_dir: str) -> Child:
        state = self._state
        configured = state.settings.workers[name]
        log_path = str(configured.get("logfile") or os.path.join(log_dir, f"{name}.log"))
        options = state.worker_options(name)
        argv = [
            sys.executable, "-m", "celery", "-A", "flask_execute.celery", "worker",
            *worker_argv(name, options, state.settings.log_level),
        ]  # fmt: skip
        if "logfile" not in options:
            argv.append(f"--logfile={log_path}")
        return spawn(name, argv, log_path, env=env, pass_fds=(read,), ready=True)

    def _give_back(self, child: Child) -> None:
        """A dead worker's messages go back now (broker down: once their leases lapse)."""
        self._state.give_back(child.pid, child.name)

    def _spawn_beat(self, env: dict[str, str], read: int, log_dir: str) -> Child:
        """One beat per host (we hold the services lock); its schedule file lives in
        the log directory."""
        settings = self._state.settings
        log_path = os.path.join(log_dir, "beat.log")
        argv = [
            sys.executable, "-m", "celery", "-A", "flask_execute.celery", "beat",
            f"--loglevel={settings.log_level}",
            f"--schedule={os.path.join(log_dir, 'celerybeat-schedule')}",
            f"--logfile={log_path}",
        ]  # fmt: skip
        return spawn("beat", argv, log_path, env=env, pass_fds=(read,), ready=True)

    def _spawn_flower(self, env: dict[str, str], read: int, log_dir: str) -> Child:
        child, self.flower_url = spawn_flower(
            self._state.settings, env, read, log_dir, self._stopping
        )
        return child

    def _wait_answering(self, deadline: float, other: bool = False) -> None:
        """Wait until every local worker answers a broadcast ping, so that
        ``status()`` right after ``start()`` is exact."""
        expected = set(self.expected_nodes())
        while expected:
            try:
                seen = set(self._state.ping(timeout=0.3, limit=len(expected)))
            except Exception:
                seen = set()
            if expected <= seen:
                return
            if time.monotonic() > deadline:
                missing = sorted(expected - seen)
                if other:
                    raise ServiceStartError(
                        "Another process on this host holds the flask-execute services lock"
                        f" ({self._state.runtime_dir}) but its workers {missing} did not"
                        " answer within CELERY_START_TIMEOUT."
                    )
                raise ServiceStartError(
                    f"The local workers {missing} started but did not answer a ping within"
                    " CELERY_START_TIMEOUT; is the broker"
                    f" ({self._state.broker_url.split('@')[-1]}) reachable from them?"
                )
            time.sleep(0.05)

    def _watch_for_takeover(self) -> None:
        """Become the owner when the process that started the services dies."""
        if self._takeover is not None and self._takeover.is_alive():
            return

        def run() -> None:
            while not self._stopping.wait(1.0):
                with self._lock:
                    if self._lock_fd is not None or not self._running:
                        return
                    if not self._acquire_lock():
                        continue
                    log.warning(
                        "flask-execute: the process owning local services died; starting them here"
                    )
                    try:
                        self._start_owned(time.monotonic() + self._state.settings.start_timeout)
                    except Exception:
                        log.exception("flask-execute: could not take over local services")
                        self._stop_owned(timeout=2)
                        self._release_lock()
                    return

        self._takeover = threading.Thread(target=run, name="flask-execute-takeover", daemon=True)
        self._takeover.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop everything this process started; idempotent. Running tasks get
        ``timeout`` seconds to finish before the stop escalates."""
        with self._lock:
            self._stopping.set()
            self._stop_owned(timeout)
            self._release_lock()
            self._running = False

    def _at_exit(self) -> None:
        if serving_with_reloader() and self._redis is None:
            self.release()  # a reload: the next generation must serve now
        else:
            self.stop()

    def release(self) -> None:
        """Let the services drain on their own and return at once: each gets SIGTERM
        (a warm stop: running tasks finish), the lifeline closes (they stop cold
        after its grace, 10 s), nothing is waited for, the lock is released."""
        with self._lock:
            self._stopping.set()
            if self._supervisor is not None:
                self._supervisor.stop()  # nothing is restarted
            for child in self.children:
                if child.alive():
                    os.kill(child.pid, signal.SIGTERM)
            self._children, self._supervisor = [], None
            for fd in (self._lifeline_r, self._lifeline_w):
                if fd is not None:
                    os.close(fd)
            self._lifeline_r = self._lifeline_w = None
            self._release_lock()
            self._running = False

    def _stop_owned(self, timeout: float) -> None:
        children = self.children
        if self._supervisor is not None:
            self._supervisor.stop()  # nothing is restarted while we stop
            children = self._supervisor.children
            self._supervisor = None
        if children:
            terminate(children, timeout)
        self._children = []
        for fd in (self._lifeline_r, self._lifeline_w):
            if fd is not None:
                os.close(fd)
        self._lifeline_r = self._lifeline_w = None
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        # each child removes its own boot file once read; these never got that far
        for path in self._boot_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._boot_paths = []

    def boot_file(self, boot: dict[str, object]) -> tuple[str, str]:
        """A private, signed boot file for one child, and its one-shot key (see
        :mod:`.bootfile`). The child deletes it once read: it holds the app's
        secrets."""
        path, key = bootfile.write(self._state.runtime_dir, boot)
        self._boot_paths.append(path)
        return path, key


class _BootEnv(dict[str, str]):
    """The children's environment; each ``copy()`` (one per child) gets its own boot
    file and key."""

    def __init__(
        self, base: t.Mapping[str, str], services: LocalServices, boot: dict[str, object]
    ) -> None:
        super().__init__(base)
        self._services = services
        self._boot = boot

    def copy(self) -> dict[str, str]:
        env = dict(self)
        env[BOOT_ENV], env[BOOT_KEY_ENV] = self._services.boot_file(self._boot)
        return env

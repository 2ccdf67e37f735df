"""The local Flower: started behind a login, its readiness announced, never waited
for. (``flask celery flower`` uses the same login rules.)"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import socket
import sys
import threading
import time
import typing as t

from .config import Settings
from .processes import Child
from .processes import log_tail
from .processes import spawn

__all__ = [
    "FLOWER_LOGIN_ENV", "flower_installed", "flower_login", "spawn_flower", "stop_on_sigterm",
]  # fmt: skip

log = logging.getLogger(__name__)

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


def flower_installed() -> bool:
    """Is Flower importable? (Logged once when it is not.)"""
    if importlib.util.find_spec("flower") is not None:
        return True
    log.info(
        "flask-execute: Flower is not installed (pip install"
        " 'flask-execute[flower]'); not starting it (CELERY_FLOWER=False hides this)."
    )
    return False


def stop_on_sigterm() -> None:
    """Make SIGTERM stop Flower (in this process) cleanly, when Flower is installed.

    Flower's own SIGTERM handler raises ``SystemExit`` wherever the main thread is.
    Raised while a thread pool starts a thread (Flower's first inspection, right after
    its banner), it leaves a thread that nothing tells to stop, and the process never
    exits: ``flask celery flower`` hung on SIGTERM in 3 of 6 stops on a loaded machine.
    The replacement asks Flower's event loop to stop, as Ctrl+C ends it: Flower's
    start returns, and the interpreter exits through its usual shutdown.
    """
    if importlib.util.find_spec("flower") is None:
        return
    from flower import command
    from tornado.ioloop import IOLoop

    def stop(signum: int, frame: object) -> None:
        loop = IOLoop.current()
        # a signal handler runs between two bytecodes of the main thread, which may be
        # inside the loop itself: only the thread-safe entry point is safe here
        t.cast(t.Any, loop).asyncio_loop.call_soon_threadsafe(loop.stop)

    command.sigterm_handler = stop  # the command installs it after building Flower


def spawn_flower(
    settings: Settings, env: dict[str, str], read: int, log_dir: str, stopping: threading.Event
) -> tuple[Child, str]:
    """Start Flower behind a login; return it and its URL. A thread logs when it
    answers (with the login when it was generated), or that it did not."""
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
    url = f"http://{address}:{port}"

    def announce() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and child.alive():
            try:
                socket.create_connection((address, port), timeout=0.5).close()
            except OSError:
                time.sleep(0.1)
                continue
            if generated is None:
                log.info("flask-execute: Flower is up at %s", url)
            else:  # a warning: shown even where nobody configured logging
                log.warning(
                    "flask-execute: Flower is up at %s; log in as 'flower' with"
                    " password %s (generated for this run; CELERY_FLOWER_BASIC_AUTH"
                    " sets your own)",
                    url,
                    generated,
                )
            return
        if not stopping.is_set():
            log.warning(
                "flask-execute: Flower did not come up at %s. Last lines of %s:\n%s",
                url,
                log_path,
                log_tail(log_path),
            )

    threading.Thread(target=announce, name="flask-execute-flower", daemon=True).start()
    return child, url

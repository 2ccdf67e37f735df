"""Local services under Flask's development server (``flask run --debug``).

- **Visible.** Flask's default logging hides INFO records, so nothing showed that
  workers, beat or Flower started, or where their logs are. With ``app.debug`` on,
  one line per started service goes to the terminal (stderr), in the style of the
  server's own `` * Running on ...`` lines.
- **Reloads do not block.** The reloader restarts the serving process on a code
  change; its exit used to wait for the local workers to finish their running tasks
  (the warm stop, up to 10 s, plus ``CELERY_EXIT_WAIT``) while no generation served.
  Now the old generation lets its services drain on their own
  (:meth:`~flask_execute.local.LocalServices.release`) and exits at once; the new
  one starts its own at once.
- **Schedules run.** An app with schedules and no ``submit`` started beat only on a
  first ``submit``; the serving process now starts its services once the app's
  module has been imported.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import typing as t
from collections.abc import Callable

__all__ = ["announce", "serving_with_reloader", "start_schedules"]

log = logging.getLogger(__name__)

#: Werkzeug's mark of the process that serves under the reloader.
RELOADER_ENV = "WERKZEUG_RUN_MAIN"
#: How long to wait for the app's module to finish importing.
IMPORT_WAIT = 60.0


def serving_with_reloader() -> bool:
    """Is this the serving process of ``flask run --debug`` (or ``--reload``)?"""
    return os.environ.get(RELOADER_ENV) == "true"


class _Started(t.Protocol):
    name: str
    log_path: str

    @property
    def pid(self) -> int: ...


def announce(children: t.Iterable[_Started], flower_url: str | None) -> None:
    """One line per started service on the terminal: what, its pid, its log."""
    for child in children:
        kind = {"beat": "beat", "flower": "Flower"}.get(child.name, f"worker {child.name}")
        where = f" at {flower_url}" if child.name == "flower" and flower_url else ""
        # printed, not logged: Flask's default logging hides INFO (a dev aid, like
        # the development server's own lines)
        print(
            f" * flask-execute: {kind} started{where} (pid {child.pid}), log: {child.log_path}",
            file=sys.stderr,
            flush=True,
        )


def start_schedules(
    module_name: str, has_schedule: Callable[[], bool], start: Callable[[], None]
) -> threading.Thread:
    """Start the local services (for beat) once the module ``module_name`` finished
    importing (its schedules are declared by then), if the app has a schedule."""

    def run() -> None:
        spec = getattr(sys.modules.get(module_name), "__spec__", None)
        deadline = time.monotonic() + IMPORT_WAIT
        # importlib marks a module being imported so (a partially initialized module)
        while getattr(spec, "_initializing", False) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not has_schedule():
            return
        try:
            start()
        except Exception:
            log.exception("flask-execute: could not start the local services for beat")

    thread = threading.Thread(target=run, name="flask-execute-schedules", daemon=True)
    thread.start()
    return thread

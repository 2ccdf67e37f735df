"""The supervisor of the local services: a dead worker (or beat, or Flower) comes back.

Policy for dying children, written down before the loop:

* Who: every service the web process started (workers, beat, Flower), checked every
  :data:`CHECK_EVERY` seconds by one thread. Whatever ended it (a poison message, the
  OOM killer, a segfault, ``kill -9``) is a death, unless we are stopping.
* First, the dead worker's messages go back: :class:`Supervised.on_death` runs (the
  local services give the worker's unacknowledged Redis messages back to their
  queues at once, :func:`flask_execute.leases.give_back`); its failure is logged, never
  fatal.
* Then it is restarted, with a backoff: the k-th restart in a row waits
  ``BACKOFF * 2 ** (k - 1)`` seconds (0.5, 1, 2, 4, 8). Each restart is logged at
  WARNING with the exit code (or signal). A restarted service that dies before it is
  ready counts as dying again; one still starting after ``CELERY_START_TIMEOUT`` (a
  worker restarted while the broker is down keeps retrying it) is left running and
  counts only if it dies.
* A service that stayed up :data:`STABLE_AFTER` seconds is healthy again: its count of
  restarts in a row starts over, so a worker killed once a day is always restarted.
* After :data:`MAX_RESTARTS` restarts in a row it is given up: an ERROR with the tail of
  its log, and it stays down (:attr:`Supervisor.given_up` names it; ``flask celery
  cluster`` then exits 1).
* Stop: :meth:`Supervisor.stop` ends the loop before the services are stopped, so
  nothing is restarted while stopping; stop is idempotent.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
import typing as t

from .processes import Child
from .processes import log_tail
from .processes import wait_ready

__all__ = ["BACKOFF", "CHECK_EVERY", "MAX_RESTARTS", "STABLE_AFTER", "Supervised", "Supervisor"]

log = logging.getLogger(__name__)

CHECK_EVERY = 0.25
BACKOFF = 0.5
MAX_RESTARTS = 5
STABLE_AFTER = 60.0


def exit_reason(code: int | None) -> str:
    """``exit code 1`` or ``signal SIGKILL`` (a Popen return code)."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@dataclasses.dataclass
class Supervised:
    """One supervised service: a typed record per child."""

    name: str
    #: what it is, for messages ("worker", "beat", "Flower")
    kind: str
    child: Child
    #: spawns a fresh child of this service (does not wait for it)
    spawn: t.Callable[[], Child]
    #: called with the dead child before it is restarted
    on_death: t.Callable[[Child], None] | None = None
    #: restarts in a row (reset once it stayed up STABLE_AFTER seconds)
    restarts: int = 0
    started_at: float = dataclasses.field(default_factory=time.monotonic)
    given_up: bool = False


class Supervisor:
    """Restarts the services it is given when they die, by the policy above."""

    def __init__(self, services: list[Supervised], start_timeout: float) -> None:
        self.services = services
        self.start_timeout = start_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def children(self) -> list[Child]:
        return [s.child for s in self.services]

    @property
    def given_up(self) -> list[Supervised]:
        return [s for s in self.services if s.given_up]

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name="flask-execute-supervisor", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End the loop (no restart after this returns); idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.start_timeout + 10)

    def _loop(self) -> None:
        while not self._stop.wait(CHECK_EVERY):
            for service in self.services:
                if self._stop.is_set():
                    return
                if not service.given_up and not service.child.alive():
                    self._died(service)

    def _died(self, service: Supervised) -> None:
        child = service.child
        reason = exit_reason(child.process.returncode)
        if time.monotonic() - service.started_at >= STABLE_AFTER:
            service.restarts = 0
        if service.on_death is not None:
            try:
                service.on_death(child)
            except Exception:
                log.exception("flask-execute: could not clean up after %s", service.name)
        if service.restarts >= MAX_RESTARTS:
            service.given_up = True
            log.error(
                "flask-execute: local %s %s (pid %d) died again (%s) after %d restarts in a"
                " row; not restarting it. Last lines of %s:\n%s",
                service.kind, service.name, child.pid, reason, service.restarts,
                child.log_path, log_tail(child.log_path),
            )  # fmt: skip
            return
        service.restarts += 1
        delay = BACKOFF * 2 ** (service.restarts - 1)
        log.warning(
            "flask-execute: local %s %s (pid %d) died (%s); restarting it in %g s"
            " (restart %d of at most %d in a row), log %s",
            service.kind, service.name, child.pid, reason, delay, service.restarts,
            MAX_RESTARTS, child.log_path,
        )  # fmt: skip
        if self._stop.wait(delay):
            return
        try:
            fresh = service.spawn()
        except Exception:
            log.exception("flask-execute: could not restart %s", service.name)
            service.started_at = time.monotonic()
            return
        service.child, service.started_at = fresh, time.monotonic()
        try:
            wait_ready([fresh], time.monotonic() + self.start_timeout, service.kind)
        except Exception as exc:
            if fresh.alive():
                # not ready but running: a worker restarted while the broker is down
                # retries it (Celery's policy); killing it would spend the restarts
                # on the outage and give the worker up. It counts only if it dies.
                log.warning(
                    "flask-execute: restarted %s %s is not ready after %g s (is the broker"
                    " down? see %s); leaving it running",
                    service.kind, service.name, self.start_timeout, fresh.log_path,
                )  # fmt: skip
                return
            log.warning("flask-execute: restarted %s did not start: %s", service.name, exc)
            return  # it died: counts as dying again, at the next check
        log.warning(
            "flask-execute: local %s %s is back (pid %d)", service.kind, service.name, fresh.pid
        )

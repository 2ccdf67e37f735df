"""Eager mode (``CELERY_ALWAYS_EAGER``): a call runs inline, in the caller, through the
same dispatch task and the same envelopes as on a worker, and completes its futures
before ``submit`` returns. There is no result store: ``celery.get()`` finds only the
futures still referenced in this process.
"""

from __future__ import annotations

import typing as t
import weakref

from celery import Task

from . import redaction
from .context import eager_run
from .errors import RemoteTraceback
from .futures import Chunk
from .futures import Future
from .outcomes import contained
from .outcomes import Outcomes

__all__ = ["EagerRuns"]


class EagerRuns:
    """The eager runs of one app, and the futures they completed."""

    def __init__(self, outcomes: Outcomes) -> None:
        self._outcomes = outcomes
        self._futures: weakref.WeakValueDictionary[str, Future[t.Any]] = (
            weakref.WeakValueDictionary()
        )

    def get(self, task_id: str) -> Future[t.Any]:
        """The future of an eager run still referenced somewhere.

        :raises LookupError: no such future.
        """
        found = self._futures.get(task_id)
        if found is None:
            raise LookupError(
                f"No eager task {task_id!r} is known: eager mode (CELERY_ALWAYS_EAGER)"
                " keeps no result store, only futures still referenced somewhere."
            )
        return found

    def run(self, handler: Future[t.Any] | Chunk, task_id: str, envelope: str, task: Task) -> None:
        """Run one message inline with ``task`` (a dispatch task), completing the
        future (or the chunk's futures) of ``handler``."""
        members = handler.members if isinstance(handler, Chunk) else [handler]
        if isinstance(handler, Future):
            self._futures[task_id] = handler

        def listener(state: str, meta: object) -> None:
            for member in members:
                member.set_progress(state, meta)

        with eager_run(listener):
            for member in members:
                member.set_progress("STARTED")
            result = task.apply((envelope,), task_id=task_id, throw=False)
        if result.state == "SUCCESS":
            meta = {"status": "SUCCESS", "result": redaction.unwrap(result.result)}
        else:
            exc = result.result
            if not getattr(exc, "flask_execute_carrier", False):
                # not sealed by our dispatch code: Celery's own failure, in process
                failure = contained(exc, result.traceback or "")
                if result.traceback and failure.__cause__ is None:
                    failure.__cause__ = RemoteTraceback(result.traceback)
                for member in members:
                    member.settle("FAILURE", exc=failure)
                return
            meta = {
                "status": "FAILURE",
                "result": {
                    "exc_message": list(getattr(exc, "args", ())),
                    "exc_type": type(exc).__qualname__,
                    "exc_module": type(exc).__module__,
                },
                "traceback": result.traceback,
            }
        self._outcomes.deliver(task_id, meta, handler)

"""The result backend of a flask-execute Celery app, on the worker side.

Celery's Redis backend with two changes for the dispatch tasks: no read-before-write
when a state is stored (our claims already make each task id run once), and every
failure stored for them sealed (:class:`SealedFailures`), so that the caller can trust
every failure it accepts. Installed through the Celery app loader's
``override_backends``.
"""

from __future__ import annotations

import logging
import typing as t

from celery import states
from celery.backends.redis import RedisBackend

from .dispatch import DISPATCH_TASKS
from .envelopes import Codec
from .failures import seal_failure
from .outcomes import contained

__all__ = ["QuietRedisBackend", "SealedFailures"]

log = logging.getLogger(__name__)


class SealedFailures:
    """Result backend mixin: every failure stored for a dispatch task is sealed.

    Besides the failures our dispatch code raises (sealed already), Celery stores
    failures of its own for our tasks: ``WorkerLostError`` when a pool process dies,
    ``TimeLimitExceeded``, a ``Reject``, an error outside the task body
    (``celery.app.trace``, ``celery.worker.request``, ``celery.worker.strategy``). All
    of them go through ``Backend.store_result``; sealing them there, with the app's
    key, keeps their own type for the caller, who trusts nothing unsigned.
    """

    app: t.Any

    def store_result(
        self,
        task_id: str,
        result: t.Any,
        state: str,
        traceback: t.Any = None,
        request: t.Any = None,
        **kwargs: t.Any,
    ) -> t.Any:
        if (
            state == states.FAILURE
            and isinstance(result, BaseException)
            and not getattr(result, "flask_execute_carrier", False)
            and getattr(request, "task", None) in DISPATCH_TASKS
        ):
            result = self._sealed(task_id, result, traceback if isinstance(traceback, str) else "")
        store = super().store_result  # type: ignore[misc]
        return store(task_id, result, state, traceback, request, **kwargs)

    def _sealed(self, task_id: str, exc: BaseException, tb_text: str) -> BaseException:
        codec = getattr(getattr(self.app, "flask_execute", None), "codec", None)
        if not isinstance(codec, Codec):  # a Celery app not set up by flask-execute
            return exc
        try:
            return seal_failure(codec, task_id, contained(exc, tb_text), tb_text)
        except Exception:  # never keep Celery from storing the failure at all
            log.exception("flask-execute: could not seal the failure of task %s", task_id)
            return exc


class QuietRedisBackend(SealedFailures, RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend, minus the SUBSCRIBE it sends for every published
    task (and the UNSUBSCRIBE when its AsyncResult is collected): our watcher already
    follows every task it sends. ``AsyncResult.get()`` of registered tasks still
    subscribes when called. Failures of the dispatch tasks are stored sealed
    (:class:`~flask_execute.dispatch.SealedFailures`). Installed through the app
    loader's ``override_backends``.
    """

    def on_task_call(self, producer: t.Any, task_id: str) -> None:
        return None

    def _store_result(
        self,
        task_id: str,
        result: t.Any,
        state: str,
        traceback: t.Any = None,
        request: t.Any = None,
        **kwargs: t.Any,
    ) -> t.Any:
        # Celery reads the stored state first so that a duplicate run cannot overwrite
        # a SUCCESS. Our dispatch tasks claim their task id before running (replays
        # and finished redeliveries never run), so for them that read is a wasted
        # round trip on every task.
        if getattr(request, "task", None) not in DISPATCH_TASKS or not hasattr(
            self, "_set_with_state"
        ):
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id
        self._set_with_state(self.get_key_for_task(task_id), self.encode(meta), state)
        return result

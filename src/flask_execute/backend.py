"""The result backend of a flask-execute Celery app, on the worker side.

Celery's Redis backend with these changes for the dispatch tasks:

- every failure stored for them is sealed (:class:`SealedFailures`), so that the caller
  can trust every failure it accepts;
- a state is stored in one atomic Lua call that also publishes it on the caller's
  reply channel (named in the signed envelope), so that only the process that waits
  receives it, and — for a final state — marks the call's claim ``done``: a claim says
  ``done`` exactly when an outcome is stored, whatever instant a worker is killed at;
- no read-before-write (our claims already make each task id run once).

Installed through the Celery app loader's ``override_backends``.
"""

from __future__ import annotations

import logging
import typing as t

from billiard.exceptions import WorkerLostError
from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import Retry

from .claims import claim_key
from .dispatch import DISPATCH
from .dispatch import DISPATCH_TASKS
from .envelopes import Codec
from .envelopes import reply_channel
from .failures import seal_failure
from .outcomes import contained

__all__ = ["QuietRedisBackend", "SealedFailures"]

log = logging.getLogger(__name__)

# KEYS[1] the state key, KEYS[2] the claim key; ARGV[1] the encoded state, ARGV[2] its
# expiry (seconds, 0: none), ARGV[3] the caller's reply channel ('' if none), ARGV[4] '1'
# for a final state, ARGV[5] the claim's ttl. A claim the caller cancelled stays so.
_STORE = """
if tonumber(ARGV[2]) > 0 then
    redis.call('setex', KEYS[1], ARGV[2], ARGV[1])
else
    redis.call('set', KEYS[1], ARGV[1])
end
redis.call('publish', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then
    redis.call('publish', ARGV[3], ARGV[1])
end
if ARGV[4] == '1' then
    local claim = redis.call('get', KEYS[2])
    if claim and claim ~= 'cancelled' then
        redis.call('set', KEYS[2], 'done', 'EX', ARGV[5])
    end
end
return 1
"""


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
        if state == states.RETRY and _cancelled_at_most_once(result, request):
            # Celery's cold shutdown stores RETRY for the calls it stops; an at-most-once
            # call was acknowledged already and never comes back: it failed, say why
            state, result = states.FAILURE, _stopped(request)
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


def _cancelled_at_most_once(result: t.Any, request: t.Any) -> bool:
    """Is this the RETRY Celery stores for a running at-most-once dispatch call it
    stopped in a cold shutdown (``Request.cancel``: ``Retry('cancelled by Celery')``)?"""
    return (
        getattr(request, "task", None) == DISPATCH
        and isinstance(result, Retry)
        and str(getattr(result, "message", "")) == "cancelled by Celery"
    )


def _stopped(request: t.Any) -> WorkerLostError:
    worker = getattr(request, "hostname", None) or "?"
    return WorkerLostError(
        f"The worker {worker} was stopped (cold shutdown) while this call ran. It did"
        " not finish and, delivered at most once, it does not run again; submit with"
        " acks_late=True for calls that must survive a stopped worker."
    )


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
        runtime = getattr(self.app, "flask_execute", None)
        if getattr(request, "task", None) not in DISPATCH_TASKS or runtime is None:
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        # Celery reads the stored state first so that a duplicate run cannot overwrite
        # a SUCCESS. Our dispatch tasks claim their task id before running (replays
        # and finished redeliveries never run), so for them that read is a wasted
        # round trip on every task.
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id
        final = state in states.READY_STATES
        reply = _reply(runtime, task_id, request, final)
        self.client.eval(
            _STORE,
            2,
            self.get_key_for_task(task_id),
            claim_key(task_id),
            self.encode(meta),
            int(self.expires or 0),
            reply or "",
            "1" if final else "0",
            runtime.claims.ttl,
        )
        return result


def _reply(runtime: t.Any, task_id: str, request: t.Any, final: bool) -> str | None:
    """The reply channel of the process waiting for ``task_id``: the one this worker
    process noted when it admitted the call, else (a state Celery stores in the
    worker's main process: a lost pool process, a time limit) the one its verified
    envelope names."""
    replies = runtime.worker.replies
    reply = replies.pop(task_id, None) if final else replies.get(task_id)
    if reply is not None:
        return t.cast(str, reply)
    args = getattr(request, "args", None)
    if not isinstance(args, (list, tuple)) or len(args) != 1:
        return None
    try:
        header, _ = runtime.codec.open(args[0], "call", task_id)
    except Exception:  # not a genuine call of this task: publish nowhere else
        return None
    return reply_channel(header)

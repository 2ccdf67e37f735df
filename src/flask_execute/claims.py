"""Claims: one Redis key per task id, in the result backend, deciding at most one
run per task id — the worker claims before running, the caller claims to cancel.

``flask-execute:claim:<task id>`` holds ``run`` (a worker started it), ``cancelled``
(the caller won the race: it never runs), ``retry:<n>`` (the running attempt raised
``Retry``: attempt *n* may claim) or ``done`` (an at-least-once call finished).
Without a Redis result backend there are no claims: cancel falls back to Celery's
revoke alone, and replays are not detected.
"""

from __future__ import annotations

import os
import typing as t

from .futures import READY

__all__ = ["Claims"]

# claim KEYS[1] if nobody has; then store and publish the STARTED meta (KEYS[2]) as
# Celery's Redis backend would, in the same round trip. Else return the claim.
_CLAIM_AND_START = """
if redis.call('set', KEYS[1], 'run', 'NX', 'EX', ARGV[1]) then
    if tonumber(ARGV[3]) > 0 then
        redis.call('setex', KEYS[2], ARGV[3], ARGV[2])
    else
        redis.call('set', KEYS[2], ARGV[2])
    end
    redis.call('publish', KEYS[2], ARGV[2])
    return 1
end
return redis.call('get', KEYS[1])
"""
# set KEYS[1] to ARGV[2] (with ttl ARGV[3]) only if it still holds ARGV[1]
_CAS = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return nil
"""


class Claims:
    """The claims of one app's tasks."""

    def __init__(self, controller: t.Any, ttl: int, max_deliveries: int) -> None:
        """``controller`` is the app's ``celery.Celery`` (its result backend holds the
        claims), ``ttl`` how long a claim lives in seconds (longer than an envelope stays
        valid), ``max_deliveries`` the at-least-once delivery cap."""
        self._controller = controller
        self._ttl = ttl
        self._max_deliveries = max_deliveries

    def _claim_key(self, task_id: str) -> str:
        return f"flask-execute:claim:{task_id}"

    def _redis(self) -> t.Any:
        from celery.backends.redis import RedisBackend

        backend = self._controller.backend
        return backend.client if isinstance(backend, RedisBackend) else None

    def claim(self, task_id: str, attempt: int, late: bool = False, started: t.Any = None) -> str:
        """Worker side, before running a call: ``run``, ``started`` (= run, and the
        STARTED state was already stored and published), ``cancelled``, ``duplicate``
        (this task id already ran: a replay) or ``poison`` (at-least-once only: the
        delivery cap is reached).

        ``started`` is the task's request: the first claim also stores its STARTED
        state, in the same Redis round trip.

        One key per task id, in the result backend. A retry (``current_task.retry()``)
        runs only if the attempt before it announced it (:meth:`allow_retry`): the
        message's ``retries`` header is not signed, so it proves nothing by itself.
        """
        client = self._redis()
        if client is None:
            return "run"
        key = self._claim_key(task_id)
        ttl = self._ttl
        if started is not None:
            backend = self._controller.backend
            meta = backend.encode(
                backend._get_result_meta(
                    result={"pid": os.getpid(), "hostname": started.hostname},
                    state="STARTED",
                    traceback=None,
                    request=started,
                )
            )
            expires = int(backend.expires or 0)
            meta_key = backend.get_key_for_task(task_id)
            value = client.eval(_CLAIM_AND_START, 2, key, meta_key, ttl, meta, expires)
            if value == 1:
                if late:
                    client.set(f"flask-execute:deliveries:{task_id}", 1, ex=ttl)
                return "started"
        elif client.set(key, "run", nx=True, ex=ttl):
            if late:
                client.set(f"flask-execute:deliveries:{task_id}", 1, ex=ttl)
            return "run"
        else:
            value = client.get(key)
        if value == b"cancelled":
            return "cancelled"
        if value == b"done":
            return "duplicate"
        if attempt and value == f"retry:{attempt}".encode():
            # compare-and-set, so two copies of the retry message cannot both run
            if client.eval(_CAS, 1, key, value, "run", ttl):
                return "run"
            return "duplicate"
        if not late:
            return "duplicate"
        # at-least-once: a redelivery after a lost worker runs again, unless the task
        # already finished (then it is a replay) or kept killing its worker
        meta = self._controller.backend.get_task_meta(task_id)
        if meta.get("status") in READY:
            return "duplicate"
        deliveries = client.incr(f"flask-execute:deliveries:{task_id}")
        return "poison" if deliveries > self._max_deliveries else "run"

    def claimed(self, task_id: str) -> bool:
        """Did a worker ever claim (start, or see cancelled) this task id?"""
        client = self._redis()
        return client is not None and client.get(self._claim_key(task_id)) not in (
            None,
            b"cancelled",
        )

    def finish(self, task_id: str) -> None:
        """The call finished (either way): any later delivery of it is a duplicate,
        even after its result expired."""
        client = self._redis()
        if client is not None:
            client.set(self._claim_key(task_id), "done", ex=self._ttl)

    def allow_retry(self, task_id: str, attempt: int) -> None:
        """The running attempt raised ``Retry``: let attempt ``attempt`` claim the id."""
        client = self._redis()
        if client is not None:
            client.set(self._claim_key(task_id), f"retry:{attempt}", ex=self._ttl)

    def cancel(self, task_id: str) -> bool:
        """Caller side: claim the id as cancelled; False if a worker claimed it first.
        True without a Redis backend (nothing to race against)."""
        client = self._redis()
        if client is None:
            return True
        ttl = self._ttl
        return bool(client.set(self._claim_key(task_id), "cancelled", nx=True, ex=ttl))

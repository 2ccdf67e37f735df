"""Claims: one Redis key per task id, in the result backend, deciding at most one
run per task id — the worker claims before running, the caller claims to cancel.

``flask-execute:claim:<task id>`` holds ``run`` (a worker started it), ``cancelled``
(the caller won the race: it never runs), ``retry:<n>`` (the running attempt raised
``Retry``: attempt *n* may claim) or ``done`` (the call finished: set by the worker's
result backend in the same atomic write that stores the final state, so a claim says
``done`` exactly when an outcome was stored — :mod:`flask_execute.backend`).
Without a Redis result backend there are no claims: cancel falls back to Celery's
revoke alone, and replays are not detected.
"""

from __future__ import annotations

import os
import typing as t

from .futures import READY

__all__ = ["Claims", "claim_key"]

# claim KEYS[1] if nobody has; then store and publish the STARTED meta (KEYS[2]) as
# Celery's Redis backend would, and on the caller's reply channel (ARGV[4], when
# given), in the same round trip. Else return the claim.
_CLAIM_AND_START = """
if redis.call('set', KEYS[1], 'run', 'NX', 'EX', ARGV[1]) then
    if tonumber(ARGV[3]) > 0 then
        redis.call('setex', KEYS[2], ARGV[3], ARGV[2])
    else
        redis.call('set', KEYS[2], ARGV[2])
    end
    redis.call('publish', KEYS[2], ARGV[2])
    if ARGV[4] ~= '' then
        redis.call('publish', ARGV[4], ARGV[2])
    end
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


def claim_key(task_id: str) -> str:
    """The Redis key of ``task_id``'s claim (in the result backend)."""
    return f"flask-execute:claim:{task_id}"


class Claims:
    """The claims of one app's tasks."""

    def __init__(self, controller: t.Any, ttl: int, max_deliveries: int) -> None:
        """``controller`` is the app's ``celery.Celery`` (its result backend holds the
        claims), ``ttl`` how long a claim lives in seconds (longer than an envelope stays
        valid), ``max_deliveries`` the at-least-once delivery cap."""
        self._controller = controller
        #: seconds a claim lives: longer than a call envelope stays valid
        self.ttl = ttl
        self._max_deliveries = max_deliveries

    def _redis(self) -> t.Any:
        from celery.backends.redis import RedisBackend

        backend = self._controller.backend
        return backend.client if isinstance(backend, RedisBackend) else None

    def claim(
        self,
        task_id: str,
        attempt: int,
        late: bool = False,
        started: t.Any = None,
        reply: str | None = None,
    ) -> str:
        """Worker side, before running a call: ``run``, ``started`` (= run, and the
        STARTED state was already stored and published), ``cancelled``, ``duplicate``
        (this task id already ran: a replay) or ``poison`` (at-least-once only: the
        delivery cap is reached).

        ``started`` is the task's request: the first claim also stores its STARTED
        state, in the same Redis round trip, and publishes it on the caller's ``reply``
        channel too.

        One key per task id, in the result backend. A retry (``current_task.retry()``)
        runs only if the attempt before it announced it (:meth:`allow_retry`): the
        message's ``retries`` header is not signed, so it proves nothing by itself.
        """
        client = self._redis()
        if client is None:
            return "run"
        key = claim_key(task_id)
        ttl = self.ttl
        if started is not None:
            backend = self._controller.backend
            fields = backend._get_result_meta(
                result={
                    "pid": os.getpid(),
                    "hostname": started.hostname,
                    "retries": started.retries or 0,
                },
                state="STARTED",
                traceback=None,
                request=started,
            )
            meta = backend.encode({**fields, "task_id": task_id})
            expires = int(backend.expires or 0)
            meta_key = backend.get_key_for_task(task_id)
            value = client.eval(_CLAIM_AND_START, 2, key, meta_key, ttl, meta, expires, reply or "")
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

    def allow_retry(self, task_id: str, attempt: int) -> None:
        """The running attempt raised ``Retry``: let attempt ``attempt`` claim the id."""
        client = self._redis()
        if client is not None:
            client.set(claim_key(task_id), f"retry:{attempt}", ex=self.ttl)

    def cancel(self, task_id: str) -> bool:
        """Caller side: claim the id as cancelled; False if a worker claimed it first.
        True when it was cancelled already (by another future of the same id), and
        without a Redis backend (nothing to race against)."""
        client = self._redis()
        if client is None:
            return True
        key = claim_key(task_id)
        return bool(client.set(key, "cancelled", nx=True, ex=self.ttl)) or (
            client.get(key) == b"cancelled"
        )

"""The worker side of futures as arguments: publishing the calls whose dependencies
finished (:mod:`flask_execute.dependencies` registers them).

When a worker stores a task's final state, the same atomic script (:data:`RELEASE`,
part of the result backend's store and of a ``map`` chunk's) looks at the calls waiting
for that task: on success it crosses the task off each one's unmet set, and a call with
nothing left is *released*; on failure or cancellation every waiting call is released
at once (its own worker fails it with ``DependencyError``). A released call's id goes
into this app's outbox (a sorted set, in the result backend), in that same write: a
worker killed right after storing the outcome leaves it there, never loses it.

The storing worker then drains the outbox (:meth:`Outbox.drain`): it takes the due
entries under a lease (so two workers do not publish one at once, and a worker that
dies while publishing leaves it to the next drain, after :data:`LEASE` seconds),
verifies each stored envelope — signed by this app, for this task id, for a call that
waits — and publishes it with the options and lineage its signed header names. A
forged entry (another envelope, a changed one, a task id nobody registered) is logged
at CRITICAL and dropped; it never reaches the broker. A call published twice runs once
(its claim). Every worker also drains when it starts.
"""

from __future__ import annotations

import logging
import typing as t
import weakref
from collections.abc import Mapping

from .dependencies import restore_options
from .dependencies import waiting_key
from .envelopes import Codec
from .errors import SignatureError
from .refusals import alert
from .refusals import Refused

__all__ = ["BATCH", "LEASE", "RELEASE", "Outbox", "drain_at_start"]

log = logging.getLogger(__name__)

#: Seconds a drain holds an outbox entry before another drain may publish it again.
LEASE = 30
#: How many entries one round trip takes from the outbox.
BATCH = 200

#: Lua functions for the scripts that store a final state. ``fe_release(claim key,
#: encoded state, outbox key)`` releases the calls waiting for that task (the task id
#: is the claim key's tail) and returns how many it released; ``fe_take(outbox key)``
#: takes up to :data:`BATCH` due entries under a lease of :data:`LEASE` seconds and
#: returns each id followed by its stored envelope ('' when there is none). A script
#: that released calls takes them in the same round trip (:meth:`Outbox.publish`).
RELEASE = f"""
local function fe_release(claim_key, encoded, outbox)
    if outbox == '' then return 0 end
    local tid = string.sub(claim_key, 21)
    local dependents = 'flask-execute:dependents:' .. tid
    local waiting = redis.call('smembers', dependents)
    if #waiting == 0 then return 0 end
    local ok, meta = pcall(cjson.decode, encoded)
    local success = ok and type(meta) == 'table' and meta['status'] == 'SUCCESS'
    local now = tonumber(redis.call('time')[1])
    local released = 0
    for _, call in ipairs(waiting) do
        local unmet = 'flask-execute:unmet:' .. call
        if success then redis.call('srem', unmet, tid) end
        if not success or redis.call('scard', unmet) == 0 then
            redis.call('del', unmet)
            redis.call('zadd', outbox, now, call)
            released = released + 1
        end
    end
    redis.call('del', dependents)
    return released
end
local function fe_take(outbox)
    local now = tonumber(redis.call('time')[1])
    local due = redis.call('zrangebyscore', outbox, '-inf', now, 'LIMIT', 0, {BATCH})
    local out = {{}}
    for _, call in ipairs(due) do
        redis.call('zadd', outbox, now + {LEASE}, call)
        out[#out + 1] = call
        out[#out + 1] = redis.call('get', 'flask-execute:waiting:' .. call) or ''
    end
    return out
end
"""

# Take the due entries of the outbox KEYS[1] (a drain).
_TAKE = RELEASE + "return fe_take(KEYS[1])"


class Outbox:
    """The released calls of one app, published by its workers."""

    def __init__(self, codec: Codec, controller: t.Any, tasks: Mapping[str, t.Any]) -> None:
        """``tasks`` are the app's dispatch tasks by name: the only tasks a released
        call may be published as."""
        self._codec = codec
        self._controller = weakref.proxy(controller)
        self._tasks = dict(tasks)
        #: the outbox of this app's signing key (apps sharing a Redis db keep apart)
        self.key = f"flask-execute:outbox:{codec.kid}"
        self._scripts: dict[int, t.Any] = {}

    def drain(self, client: t.Any) -> int:
        """Publish every due released call; return how many were published. Never
        raises: what could not be published stays for the next drain."""
        return self.publish(client, None)

    def publish(self, client: t.Any, taken: list[t.Any] | None) -> int:
        """Publish the entries a store script took (``fe_take``'s list), then every
        other due one; return how many were published. Never raises."""
        published = 0
        try:
            while True:
                if taken is None:
                    taken = self._take(client)
                published += self._send(client, taken)
                if len(taken) < 2 * BATCH:
                    return published
                taken = None
        except Exception:
            log.exception("flask-execute: could not publish the calls whose dependencies finished")
            return published

    def _take(self, client: t.Any) -> list[t.Any]:
        script = self._scripts.get(id(client))
        if script is None or script.registered_client is not client:
            script = self._scripts[id(client)] = client.register_script(_TAKE)
        return t.cast(list[t.Any], script([self.key]))

    def _send(self, client: t.Any, taken: list[t.Any]) -> int:
        """Verify and publish taken entries (one producer for all), then forget the
        ones handled (one round trip); return how many were published."""
        handled: list[str] = []
        published = 0
        try:
            with self._controller.producer_or_acquire() as producer:
                for i in range(0, len(taken) - 1, 2):
                    task_id, envelope = _text(taken[i]), _text(taken[i + 1])
                    header = self._verified(task_id, envelope)
                    if header is not None:
                        label = header.get("fn", "?")
                        self._tasks[header["task"]].apply_async(
                            (envelope,),
                            task_id=task_id,
                            root_id=header.get("root"),
                            parent_id=header.get("parent"),
                            shadow=label,
                            argsrepr=f"<{label}>",
                            kwargsrepr="{}",
                            producer=producer,
                            **restore_options(header.get("send")),
                        )
                        published += 1
                    handled.append(task_id)
        finally:
            if handled:
                pipe = client.pipeline(transaction=False)
                pipe.delete(*[waiting_key(task_id) for task_id in handled])
                pipe.zrem(self.key, *handled)
                pipe.execute()
        return published

    def _verified(self, task_id: str, envelope: str) -> dict[str, t.Any] | None:
        """The header of a released call's envelope, or None (no envelope; refused)."""
        if not envelope:
            return None  # nothing stored under that id: a forged or stale entry
        try:
            header, _ = self._codec.open(envelope, "call", task_id)
        except SignatureError as exc:
            alert(task_id, Refused(exc.reason, f"Released call refused: {exc}"))
            return None
        if not header.get("after") or header.get("task") not in self._tasks:
            alert(task_id, Refused("malformed", "Released envelope is not a waiting call."))
            return None
        return header


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def drain_at_start(controller: t.Any, outbox: t.Callable[[], Outbox | None]) -> None:
    """When a worker of ``controller`` is ready, publish what earlier workers released
    and did not publish (they were killed in between)."""
    from celery import signals

    ref = weakref.ref(controller)

    def ready(sender: t.Any = None, **_: t.Any) -> None:
        owner, box = ref(), outbox()
        if owner is None or box is None or getattr(sender, "app", None) is not owner:
            return
        client = getattr(t.cast(t.Any, owner).backend, "client", None)
        if client is not None:
            box.drain(client)

    # held by the controller itself: the connection is weak and dies with the app
    controller.flask_execute_drain = ready
    signals.worker_ready.connect(ready)

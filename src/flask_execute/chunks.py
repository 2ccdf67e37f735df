"""The calls of a ``map`` chunk on a worker: one broker message, many calls, each with its
own task id, claim and outcome, streamed as each call finishes.

A chunk's payload is ``(function, [(member task id, args, kwargs), ...])``, all of it
inside the chunk's signed envelope. The worker runs the members one after the other.
Before a member runs it claims the member's own task id (so ``cancel()`` of a member
that has not started wins, exactly), and stores and publishes its ``STARTED`` state;
the outcomes of the members finished since are stored, published and their claims
marked ``done`` in that same round trip (:data:`_ADVANCE`): one Redis call per member,
and each finished member reaches the caller no later than the next one starts. The
reply channel gets one message per round trip, with every state in it.

A redelivered at-least-once chunk skips the members that finished (their claim says
``done``) and runs the others again. ``current_task.retry()`` inside a chunk fails that
member: a chunk has no way to run one member again later.
"""

from __future__ import annotations

import os
import typing as t
from collections.abc import Callable

from celery import states
from celery.exceptions import Retry
from celery.exceptions import TaskRevokedError

from .claims import claim_key
from .errors import RemoteError
from .failures import seal_failure
from .outbox import RELEASE
from .outcomes import STREAMED
from .running import call
from .running import portable
from .running import Worker
from .serialization import dumps

__all__ = ["run_chunk"]

Member = tuple[str, tuple[t.Any, ...], dict[str, t.Any]]

# Store the finished members' states (KEYS[3..]: state key, claim key pairs; ARGV[7..]
# their encoded states), then claim the next member (KEYS[1] its claim key, KEYS[2] its
# state key) and store its STARTED state (ARGV[2]). ARGV[1] claim ttl, ARGV[3] state
# expiry (0: none), ARGV[4] reply channel ('' if none), ARGV[5] '1' when there is a
# next member, ARGV[6] the app's outbox ('' for none). Publishes every state on its
# key, and all of them in one message (a JSON array) on the reply channel; releases the
# calls waiting for a finished member (outbox.py). Returns 1 when the next member was
# claimed here, else its claim (or 0 without a next member), then the released calls
# taken from the outbox, to publish.
_ADVANCE = (
    RELEASE
    + """
local parts = {}
local released = 0
local n = (#KEYS - 2) / 2
for i = 1, n do
    local key, claim_key, value = KEYS[2 + 2 * i - 1], KEYS[2 + 2 * i], ARGV[6 + i]
    if tonumber(ARGV[3]) > 0 then
        redis.call('setex', key, ARGV[3], value)
    else
        redis.call('set', key, value)
    end
    redis.call('publish', key, value)
    local claim = redis.call('get', claim_key)
    if claim and claim ~= 'cancelled' then
        redis.call('set', claim_key, 'done', 'EX', ARGV[1])
    end
    released = released + fe_release(claim_key, value, ARGV[6])
    parts[#parts + 1] = value
end
local result = 0
if ARGV[5] == '1' then
    if redis.call('set', KEYS[1], 'run', 'NX', 'EX', ARGV[1]) then
        if tonumber(ARGV[3]) > 0 then
            redis.call('setex', KEYS[2], ARGV[3], ARGV[2])
        else
            redis.call('set', KEYS[2], ARGV[2])
        end
        redis.call('publish', KEYS[2], ARGV[2])
        parts[#parts + 1] = ARGV[2]
        result = 1
    else
        result = redis.call('get', KEYS[1])
    end
end
if ARGV[4] ~= '' and #parts > 0 then
    redis.call('publish', ARGV[4], '[' .. table.concat(parts, ',') .. ']')
end
local out = {}
if released > 0 then out = fe_take(ARGV[6]) end
table.insert(out, 1, result)
return out
"""
)


def run_chunk(
    task: t.Any,
    worker: Worker,
    header: dict[str, t.Any],
    func: Callable[..., object],
    members: list[Member],
    eager: bool,
    late: bool,
) -> str:
    """Run every member of a verified chunk; return the chunk's sealed result.

    On a worker each member's outcome is stored under its own task id as it finishes,
    and the chunk's own result says only that it streamed them. Eagerly (no result
    backend) the chunk's result is every member's outcome, in order.
    """
    tid: str = header["tid"]
    label: str = header.get("fn", "?")
    if eager or getattr(task.backend, "client", None) is None:
        outcomes = [
            portable(label, _member_outcome(func, args, kwargs)) for _, args, kwargs in members
        ]
        if not eager:  # a result backend without claims or streams: one state each
            for (mid, _, _), outcome in zip(members, outcomes, strict=True):
                _store_one(task.backend, worker, mid, outcome)
            return _sealed(worker, tid, STREAMED)
        return _sealed(worker, tid, outcomes)
    stream = _Stream(task, worker, late)
    for index, (mid, args, kwargs) in enumerate(members):
        if not stream.claim(mid):
            continue
        outcome = portable(label, _member_outcome(func, args, kwargs))
        stream.finished(mid, outcome, last=index == len(members) - 1)
    stream.flush()
    return _sealed(worker, tid, STREAMED)


def _member_outcome(
    func: Callable[..., object], args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
) -> tuple[bool, object]:
    try:
        return call(func, args, kwargs)
    except Retry:
        error = RemoteError(
            "celery.exceptions.Retry",
            "current_task.retry() is not supported inside a map chunk (chunksize > 1):"
            " a chunk cannot run one member again later. Submit such calls one per"
            " message (chunksize=1).",
        )
        return False, (error, "")


def _sealed(worker: Worker, tid: str, value: object) -> str:
    data, by_value = dumps(value)
    return worker.codec.seal("result", tid, data, by_value=by_value)


def _member_state(
    worker: Worker, mid: str, outcome: tuple[bool, object]
) -> tuple[str, object, str]:
    """(state, what the backend stores, traceback) of one finished member."""
    ok, value = outcome
    if ok:
        return states.SUCCESS, _sealed(worker, mid, value), ""
    exc, tb_text = t.cast(tuple[BaseException, str], value)
    sealed = seal_failure(worker.codec, mid, exc, tb_text)
    # the traceback names the error's message: kept only inside the envelope when encrypting
    return states.FAILURE, sealed, "" if worker.codec.encrypts else tb_text


def _store_one(backend: t.Any, worker: Worker, mid: str, outcome: tuple[bool, object]) -> None:
    state, result, tb_text = _member_state(worker, mid, outcome)
    backend.store_result(mid, result, state, traceback=tb_text or None)


class _Stream:
    """The chunk's members' states on their way to the result backend."""

    def __init__(self, task: t.Any, worker: Worker, late: bool) -> None:
        self._task = task
        self._worker = worker
        self._late = late
        self._backend = task.backend
        self._reply = worker.replies.get(task.request.id) or ""
        self._done: list[tuple[str, bytes | str]] = []  # (member id, encoded state)
        self._script = self._backend.client.register_script(_ADVANCE)  # sent by SHA1

    def _encode(self, mid: str, state: str, result: object, tb_text: str | None) -> bytes | str:
        meta = self._backend._get_result_meta(
            result=self._backend.encode_result(result, state),
            state=state,
            traceback=tb_text,
            request=None,
        )
        return t.cast("bytes | str", self._backend.encode({**meta, "task_id": mid}))

    def _advance(self, next_mid: str | None, started: bytes | str = "") -> object:
        # without a next member, its two keys are placeholders the script never reads
        keys = [claim_key(next_mid), self._key(next_mid)] if next_mid else ["-", "-"]
        values: list[bytes | str] = []
        for mid, encoded in self._done:
            keys += [self._key(mid), claim_key(mid)]
            values.append(encoded)
        self._done = []
        outbox = self._worker.outbox
        value, *taken = self._script(
            keys,
            [
                self._worker.claims.ttl,
                started,
                int(self._backend.expires or 0),
                self._reply,
                "1" if next_mid else "0",
                outbox.key if outbox is not None else "",
                *values,
            ],
        )
        if taken and outbox is not None:
            outbox.publish(self._backend.client, taken)
        return value

    def _key(self, mid: str) -> str:
        return t.cast(str, self._backend.get_key_for_task(mid))

    def claim(self, mid: str) -> bool:
        """Claim member ``mid`` (storing what finished before it): whether it runs."""
        request = self._task.request
        started = self._encode(
            mid,
            states.STARTED,
            {"pid": os.getpid(), "hostname": request.hostname, "retries": 0},
            None,
        )
        value = self._advance(mid, started)
        if value == 1:
            return True
        if value == b"cancelled":
            # the caller cancelled it first: it never runs; say so to other readers
            revoked = TaskRevokedError("cancelled")
            self._done.append((mid, self._encode(mid, states.REVOKED, revoked, None)))
            return False
        if value == b"done" or not self._late:
            return False  # finished already (a redelivery), or a replay
        # at-least-once redelivery: run again unless its outcome was stored
        meta = self._backend.get_task_meta(mid)
        return meta.get("status") not in states.READY_STATES

    def finished(self, mid: str, outcome: tuple[bool, object], last: bool) -> None:
        state, result, tb_text = _member_state(self._worker, mid, outcome)
        self._done.append((mid, self._encode(mid, state, result, tb_text or None)))
        if last:
            self.flush()

    def flush(self) -> None:
        """Store and publish what finished and has not been yet."""
        if self._done:
            self._advance(None)

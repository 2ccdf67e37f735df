"""The calls of a ``map`` chunk on a worker: one broker message, many calls, each with its
own task id, claim and outcome, streamed as each run of calls finishes.

A chunk's payload is ``(function, [(member task id, args, kwargs), ...])``, all of it
inside the chunk's signed envelope. The worker runs the members one after the other,
in *runs*: before a run starts, the worker claims each of its members' own task ids
(so ``cancel()`` of a member whose run has not been claimed wins, exactly) and stores
the outcomes of the previous run, marks their claims ``done`` and publishes them, all
in one Redis round trip (:data:`_ADVANCE`). The reply channel gets one message per
round trip, with every state in it.

A run is sized by time: as many members as the chunk's calls so far suggest will take
about :data:`RUN_BUDGET` seconds, at least one, at most :data:`MAX_RUN`. A chunk's
first member runs alone, and so does every member of a chunk whose calls take longer
than the budget: for them the worker stores ``STARTED`` when it claims the member,
``running()`` is true while it runs and its outcome reaches the caller before the next
member starts. Calls shorter than that share a round trip: their ``STARTED`` is not
stored (they go from pending to their outcome within the run), and a member's
``cancel()`` returns False once its run is claimed, as a ``ProcessPoolExecutor`` call
cannot be cancelled once it is in its call queue. Without runs each call of a large
``map`` would cost one round trip; with them, a chunk of trivial calls costs a few.

A redelivered at-least-once chunk skips the members that finished (their claim says
``done``) and runs the others again. ``current_task.retry()`` inside a chunk fails that
member: a chunk has no way to run one member again later.
"""

from __future__ import annotations

import os
import time
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

__all__ = ["MAX_RUN", "RUN_BUDGET", "run_chunk", "run_size"]

#: seconds of calls a run of members is sized for (see the module's docstring)
RUN_BUDGET = 0.002
#: most members claimed in one round trip
MAX_RUN = 64

Member = tuple[str, tuple[t.Any, ...], dict[str, t.Any]]

# Store the finished members' states (KEYS[2k+1..]: state key, claim key pairs;
# ARGV[7..] their encoded states), then claim the next run of k = ARGV[5] members
# (KEYS[2j-1] member j's claim key, KEYS[2j] its state key); with ARGV[2] not empty
# (a run of one), store it as that member's STARTED state. ARGV[1] claim ttl, ARGV[3]
# state expiry (0: none), ARGV[4] reply channel ('' if none), ARGV[6] the app's outbox
# ('' for none). Publishes every state on its key, and all of them in one message (a
# JSON array) on the reply channel; releases the calls waiting for a finished member
# (outbox.py). Returns, for each member of the run, 1 when it was claimed here, else
# its claim (0 for none), then the released calls taken from the outbox, to publish.
_ADVANCE = (
    RELEASE
    + """
local parts = {}
local released = 0
local k = tonumber(ARGV[5])
local n = (#KEYS - 2 * k) / 2
for i = 1, n do
    local key, claim_key, value = KEYS[2 * k + 2 * i - 1], KEYS[2 * k + 2 * i], ARGV[6 + i]
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
local results = {}
for j = 1, k do
    if redis.call('set', KEYS[2 * j - 1], 'run', 'NX', 'EX', ARGV[1]) then
        if ARGV[2] ~= '' then
            if tonumber(ARGV[3]) > 0 then
                redis.call('setex', KEYS[2 * j], ARGV[3], ARGV[2])
            else
                redis.call('set', KEYS[2 * j], ARGV[2])
            end
            redis.call('publish', KEYS[2 * j], ARGV[2])
            parts[#parts + 1] = ARGV[2]
        end
        results[j] = 1
    else
        results[j] = redis.call('get', KEYS[2 * j - 1]) or 0
    end
end
if ARGV[4] ~= '' and #parts > 0 then
    redis.call('publish', ARGV[4], '[' .. table.concat(parts, ',') .. ']')
end
if released > 0 then
    for _, call in ipairs(fe_take(ARGV[6])) do results[#results + 1] = call end
end
return results
"""
)


def run_size(seconds_per_call: float | None, left: int) -> int:
    """How many of the ``left`` members to claim as the next run, given the average
    time of the chunk's calls so far (None: none ran yet)."""
    if left <= 0:
        return 0
    if seconds_per_call is None or seconds_per_call >= RUN_BUDGET:
        return 1
    return max(1, min(left, MAX_RUN, int(RUN_BUDGET / max(seconds_per_call, 1e-6))))


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
    average: float | None = None  # seconds per call so far, each with its sealing
    ran = 0
    index = 0
    while index < len(members):
        run = members[index : index + run_size(average, len(members) - index)]
        index += len(run)
        run_began = time.perf_counter()
        for (mid, args, kwargs), claimed in zip(
            run, stream.claim([m[0] for m in run]), strict=True
        ):
            if not claimed:
                continue
            began = time.perf_counter()
            stream.finished(mid, portable(label, _member_outcome(func, args, kwargs)))
            took = time.perf_counter() - began
            ran += 1
            average = took if average is None else average + (took - average) / min(ran, 8)
            if began + took - run_began > 4 * RUN_BUDGET:
                stream.flush()  # a call slower than foreseen: what finished goes out now
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

    def _advance(self, run: list[str], started: bytes | str = "") -> list[object]:
        keys: list[str] = []
        for mid in run:
            keys += [claim_key(mid), self._key(mid)]
        values: list[bytes | str] = []
        for mid, encoded in self._done:
            keys += [self._key(mid), claim_key(mid)]
            values.append(encoded)
        self._done = []
        outbox = self._worker.outbox
        replies = self._script(
            keys,
            [
                self._worker.claims.ttl,
                started,
                int(self._backend.expires or 0),
                self._reply,
                len(run),
                outbox.key if outbox is not None else "",
                *values,
            ],
        )
        claims, taken = replies[: len(run)], replies[len(run) :]
        if taken and outbox is not None:
            outbox.publish(self._backend.client, taken)
        return list(claims)

    def _key(self, mid: str) -> str:
        return t.cast(str, self._backend.get_key_for_task(mid))

    def claim(self, run: list[str]) -> list[bool]:
        """Claim the members of ``run`` (storing what finished before them): whether
        each runs. A run of one also stores that member's ``STARTED`` state."""
        started: bytes | str = ""
        if len(run) == 1:
            request = self._task.request
            started = self._encode(
                run[0],
                states.STARTED,
                {"pid": os.getpid(), "hostname": request.hostname, "retries": 0},
                None,
            )
        claims = self._advance(run, started)
        return [self._runs(mid, value) for mid, value in zip(run, claims, strict=True)]

    def _runs(self, mid: str, claim: object) -> bool:
        if claim == 1:
            return True
        if claim == b"cancelled":
            # the caller cancelled it first: it never runs; say so to other readers
            revoked = TaskRevokedError("cancelled")
            self._done.append((mid, self._encode(mid, states.REVOKED, revoked, None)))
            return False
        if claim == b"done" or not self._late:
            return False  # finished already (a redelivery), or a replay
        # at-least-once redelivery: run again unless its outcome was stored
        meta = self._backend.get_task_meta(mid)
        return meta.get("status") not in states.READY_STATES

    def finished(self, mid: str, outcome: tuple[bool, object]) -> None:
        """Member ``mid`` ended with ``outcome``: stored with the next round trip."""
        state, result, tb_text = _member_state(self._worker, mid, outcome)
        self._done.append((mid, self._encode(mid, state, result, tb_text or None)))

    def flush(self) -> None:
        """Store and publish what finished and has not been yet."""
        if self._done:
            self._advance([])

"""The outcomes of a waiting call's dependencies, read by the worker about to run it.

The worker trusts only its verified envelope: the dependencies are the task ids its
signed payload names (:func:`~flask_execute.dependencies.unframe`), and each one's
outcome is read from the result backend and verified like any outcome
(:class:`~flask_execute.outcomes.Outcomes`): a value sealed for that task id, or its
exception. So neither a forged entry in the backend nor a forged state substitutes a
value: a state that does not verify is that dependency's failure.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import typing as t

from celery import states

from .claims import claim_key
from .errors import RemoteError
from .errors import RemoteTraceback
from .outcomes import EXPIRED
from .outcomes import Outcome
from .outcomes import Outcomes
from .outcomes import read_state
from .serialization import dumps

__all__ = ["Upstream", "read_upstream", "remote_traceback"]


class Upstream(t.NamedTuple):
    """What the dependencies of a call came to: every value by task id, or the first
    (in the call's order) that did not succeed, with its exception."""

    values: dict[str, object]
    failed: tuple[str, BaseException] | None = None


def read_upstream(backend: t.Any, outcomes: Outcomes, task_ids: list[str]) -> Upstream | None:
    """Read the outcomes of ``task_ids`` (one round trip); None while one of them is
    not final yet (and none failed)."""
    keys = [backend.get_key_for_task(tid) for tid in task_ids]
    raw = backend.client.mget(keys + [claim_key(tid) for tid in task_ids])
    values: dict[str, object] = {}
    pending = False
    for i, tid in enumerate(task_ids):
        state, claim = raw[i], raw[len(task_ids) + i]
        if state is None:
            if claim == b"cancelled":
                return Upstream(values, (tid, _cancelled(tid)))
            if claim == b"done":  # finished, its result expired: as celery.get() says
                return Upstream(values, (tid, _failure(outcomes.read(tid, EXPIRED))))
            pending = True
            continue
        outcome = outcomes.read(tid, read_state(state))
        if outcome.status == states.SUCCESS:
            values[tid] = outcome.value
        elif outcome.status == states.FAILURE:
            return Upstream(values, (tid, _failure(outcome)))
        elif outcome.status == states.REVOKED:
            return Upstream(values, (tid, _cancelled(tid)))
        else:
            pending = True
    return None if pending else Upstream(values)


def remote_traceback(exc: BaseException) -> str:
    """The worker-side traceback text a received exception carries, else ''."""
    cause = exc.__cause__
    return cause.tb if isinstance(cause, RemoteTraceback) else ""


def _failure(outcome: Outcome) -> BaseException:
    """A dependency's exception, as it can travel on as a ``DependencyError``'s cause."""
    exc = outcome.exc if outcome.exc is not None else RemoteError("unknown", "no exception")
    try:
        pickle.loads(dumps(exc)[0])
    except Exception:
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        tb_text = remote_traceback(exc)
        error = RemoteError(name, str(exc), tb_text)
        error.__cause__ = exc.__cause__
        return error
    return exc


def _cancelled(task_id: str) -> BaseException:
    return concurrent.futures.CancelledError(f"Task {task_id} was cancelled.")

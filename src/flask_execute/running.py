"""Running a submitted function inside a dispatch task: what is its outcome.

A call ends with a value, or an exception of its own. Celery's control-flow exceptions
(``Retry``, ``Ignore``, ``Reject``) are not outcomes: they go on to Celery. The
``SystemExit`` billiard raises when it stops a pool process (``cancel(terminate=True)``,
a cold shutdown) is not the call's failure either: the process is on its way out and
the call did not finish. Any other ``BaseException`` the call raises (``SystemExit``,
``KeyboardInterrupt``, ``GeneratorExit``, ``asyncio.CancelledError``, ...) is reported
as a :class:`~flask_execute.RemoteError`, never re-raised: the worker lives on.
"""

from __future__ import annotations

import dataclasses
import pickle
import typing as t
from collections.abc import Callable

from celery.exceptions import Ignore
from celery.exceptions import Reject
from celery.exceptions import Retry

from .claims import Claims
from .envelopes import Codec
from .errors import SerializationError
from .outbox import Outbox
from .outcomes import contained
from .serialization import dump_exception
from .serialization import dumps
from .serialization import format_exception

__all__ = ["CONTROL_FLOW", "Outcome", "Worker", "call", "exit_error", "leaving", "portable"]

#: Celery's exceptions that steer the task itself: never a call's outcome.
CONTROL_FLOW = (Retry, Ignore, Reject)
#: ``(True, value)`` or ``(False, (exception, traceback text))``.
Outcome = tuple[bool, object]

try:  # billiard >= 4.3: did this pool process's own SIGTERM handler raise SystemExit?
    from billiard.common import terminate_handler_fired as leaving
except ImportError:  # pragma: no cover - older billiard

    def leaving() -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class Worker:
    """What the dispatch tasks of one app need on a worker: the ``codec`` that opens
    calls and seals outcomes, the ``claims`` that decide at most one run per task id,
    and the at-least-once delivery cap."""

    codec: Codec
    claims: Claims
    max_deliveries: int
    #: task id -> the caller's reply channel, for the calls this process runs (the
    #: result backend publishes their states there too; see backend.py)
    replies: dict[str, str] = dataclasses.field(default_factory=dict)
    #: publishes the calls whose dependencies finished (futures as arguments)
    outbox: Outbox | None = None


def exit_error(exc: BaseException) -> BaseException:
    """A task's own ``BaseException``, as the caller receives it."""
    return contained(exc, format_exception(exc), "; the worker was kept running")


def call(
    func: Callable[..., object], args: t.Sequence[object], kwargs: dict[str, t.Any]
) -> Outcome:
    """Run ``func(*args, **kwargs)``: its value, or its exception and traceback.

    :raises: Celery's control flow, and billiard's stop of this pool process.
    """
    try:
        return True, func(*args, **kwargs)
    except CONTROL_FLOW:
        raise
    except Exception as exc:
        return False, (exc, format_exception(exc))
    except BaseException as exc:
        if leaving():
            raise
        return False, (exit_error(exc), format_exception(exc))


def portable(label: str, outcome: Outcome) -> Outcome:
    """``outcome``, or, if it cannot travel, a failure saying why."""
    ok, value = outcome
    try:
        dumps(value)
        return outcome
    except Exception as exc:
        if ok:
            error = SerializationError(
                f"The return value of {label} ({type(value).__name__}) cannot be"
                f" serialized: {type(exc).__name__}: {exc}. Return something picklable."
            )
            return False, (error, "")
        original, tb_text = t.cast(tuple[BaseException, str], value)
        return False, (pickle.loads(dump_exception(original, tb_text))[0], tb_text)

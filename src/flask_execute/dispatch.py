"""The worker side of ``submit``: the one registered task that runs any function.

``flask_execute.dispatch`` takes a single argument, a signed envelope (a string, so
Celery's JSON serializer carries it). It verifies the envelope before anything is
unpickled; a forged, tampered, expired or misdirected envelope is logged at CRITICAL,
acknowledged and dropped with :class:`celery.exceptions.Ignore`, which stores no
result under the attacker's task id. A verified call runs inside the app context (the
task base class pushes it); its return value travels back sealed the same way, and an
exception travels as a sealed pickle riding on a JSON-safe stand-in exception that
keeps the original type's name for logs and Flower. Failures Celery stores itself for
these tasks (a pool process lost, a time limit) are sealed on their way into the result
backend (:class:`flask_execute.backend.SealedFailures`), so the caller can trust every
failure it accepts.
"""

from __future__ import annotations

import logging
import os
import pickle
import typing as t

from celery.exceptions import Ignore
from celery.exceptions import Retry
from celery.worker.request import Request as CeleryRequest
from celery.worker.state import task_ready

from .chunks import run_chunk
from .context import eager_run_active
from .envelopes import reply_channel
from .envelopes import unverified_header
from .errors import RemoteError
from .errors import SerializationError
from .errors import SignatureError
from .failures import seal_failure
from .message_fields import unsigned_field_problem
from .redaction import SealedResult
from .refusals import alert
from .refusals import notice
from .refusals import NOTIFIED
from .refusals import Refused
from .running import CONTROL_FLOW
from .running import exit_error
from .running import leaving
from .running import Worker
from .serialization import dumps
from .serialization import format_exception

if t.TYPE_CHECKING:
    from celery import Task


__all__ = [
    "DISPATCH",
    "DISPATCH_LATE",
    "DISPATCH_TASKS",
    "SafeRequest",
    "dispatch_base",
    "dispatch_entry",
    "execute",
]

DISPATCH = "flask_execute.dispatch"
#: The at-least-once variant: acknowledged after the call, requeued if its worker
#: process dies (``submit(..., acks_late=True)`` or Celery's ``task_acks_late``).
DISPATCH_LATE = "flask_execute.dispatch_acks_late"
log = logging.getLogger(__name__)
#: The names of both dispatch tasks.
DISPATCH_TASKS = frozenset({DISPATCH, DISPATCH_LATE})


class SafeRequest(CeleryRequest):  # type: ignore[misc]
    """Requests of the dispatch tasks, in the worker's main process.

    ``inspect active/reserved/scheduled/query_task`` (and so Flower), the
    ``task-received`` event, the ``received`` log line and the task's own request show
    ``<module:qualname>`` as the arguments, never the envelope with the pickled
    arguments, whatever ``argsrepr`` the message carries (a retry queued by an older
    version, anyone's ``send_task``). Before a message reaches the pool, its unsigned
    fields are checked (:func:`unsigned_field_problem`): a message that carries
    request fields we never send is logged at CRITICAL, acknowledged and dropped, and
    nothing of it runs.
    """

    def info(self, safe: bool = False) -> dict[str, t.Any]:
        return t.cast(dict[str, t.Any], super().info(safe=True))

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.field_problem = unsigned_field_problem(self.message.headers or {}, self._payload[2])
        self._field_rejected = False
        # what is shown of the arguments: the label, never the message's argsrepr
        self._argsrepr = self._request_dict["argsrepr"] = f"<{self.name}>"
        self._kwargsrepr = self._request_dict["kwargsrepr"] = "{}"

    def revoked(self) -> bool:
        # Celery asks this of every request before it hands it to the pool (and skips
        # it when true): where a message with fields we never send is dropped
        if self.field_problem is None:
            return bool(super().revoked())
        if not self._field_rejected:
            self._field_rejected = True
            alert(self.id, Refused("unsigned_field", f"Unsigned fields: {self.field_problem}"))
            self.reject(requeue=False)  # acknowledged: never delivered again
            task_ready(self)
        return True


def dispatch_base(task_class: type[Task]) -> type[Task]:
    """The base class of the dispatch tasks of one app: ``task_class`` (the app's
    task class, derived from the user's ``base_task``) with a :meth:`retry` that shows
    no value."""

    class DispatchTask(task_class):  # type: ignore[misc]
        abstract = True

        def retry(
            self,
            args: t.Any = None,
            kwargs: t.Any = None,
            exc: BaseException | None = None,
            throw: bool = True,
            eta: t.Any = None,
            countdown: float | None = None,
            max_retries: int | None = None,
            **options: t.Any,
        ) -> t.Any:
            """``current_task.retry()`` of a submitted call: Celery's, publishing the
            retry with ``<module:qualname>`` as its ``argsrepr`` (Celery's default is
            the envelope, shown by ``inspect scheduled`` and the ``task-sent`` event),
            and raising ``MaxRetriesExceededError`` without the envelope Celery
            quotes in its message."""
            label = self.request.shadow or self.name
            options.setdefault("argsrepr", f"<{label}>")
            options.setdefault("kwargsrepr", "{}")
            try:
                return super().retry(
                    args, kwargs, exc, throw, eta, countdown, max_retries, **options
                )
            except self.MaxRetriesExceededError as error:
                if error is exc:
                    raise  # retry(exc=...) raises the caller's own exception
                limit = self.max_retries if max_retries is None else max_retries
                raise self.MaxRetriesExceededError(
                    f"Can't retry {label}[{self.request.id}]: max_retries ({limit}) exceeded."
                ) from None

    DispatchTask.__name__ = DispatchTask.__qualname__ = f"DispatchTask[{task_class.__name__}]"
    return DispatchTask


def dispatch_entry(task: Task, worker: Worker, args: tuple[t.Any, ...],
                   kwargs: dict[str, t.Any]) -> t.Any:  # fmt: skip
    """The body of both dispatch tasks: exactly one argument, the envelope."""
    if len(args) != 1 or kwargs:
        _reject(task, SignatureError("malformed", "A dispatch message carries one envelope."))
    # what Celery logs and announces of the result is its repr: keep the envelope out
    return SealedResult(execute(task, worker, args[0]))


def _reject(task: Task, exc: SignatureError) -> t.NoReturn:
    alert(task.request.id, Refused(exc.reason, str(exc)))
    raise Ignore()


def execute(task: Task, worker: Worker, envelope: str) -> t.Any:
    """Verify, unpickle and run one envelope; return the sealed outcome.

    Every decision (claim, replay, cancel, delivery cap) keys on the task id inside the
    verified envelope, and eager runs are told apart by our own context
    (:func:`eager_run_active`), never by request fields a broker writer could set.
    """
    eager = eager_run_active()
    header, payload = _admit(task, worker, envelope, eager)
    # Once the call finished (either way), later deliveries are duplicates, even after
    # its result expired: the result backend marks the claim done in the same atomic
    # write that stores the outcome (backend.py), so a worker killed at any instant
    # either stored an outcome or left the call to run again (at-least-once).
    return _run(task, worker, header, payload, eager)


def _admit(
    task: Task, worker: Worker, envelope: str, eager: bool
) -> tuple[dict[str, t.Any], bytes]:
    """Check the envelope and claim the task id; raise Ignore for what must not run."""
    request = task.request
    bindings: dict[str, object] = {"task": task.name}
    if not eager:  # a worker: the message's lineage is signed too
        bindings["root"] = request.root_id
    try:
        header, payload = worker.codec.open(envelope, "call", request.id, bindings)
    except SignatureError as exc:
        if exc.reason in NOTIFIED and not eager:
            _notify(task, worker, envelope, exc.reason)
        if exc.reason not in ("python_mismatch", "encryption_mismatch") or exc.header is None:
            _reject(task, exc)
        # the MAC checked out: a genuine set-up mistake, reported to the caller at once
        reply = reply_channel(exc.header)
        if reply is not None and not eager:
            worker.replies[request.id] = reply
        raise _sealed_failure(worker, request.id, SerializationError(str(exc)), "") from None
    tid: str = header["tid"]  # == request.id, now verified
    if not eager and not _parent_agrees(header.get("parent"), request, tid):
        _reject(task, SignatureError("binding_mismatch", "Envelope is not for this parent."))
    label = header.get("fn", "?")
    if not eager:
        reply = reply_channel(header)
        claim = worker.claims.claim(
            tid,
            request.retries or 0,
            late=task.name == DISPATCH_LATE,
            started=request,
            reply=reply,
        )
        if reply is not None and claim != "duplicate":
            worker.replies[tid] = reply  # until its final state is stored
        if claim == "cancelled":
            log.info("flask-execute: task %s [%s] was cancelled before it started", label, tid)
            task.backend.mark_as_revoked(tid, "cancelled", request=request)
            raise Ignore()
        if claim == "duplicate":
            # the "redelivered" flag is unsigned: it only chooses how loudly a copy of a
            # finished at-least-once call is dropped, never whether it runs
            if task.name == DISPATCH_LATE and (request.delivery_info or {}).get("redelivered"):
                # at-least-once: the broker gave back a message whose task finished
                log.info("flask-execute: task %s [%s] already finished; redelivery dropped",
                         label, tid)  # fmt: skip
                raise Ignore()
            # signed, but this delivery of it already ran (or runs): a replay
            _reject(task, SignatureError("replayed", "This task id already ran."))
        if claim == "poison":
            cap = worker.max_deliveries
            poison = RemoteError(
                "flask_execute.PoisonMessage",
                f"{label} was delivered {cap} times without finishing (its worker process"
                " died each time); it is not retried again (CELERY_MAX_DELIVERIES).",
            )
            log.error("flask-execute: task %s [%s] gave up after %d deliveries", label, tid, cap)
            task.backend.mark_as_failure(
                tid, _sealed_failure(worker, tid, poison, ""), request=request
            )
            raise Ignore()
        if claim != "started":  # not stored with the claim (retries, redeliveries)
            task.update_state(
                tid,
                state="STARTED",
                meta={
                    "pid": os.getpid(),
                    "hostname": request.hostname,
                    "retries": request.retries or 0,
                },
            )
    return header, payload


def _notify(task: Task, worker: Worker, envelope: str, reason: str) -> None:
    """Tell the caller of a call refused for ``reason`` (a set-up mistake it can fix)
    on the reply channel its envelope names: an unsigned notice, which the caller
    believes only as far as that is harmless (:mod:`flask_execute.refusals`)."""
    header = unverified_header(envelope)
    reply = reply_channel(header) if header is not None else None
    tid = task.request.id
    client = getattr(task.backend, "client", None)
    if reply is None or header is None or header.get("tid") != tid or client is None:
        return
    try:
        client.publish(reply, notice(tid, reason, worker.codec.kid))
    except Exception as exc:  # the refusal is logged anyway; the caller times out
        log.warning("flask-execute: could not tell the caller of task %s: %r", tid, exc)


def _parent_agrees(signed: object, request: t.Any, tid: str) -> bool:
    """The message's ``parent_id`` is the signed one; or, for a retry of a call that had
    no parent, the call itself (Celery's ``send_task`` gives a retry published from
    inside the running task that task as parent, whatever the original said)."""
    parent = request.parent_id
    return parent == signed or (signed is None and bool(request.retries) and parent == tid)


def _run(
    task: Task, worker: Worker, header: dict[str, t.Any], payload: bytes, eager: bool
) -> t.Any:
    """Unpickle the verified call, run it, seal what it returned or raised."""
    tid: str = header["tid"]
    label = header.get("fn", "?")
    try:
        call = pickle.loads(payload)
    except Exception as exc:
        error = SerializationError(
            f"The call to {label} cannot be unpickled on worker: {type(exc).__name__}: {exc}."
            " A function sent by reference must be importable on the worker (same code"
            " and sys.path as the web process)."
        )
        raise _sealed_failure(worker, tid, error, format_exception(exc)) from None
    if header.get("k") == "chunk":
        func, calls = call
        return run_chunk(task, worker, header, func, calls, eager, task.name == DISPATCH_LATE)
    func, args, kwargs = call
    try:
        value = func(*args, **kwargs)
    except Retry:
        # the next delivery of this task id is a legitimate retry: let it claim
        if not eager:
            worker.claims.allow_retry(tid, (task.request.retries or 0) + 1)
        raise
    except CONTROL_FLOW:
        raise
    except Exception as exc:
        raise _sealed_failure(worker, tid, exc, format_exception(exc)).with_traceback(
            exc.__traceback__
        ) from None
    except BaseException as exc:
        if leaving():
            # the SystemExit of billiard's SIGTERM handler (cancel(terminate=True), a
            # cold shutdown): this process is on its way out, the task did not finish
            raise
        # raised by the task's own code (SystemExit, KeyboardInterrupt, GeneratorExit,
        # asyncio.CancelledError, ...): reported, never re-raised; the worker lives on
        raise _sealed_failure(worker, tid, exit_error(exc), format_exception(exc)) from None
    try:
        data, by_value = dumps(value)
    except Exception as exc:
        error = SerializationError(
            f"The return value of {label} ({type(value).__name__}) cannot be serialized:"
            f" {type(exc).__name__}: {exc}. Return something picklable."
        )
        raise _sealed_failure(worker, tid, error, format_exception(exc)) from None
    return worker.codec.seal("result", tid, data, by_value=by_value)


def _sealed_failure(worker: Worker, tid: str, exc: BaseException, tb_text: str) -> Exception:
    return seal_failure(worker.codec, tid, exc, tb_text)

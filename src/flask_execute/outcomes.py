"""What a state stored for one of our tasks means for the futures waiting on it: a
progress step, a value, or an exception, decided without trusting the result backend.

Whoever can write to the result backend can store, and publish, any bytes under any
task's result key. So every reading here is total: whatever was stored ends as the
outcome of that one task, never as an exception in the result watcher.

- :func:`read_state` parses the raw bytes. Anything that is not Celery's JSON, a JSON
  object and a string ``status`` is *unreadable*: that task fails with
  :class:`SignatureError` naming it.
- Only a ``result`` envelope sealed for the task id gives a value.
- Only an ``error`` envelope sealed for the task id gives the task's own exception
  type. A failure without one (Celery's plain format, which anyone can write) raises
  :class:`RemoteError`, with the type it claims as text. Our workers seal every
  failure they store for the dispatch tasks, Celery's own ones included
  (:class:`flask_execute.backend.SealedFailures`).
- A :class:`BaseException` that is not an :class:`Exception` (``SystemExit``,
  ``KeyboardInterrupt``, ``GeneratorExit``, ``asyncio.CancelledError``, ...) never
  unwinds the caller, signed or not: it arrives as :class:`RemoteError`
  (:func:`contained`).
"""

from __future__ import annotations

import pickle
import re
import reprlib
import typing as t
from collections.abc import Mapping

from celery import states
from kombu.utils.json import loads as _kombu_loads

from .envelopes import Codec
from .errors import RemoteError
from .errors import RemoteTraceback
from .errors import ResultExpired
from .errors import SignatureError
from .futures import Chunk
from .futures import Future
from .futures import READY
from .refusals import NOTICE
from .refusals import refusal_message

__all__ = [
    "EXPIRED",
    "STREAMED",
    "UNREADABLE",
    "Outcome",
    "Outcomes",
    "contained",
    "read_replies",
    "read_state",
    "unreadable",
]

Handler: t.TypeAlias = Future[t.Any] | Chunk

#: The result of a chunk whose members' outcomes were stored one by one.
STREAMED = "streamed"
#: The key of a meta that stands for an unreadable state; its value says why.
UNREADABLE = "flask_execute_unreadable"
#: The meta standing for a call that finished (its claim says so) whose result the
#: backend no longer holds. Recognised by identity: no stored state can be it.
EXPIRED: dict[str, t.Any] = {"status": "FAILURE"}

_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}  # fmt: skip
_TYPE_NAME = re.compile(r"[A-Za-z_][\w.<>]{0,199}")
_short = reprlib.Repr()
_short.maxlevel = 3
_short.maxstring = 200
_short.maxother = 200


def unreadable(why: str) -> dict[str, t.Any]:
    """The meta standing for a stored state that is not Celery's (``why`` says how)."""
    return {"status": states.FAILURE, UNREADABLE: why}


def read_state(data: object) -> dict[str, t.Any]:
    """Parse a state as Celery's Redis backend stores and publishes it.

    Never raises: JSON that cannot be read (not UTF-8, nested too deeply, a number
    with too many digits, a typed value kombu cannot rebuild, ...), anything but an
    object, or an object without a string ``status`` gives :func:`unreadable`.
    """
    try:
        meta = _kombu_loads(data)  # type: ignore[no-untyped-call]
    except Exception as exc:  # RecursionError, ValueError, decimal.InvalidOperation, ...
        return unreadable(f"not Celery's JSON: {type(exc).__name__}")
    if not isinstance(meta, dict):
        return unreadable(f"{_JSON_KINDS.get(type(meta), 'a value')}, not an object")
    if not isinstance(meta.get("status"), str):
        return unreadable("no status string")
    return meta


def read_replies(data: object) -> list[dict[str, t.Any]]:
    """The states in one message of a reply channel: one state, or several (a JSON
    array: a chunk's members). Never raises; what cannot be read is left out (a reply
    names its task inside the state: without a readable one it concerns nobody)."""
    try:
        value = _kombu_loads(data)  # type: ignore[no-untyped-call]
    except Exception:
        return []
    items = value if isinstance(value, list) else [value]
    return [
        item
        for item in items
        if isinstance(item, dict)
        and isinstance(item.get("status"), str)
        and isinstance(item.get("task_id"), str)
    ]


def contained(exc: BaseException, tb_text: str = "", note: str = "") -> BaseException:
    """``exc`` itself when it is an :class:`Exception`; otherwise a :class:`RemoteError`
    naming it, so that a task's ``SystemExit``, ``KeyboardInterrupt``,
    ``GeneratorExit`` or ``asyncio.CancelledError`` never unwinds the process that
    receives it. ``note`` is appended to the message."""
    if isinstance(exc, Exception):
        return exc
    return RemoteError(_type_name(type(exc)), f"the task raised {_short.repr(exc)}{note}", tb_text)


class Outcome(t.NamedTuple):
    """One task's outcome: its Celery ``status``; for ``SUCCESS`` the ``value``, for a
    state that is not final its info (the progress meta), for ``FAILURE`` the
    ``exc``. For a ``map`` chunk's ``SUCCESS``, ``value`` is one outcome per call."""

    status: str
    value: object = None
    exc: BaseException | None = None


class Outcomes:
    """Reads the states stored for the tasks of one app, verifying with its ``codec``."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def read(self, task_id: str, meta: Mapping[str, t.Any]) -> Outcome:
        """The outcome of task ``task_id``. Never raises: a state that does not make
        sense fails this task only."""
        try:
            return self._read(task_id, meta)
        except Exception as exc:
            error = SignatureError(
                "malformed",
                f"The state stored for task {task_id} makes no sense"
                f" ({type(exc).__name__}); it was refused.",
            )
            return Outcome(states.FAILURE, exc=error)

    def deliver(self, task_id: str, meta: Mapping[str, t.Any], handler: Handler) -> None:
        """Move ``handler`` (a future, or a ``map`` chunk) to the state ``meta`` stands
        for."""
        if NOTICE in meta:  # a worker refused the call: see refusals.py
            members = handler.members if isinstance(handler, Chunk) else [handler]
            for member in members:
                label = f"{member.name or 'the call'}[{member.id}]"
                text = refusal_message(label, meta[NOTICE], self.codec.kid, meta.get("worker_kid"))
                if text is not None:
                    member.refuse(SignatureError(t.cast(str, meta[NOTICE]), text))
            return
        if isinstance(handler, Chunk):
            self._deliver_chunk(task_id, meta, handler.members)
            return
        handler.record(meta)
        outcome = self.read(task_id, meta)
        if outcome.status not in READY:
            handler.set_progress(outcome.status, outcome.value)
        else:
            handler.settle(outcome.status, outcome.value, exc=outcome.exc)

    def _deliver_chunk(
        self, task_id: str, meta: Mapping[str, t.Any], members: list[Future[t.Any]]
    ) -> None:
        """A state of a chunk's message. On a worker each member's own state travels
        under the member's task id; the message's states matter only when it ends
        without them (it failed before or between its calls, or was revoked): then
        every member still pending ends the same way. An eager chunk's result holds
        every member's outcome."""
        outcome = self.read(task_id, meta)
        if outcome.status not in READY:
            return
        if outcome.status == states.SUCCESS:
            if outcome.value == STREAMED:
                return
            try:
                calls = [
                    _call_outcome(task_id, item) for item in _exactly(outcome.value, len(members))
                ]
            except Exception as exc:
                outcome = Outcome(states.FAILURE, exc=_refused_shape(task_id, exc))
            else:
                for member, call in zip(members, calls, strict=True):
                    member.settle(call.status, call.value, exc=call.exc)
                return
        for member in members:
            member.settle(outcome.status, exc=outcome.exc)

    def value(self, task_id: str, envelope: object) -> t.Any:
        """Verify and unpickle the result envelope of task ``task_id``.

        :raises SignatureError: naming the task; the result was not sealed by a worker
            holding our key for this task id (nothing was unpickled).
        """
        try:
            _, payload = self.codec.open(envelope, "result", task_id)
        except SignatureError as exc:
            raise _refused("result", task_id, exc) from None
        return pickle.loads(payload)

    def failure(self, task_id: str, meta: Mapping[str, t.Any]) -> BaseException:
        """The exception a ``FAILURE`` state of task ``task_id`` stands for."""
        result = meta.get("result")
        tb_text = meta.get("traceback")
        tb_text = tb_text if isinstance(tb_text, str) else ""
        envelope = _error_envelope(result)
        if envelope is None:
            return _unsigned(task_id, result, tb_text)
        try:
            _, payload = self.codec.open(envelope, "error", task_id)
        except SignatureError as exc:
            return _refused("failure", task_id, exc)
        try:
            signed, remote_tb = pickle.loads(payload)
        except Exception as exc:  # signed, but of a type this process cannot load
            return exc
        return _received(signed, remote_tb if isinstance(remote_tb, str) and remote_tb else tb_text)

    def _read(self, task_id: str, meta: Mapping[str, t.Any]) -> Outcome:
        status = meta.get("status")
        if not isinstance(status, str) or meta.get(UNREADABLE):
            why = meta.get(UNREADABLE) or "no status string"
            error = SignatureError(
                "malformed",
                f"The state stored for task {task_id} is unreadable ({why}): forged? Nothing"
                " in it was deserialized.",
            )
            return Outcome(states.FAILURE, exc=error)
        if status not in states.READY_STATES:
            return Outcome(status, meta.get("result"))
        if meta is EXPIRED:
            return Outcome(states.FAILURE, exc=ResultExpired(task_id))
        if status == states.FAILURE:
            return Outcome(status, exc=self.failure(task_id, meta))
        if status != states.SUCCESS:
            return Outcome(states.REVOKED)
        try:
            value = self.value(task_id, meta.get("result"))
        except Exception as exc:  # refused, or a signed value this process cannot load
            return Outcome(states.FAILURE, exc=exc)
        return Outcome(status, value)


def _call_outcome(task_id: str, item: object) -> Outcome:
    """One call of a chunk: ``(True, value)`` or ``(False, (exception, traceback))``."""
    ok, value = t.cast(tuple[bool, t.Any], item)
    if ok:
        return Outcome(states.SUCCESS, value)
    exc, tb_text = value
    return Outcome(states.FAILURE, exc=_received(exc, tb_text if isinstance(tb_text, str) else ""))


def _refused_shape(task_id: str, exc: Exception) -> SignatureError:
    return SignatureError(
        "malformed",
        f"The state stored for task {task_id} makes no sense ({type(exc).__name__});"
        " it was refused.",
    )


def _exactly(value: object, calls: int) -> list[object]:
    if not isinstance(value, list) or len(value) != calls:
        raise ValueError(f"expected the outcomes of {calls} calls")
    return value


def _received(exc: object, tb_text: str) -> BaseException:
    """A signed exception, as the caller gets it: never a bare BaseException."""
    if not isinstance(exc, BaseException):
        raise TypeError(f"a signed failure holds a {type(exc).__name__}, not an exception")
    exc = contained(exc, tb_text)
    if tb_text and exc.__cause__ is None:
        exc.__cause__ = RemoteTraceback(tb_text)
    return exc


def _error_envelope(result: object) -> object | None:
    """The error envelope a failure carries in its arguments (see
    :func:`flask_execute.failures.make_carrier`), or None."""
    if isinstance(result, BaseException):
        args: object = result.args
    elif isinstance(result, Mapping):
        args = result.get("exc_message")
    else:
        return None
    if isinstance(args, (list, tuple)):
        for arg in args:
            if isinstance(arg, Mapping) and "flask_execute" in arg:
                return t.cast(object, arg["flask_execute"])
    return None


def _unsigned(task_id: str, result: object, tb_text: str) -> RemoteError:
    """A failure in Celery's plain format: what it claims, as text only."""
    claimed: object = None
    message: object = result
    if isinstance(result, BaseException):  # rebuilt by a polling backend
        claimed, message = _type_name(type(result)), result.args
    elif isinstance(result, Mapping):
        module, name = result.get("exc_module"), result.get("exc_type")
        qualified = isinstance(module, str) and module and isinstance(name, str)
        claimed = f"{module}.{name}" if qualified else name
        message = result.get("exc_message")
    if not isinstance(claimed, str) or not _TYPE_NAME.fullmatch(claimed):
        claimed = "unknown" if claimed is None else _short.repr(claimed)
    error = RemoteError(
        claimed,
        f"unsigned failure stored for task {task_id}; not raised as its claimed type"
        f" (forged, or not stored by a flask-execute worker): {_short.repr(message)}",
        tb_text,
    )
    if tb_text:
        error.__cause__ = RemoteTraceback(tb_text)
    return error


def _refused(what: str, task_id: str, exc: SignatureError) -> SignatureError:
    return SignatureError(
        exc.reason,
        f"The {what} stored for task {task_id} was refused ({exc.reason}): {exc}"
        " Nothing in it was unpickled.",
    )


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"

"""What logs, ``inspect`` replies and task events may show of a submitted call: its
``module:qualname`` label and its task id, never its envelope.

An envelope's payload is a base64 pickle, readable by anyone who sees it: the
arguments of a call, or its return value. Celery shows a task's arguments and result
in several places it does not let us configure; each is closed here or at its source:

* the result: the dispatch tasks return a :class:`SealedResult`, whose ``repr`` (what
  Celery logs in ``succeeded in 0.01s: ...`` and sends in the ``task-succeeded`` event
  that Flower shows) names no value, while the result backend still stores the
  envelope itself;
* the arguments: the worker's request shows ``<label>`` (``dispatch.SafeRequest``),
  and a retry is published with the same ``argsrepr`` (``dispatch.DispatchTask``);
* everything else that Celery logs from a message (the pool's DEBUG line quoting the
  raw message, the ``extra={"data": ...}`` of its task log lines, the body dumps of
  invalid messages): :class:`RedactingFilter` replaces any envelope by ``<sealed>``.
"""

from __future__ import annotations

import logging
import re
import threading
import typing as t

__all__ = [
    "CONTENT_LOGGERS",
    "SEALED",
    "RedactingFilter",
    "SealedResult",
    "install",
    "redact",
    "unwrap",
]

#: An envelope, or the start of one cut by a truncated repr: a version tag, then the
#: base64url of a JSON header (``{"`` encodes as ``eyJ``), then more base64url parts.
#: Host names like ``fe1.example.com`` do not match.
_ENVELOPE = re.compile(r"\bfe\d+\.eyJ[A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*")
SEALED = "<sealed>"

#: Celery's loggers that write message content: results and arguments (trace),
#: received lines (strategy), the raw message at DEBUG (pool), request errors, and
#: body dumps of messages it cannot handle (consumer). The filter sits on the loggers
#: themselves, so it applies before any handler (Sentry's included) sees a record.
CONTENT_LOGGERS = (
    "celery.app.trace",
    "celery.pool",
    "celery.worker.strategy",
    "celery.worker.request",
    "celery.worker.consumer.consumer",
)


def redact(text: str) -> str:
    """``text`` with every envelope (or envelope prefix) replaced by ``<sealed>``."""
    if ".eyJ" not in text:  # no envelope: no regex scan (most log records)
        return text
    return _ENVELOPE.sub(SEALED, text)


class SealedResult:
    """The return value of a dispatch task: the sealed envelope of the outcome.

    Celery logs and announces ``repr(result)``; that is ``<sealed result>``. The result
    backend stores the envelope itself: kombu's JSON encoder calls :meth:`__json__`,
    pickle (the pool's pipes, pickling result backends) stores a plain ``str``.
    """

    __slots__ = ("envelope",)

    def __init__(self, envelope: str) -> None:
        self.envelope = envelope

    def __repr__(self) -> str:
        return "<sealed result>"

    __str__ = __repr__

    def __json__(self) -> str:
        return self.envelope

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        return str, (self.envelope,)


def unwrap(value: object) -> object:
    """The envelope inside a :class:`SealedResult`; anything else unchanged."""
    return value.envelope if isinstance(value, SealedResult) else value


class RedactingFilter(logging.Filter):
    """Replaces envelopes in a record's message, its arguments (Celery passes its
    whole context, the unformatted ones included), Celery's ``extra={"data": {...}}``
    and its traceback; records without one pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict):
            record.args = _redact_values(record.args)
        elif isinstance(record.args, tuple) and any(
            isinstance(a, str) and redact(a) != a for a in record.args
        ):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            record.data = _redact_values(data)
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the handler's business, not ours
            return True
        clean = redact(message)
        if clean != message:  # an envelope in a non-string argument's repr
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            if redact(text) != text:
                # formatters use a record's exc_text as is once it is set
                record.exc_text = redact(text)
        return True


def _redact_values(mapping: dict[t.Any, t.Any]) -> dict[t.Any, t.Any]:
    if not any(isinstance(v, str) and redact(v) != v for v in mapping.values()):
        return mapping
    return {k: redact(v) if isinstance(v, str) else v for k, v in mapping.items()}


_FILTER = RedactingFilter()
_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Redact envelopes from Celery's content loggers in this process, and from every
    handler Celery sets up in a worker or beat (so no line of their log files carries
    one). Idempotent; called for every app, in every process."""
    global _installed
    from celery import signals

    with _install_lock:
        if _installed:
            return
        for name in CONTENT_LOGGERS:
            logging.getLogger(name).addFilter(_FILTER)
        signals.after_setup_logger.connect(_filter_handlers, weak=False)
        signals.after_setup_task_logger.connect(_filter_handlers, weak=False)
        _installed = True


def _filter_handlers(logger: logging.Logger | None = None, **_: t.Any) -> None:
    for handler in getattr(logger, "handlers", ()):
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)

"""What a worker lets in: every task message is checked before Celery acts on it.

Celery's worker trusts the shape of what it consumes. A task message whose body is not
``[args, kwargs, embed]``, whose ``timelimit`` header is a string or whose
``stamped_headers`` is a number raises inside the consumer's event loop and stops the
worker's main process for good ("Unrecoverable error"); the message is restored to the
queue and stops the next worker too. A missing ``id`` makes the consumer restart in a
loop. So :class:`Consumer`, installed as Celery's ``worker_consumer``, checks every
task message, of our dispatch tasks and of any other task, against Celery's message
protocol 2 (:func:`admit`) before Celery's strategy and ``Request`` see it. What does
not pass is acknowledged without being requeued (gone, never redelivered) and logged
once at CRITICAL on ``flask_execute.security``; the worker goes on serving.

Compression: an app that did not configure Celery's ``task_compression`` never sends a
compressed message, so a compressed message is refused; an app that did gets that one
method inflated, never beyond ``CELERY_MAX_MESSAGE_SIZE`` bytes. (The transports of
:mod:`flask_execute.transports` set the ``compression`` header aside so that kombu
never inflates anything itself, and drop queue items kombu could not even parse.)

:func:`install` wires both into one Celery app.
"""

from __future__ import annotations

import bz2
import dataclasses
import logging
import lzma
import math
import typing as t
import zlib
from collections.abc import Callable

from celery import signals
from celery.app.task import Context
from celery.utils.time import maybe_iso8601
from celery.utils.time import maybe_make_aware
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.gossip import Gossip as CeleryGossip
from kombu.compression import get_encoder
from kombu.utils.imports import symbol_by_name

from .errors import ConfigurationError
from .refusals import alert
from .refusals import failure
from .refusals import kind
from .refusals import Refused
from .refusals import shown
from .transports import AMQP
from .transports import COMPRESSION

__all__ = ["Consumer", "Policy", "admit", "install"]

log = logging.getLogger(__name__)

_CONSUMER = f"{__name__}:Consumer"
_INFLATERS: dict[str, Callable[[], t.Any]] = {
    "application/x-gzip": zlib.decompressobj,
    "application/x-bz2": bz2.BZ2Decompressor,
    "application/x-lzma": lzma.LZMADecompressor,
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """What one app's workers accept beyond the protocol: the size a compressed
    message may inflate to, and the one compression method the app sends."""

    max_size: int = 64 * 1024 * 1024
    compression: str | None = None  # a kombu content type, e.g. "application/x-gzip"


def install(controller: t.Any, max_size: int) -> None:
    """Guard the workers of the Celery app ``controller`` (call once, after its
    configuration is complete).

    :raises ConfigurationError: ``worker_consumer`` names a consumer that is not ours,
        ``task_compression`` is a method we cannot inflate with a bound, or
        ``task_protocol`` is not 2.
    """
    conf = controller.conf
    if conf.task_protocol != 2:
        raise ConfigurationError(
            f"'CELERY_TASK_PROTOCOL' is {conf.task_protocol!r}: flask-execute workers accept"
            " Celery's message protocol 2 only (Celery's default); remove the setting."
        )
    if conf.worker_consumer == "celery.worker.consumer:Consumer":
        conf.worker_consumer = _CONSUMER
    consumer = conf.worker_consumer
    if isinstance(consumer, str):  # what Celery does with it when a worker starts
        consumer = symbol_by_name(consumer)  # type: ignore[no-untyped-call]
    if not (isinstance(consumer, type) and issubclass(consumer, Consumer)):
        raise ConfigurationError(
            f"'CELERY_WORKER_CONSUMER' is {conf.worker_consumer!r}: flask-execute workers"
            f" check every message in their own consumer; derive yours from {_CONSUMER}."
        )
    compression = None
    if conf.task_compression:
        compression = _content_type(conf.task_compression)
        if compression not in _INFLATERS:
            raise ConfigurationError(
                f"'CELERY_TASK_COMPRESSION' is {conf.task_compression!r}: workers inflate"
                " messages with a bound (CELERY_MAX_MESSAGE_SIZE) and can do so for 'gzip',"
                " 'bzip2' and 'xz' only; choose one of them."
            )
    # every broker connection of this app is made by our Connection (see its docstring)
    controller.amqp_cls = AMQP
    controller.flask_execute_admission = Policy(max_size, compression)


def _content_type(method: str) -> str | None:
    try:
        return t.cast(str, get_encoder(method)[1])  # type: ignore[no-untyped-call]
    except (KeyError, TypeError):
        return None


# --- the task consumer ----------------------------------------------------------------------
def admit(message: t.Any, policy: Policy) -> None:
    """Check one task message (a kombu ``Message``) against Celery's protocol 2 and the
    app's policy; inflate its body if it is compressed and allowed to be.

    :raises Refused: the message must be dropped unexecuted.
    """
    headers = message.headers
    if not isinstance(headers, dict):
        raise Refused("malformed", f"Its headers are {kind(headers)}, not a mapping.")
    if COMPRESSION in headers:
        method = headers[COMPRESSION]
        message.headers = headers = {k: v for k, v in headers.items() if k != COMPRESSION}
        message.body = _inflate(message.body, method, policy)
    for name in ("id", "task"):
        if not isinstance(headers.get(name), str) or not headers[name]:
            raise Refused("malformed", f"Its {name!r} header is missing or not a string.")
        if not headers[name].isprintable() or len(headers[name]) > 255:
            # Celery writes both into its own log lines ("Task x[id] received"): a
            # newline there would forge lines of the attacker's choosing
            raise Refused(
                "malformed",
                f"Its {name!r} header holds control characters or is over 255 characters.",
            )
    for name in headers:
        if not isinstance(name, str) or name.startswith("_") or name in _REQUEST_METHODS:
            raise Refused(
                "malformed",
                f"It has a header named {shown(name)!r}, which would replace a method of"
                " Celery's task request.",
            )
    for name, (valid, expected) in _HEADERS.items():
        if name in headers and not valid(headers[name]):
            raise Refused(
                "malformed",
                f"Its {name!r} header must be {expected}; got {kind(headers[name])}.",
            )
    properties = message.properties
    for name in ("correlation_id", "reply_to"):
        if not _optional_text(properties.get(name)):
            raise Refused("malformed", f"Its {name!r} property must be a string.")
    if not isinstance(message.delivery_info, dict):
        raise Refused("malformed", "Its delivery info is not a mapping.")
    try:
        body = message.decode()
    except Exception as exc:  # kombu's ContentDisallowed, DecodeError, a codec's own error
        raise Refused("malformed", f"Its body cannot be decoded: {failure(exc)}.") from None
    _check_body(body)


def _check_body(body: object) -> None:
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        raise Refused(
            "malformed",
            f"Its body must be [args, kwargs, embed] (Celery's message protocol 2);"
            f" got {kind(body)}.",
        )
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)):
        raise Refused("malformed", f"Its args must be a list; got {kind(args)}.")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise Refused("malformed", "Its kwargs must be a mapping with string keys.")
    if embed is None:
        return
    if not isinstance(embed, dict):
        raise Refused("malformed", f"Its embed must be a mapping; got {kind(embed)}.")
    for name, value in embed.items():
        if name not in _EMBED:
            raise Refused("malformed", f"Its embed has {shown(name)!r}, not a Celery field.")
        if value is not None and not _EMBED[name](value):
            raise Refused("malformed", f"Its embed's {name!r} is {kind(value)}.")


def _inflate(body: object, method: object, policy: Policy) -> bytes:
    """Inflate ``body``, never to more than ``policy.max_size`` bytes."""
    content_type = _content_type(method) if isinstance(method, str) else None
    if policy.compression is None:
        raise Refused(
            "compressed",
            "It is compressed, but this app does not compress its messages"
            " (CELERY_TASK_COMPRESSION is not set).",
        )
    if content_type != policy.compression:
        named = repr(shown(method)) if isinstance(method, str) else kind(method)
        raise Refused(
            "compressed",
            f"It is compressed with {named}; this app compresses with"
            f" {policy.compression!r} only (CELERY_TASK_COMPRESSION).",
        )
    data = body.encode() if isinstance(body, str) else body
    if not isinstance(data, bytes):
        raise Refused("malformed", f"Its compressed body is {kind(body)}.")
    inflater = _INFLATERS[content_type]()
    try:
        plain = inflater.decompress(data, policy.max_size + 1)
    except Exception as exc:  # zlib.error, OSError, lzma.LZMAError
        raise Refused("malformed", f"Its body does not inflate: {failure(exc)}.") from None
    if len(plain) > policy.max_size:
        raise Refused(
            "too_large",
            f"It inflates to more than the CELERY_MAX_MESSAGE_SIZE limit of"
            f" {policy.max_size} bytes; it was not inflated further.",
        )
    if not inflater.eof:
        raise Refused("malformed", "Its compressed body is truncated.")
    return t.cast(bytes, plain)


class Gossip(CeleryGossip):  # type: ignore[misc]
    """Celery's gossip step (events of the other workers, a fanout anyone can publish
    to), dropping an event it cannot read instead of dying on it."""

    name = CeleryGossip.name  # its place in the consumer's blueprint

    def on_message(self, prepare: t.Any, message: t.Any) -> t.Any:
        try:
            return super().on_message(prepare, message)
        except Exception as exc:
            refused = Refused("malformed", f"Celery failed on it: {failure(exc)}.")
            alert(None, refused, subject="a worker event")
            return None


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's worker consumer with :func:`admit` in front of every task message."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]
        default_steps: t.ClassVar[list[str]] = [
            f"{__name__}:Gossip" if step == "celery.worker.consumer.gossip:Gossip" else step
            for step in CeleryConsumer.Blueprint.default_steps
        ]

    def create_task_handler(self, *args: t.Any, **kwargs: t.Any) -> Callable[[t.Any], t.Any]:
        handle = super().create_task_handler(*args, **kwargs)
        policy = getattr(self.app, "flask_execute_admission", None) or Policy()

        def on_task_received(message: t.Any) -> t.Any:
            try:
                admit(message, policy)
            except Refused as refused:
                return self._drop(message, refused)
            try:
                return handle(message)
            except Exception as exc:
                # A safety net for what admit() did not foresee (a newer Celery?): drop
                # the message rather than die. kombu counts KeyError among Redis's
                # connection errors; raised here, it is the message's.
                broker_errors = self.connection_errors + self.channel_errors
                if isinstance(exc, broker_errors) and not isinstance(exc, LookupError):
                    raise
                return self._drop(
                    message,
                    Refused("unhandled", f"Celery failed on it: {failure(exc)}."),
                )

        return on_task_received

    def on_decode_error(self, message: t.Any, exc: Exception) -> None:
        """Celery's handler of a message kombu cannot decode (a task, a control
        command): one CRITICAL line without the body (Celery's dumps it, and fails on
        a message without one), and the message is acknowledged."""
        headers = getattr(message, "headers", None)
        headers = headers if isinstance(headers, dict) else {}
        detail = f"Can't decode message body: {type(exc).__name__}({shown(str(exc))!r})."
        subject = None if "task" in headers else "a message"
        alert(headers.get("id"), Refused("malformed", detail), subject)
        if not message.acknowledged:
            message.ack()

    def _drop(self, message: t.Any, refused: Refused) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        alert(headers.get("id") or message.properties.get("correlation_id"), refused)
        if not message.acknowledged:
            message.reject_log_error(log, self.connection_errors)  # not requeued
        signals.task_rejected.send(sender=self, message=message, exc=refused)


def _optional_text(value: object) -> bool:
    return value is None or isinstance(value, str)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value) and value >= 0


def _moment(value: object) -> bool:
    """What Celery's ``Request`` parses as an ETA or expiry without raising."""
    if value is None:
        return True
    try:
        maybe_make_aware(maybe_iso8601(value)).timestamp()
    except Exception:
        return False
    return True


def _names(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _signatures(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, dict) for v in value)


#: Celery's protocol-2 headers: header -> (valid value?, what is expected). Others
#: (custom headers given to ``apply_async``) pass.
_HEADERS: dict[str, tuple[Callable[[object], bool], str]] = {
    **dict.fromkeys(
        ["lang", "shadow", "root_id", "parent_id", "group", "argsrepr", "kwargsrepr", "origin"],
        (_optional_text, "a string or null"),
    ),
    **dict.fromkeys(["eta", "expires"], (_moment, "an ISO 8601 time or null")),
    "retries": (_count, "an integer >= 0"),
    **dict.fromkeys(
        ["group_index", "replaced_task_nesting"],
        (lambda v: v is None or _count(v), "an integer >= 0 or null"),
    ),
    "timelimit": (
        lambda v: (
            v is None or (isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_seconds, v)))
        ),
        "[hard, soft] seconds (numbers >= 0 or nulls) or null",
    ),
    **dict.fromkeys(
        ["ignore_result", "redelivered"], (lambda v: v is None or isinstance(v, bool), "a boolean")
    ),
    "stamped_headers": (lambda v: v is None or _names(v), "a list of strings or null"),
    "stamps": (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
}
#: Celery makes every header an attribute of the task request (``task.request``).
_REQUEST_METHODS = frozenset(
    name for name, value in vars(Context).items() if callable(value) or isinstance(value, property)
)
_EMBED: dict[str, Callable[[object], bool]] = {
    "callbacks": _signatures,
    "errbacks": _signatures,
    "chain": _signatures,
    "chord": lambda v: isinstance(v, dict),
}

"""One outage, one message: every error of an unreachable broker or result backend
that would reach a caller becomes :class:`~flask_execute.errors.BrokerUnavailable`,
naming the server that is down and the key that configures it.

Raw errors come from several layers (kombu's ``OperationalError``, redis-py's
``ConnectionError``, py-amqp's, the socket's ``OSError``); a caller should not have
to know which. When the result backend is the broker's server (the default: the
backend follows a Redis broker), the message names the broker and
``CELERY_BROKER_URL``, not a ``CELERY_RESULT_BACKEND`` the user never set.

A connection kept in a pool from before a server restart fails on its first use
although the server is back: :meth:`Endpoints.call` tries once more on a fresh
connection (the failed one is dropped by the client library).
"""

from __future__ import annotations

import dataclasses
import typing as t
from collections.abc import Callable

import amqp.exceptions
import redis.exceptions
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from .errors import BrokerUnavailable

__all__ = ["CONNECTION_ERRORS", "Endpoints", "reason", "safe_url"]

R = t.TypeVar("R")
Role = t.Literal["broker", "backend"]

#: What an unreachable (or restarted) broker or result backend raises.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    OSError,  # ConnectionError, TimeoutError, socket errors
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    amqp.exceptions.ConnectionError,
)


def safe_url(url: str) -> str:
    """A broker or backend URL without its password, for messages."""
    return str(maybe_sanitize_url(url))


def reason(exc: BaseException) -> str:
    """What the deepest connection error under ``exc`` says, without a final period
    (the message adds its own)."""
    deepest: BaseException = exc
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CONNECTION_ERRORS) and str(current).strip():
            deepest = current
        current = current.__cause__ or current.__context__
    text = str(deepest).strip().rstrip(".").strip() or type(deepest).__name__
    return text


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """The broker and result backend of one app, as the caller names them."""

    broker_url: str
    backend_url: str
    #: whether ``CELERY_RESULT_BACKEND`` was configured (else it follows the broker)
    backend_configured: bool = False

    def describe(self, role: Role) -> str:
        """``the Celery broker at redis://host:6379/0 (CELERY_BROKER_URL)``, or the
        result backend with its own key when it is a server of its own."""
        if role == "backend" and self.backend_configured and self.backend_url != self.broker_url:
            return f"the result backend at {safe_url(self.backend_url)} (CELERY_RESULT_BACKEND)"
        return f"the Celery broker at {safe_url(self.broker_url)} (CELERY_BROKER_URL)"

    def unavailable(self, role: Role, exc: BaseException) -> BrokerUnavailable:
        """The one error a caller sees for ``exc``."""
        return BrokerUnavailable(
            f"Cannot reach {self.describe(role)}: {reason(exc)}. Is it running?"
        )

    def call(self, role: Role, action: Callable[[], R], retry: bool = True) -> R:
        """``action()``, its connection errors raised as :class:`BrokerUnavailable`;
        with ``retry``, a first failure (a stale pooled connection) is tried once more."""
        try:
            return action()
        except BrokerUnavailable:
            raise
        except CONNECTION_ERRORS as exc:
            if not retry:
                raise self.unavailable(role, exc) from exc
        try:
            return action()
        except BrokerUnavailable:
            raise
        except CONNECTION_ERRORS as exc:
            raise self.unavailable(role, exc) from exc

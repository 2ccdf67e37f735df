"""The broker transports of a worker: kombu's, with nothing let through that would
stop the worker or inflate without a bound before :mod:`flask_execute.admission` saw it.

kombu's Redis channel parses each queue item (and each item published to every worker:
remote control, worker events) as JSON and builds a message from what it finds; an item
that is not JSON, or JSON that is not kombu's envelope (properties, a delivery tag, a
body kombu can decode), raises inside the worker's event loop and stops its main
process. Here such an item is dropped (it was popped off the list, and taken out of
the unacknowledged hash if the fetch recorded it there: it is gone) and logged once
at CRITICAL. Our Redis channels take messages with :mod:`flask_execute.fetch`, which
checks each item here (:meth:`_ChannelGate._parse`) before delivering it.

kombu also inflates a message with a ``compression`` header as it builds it, with no
bound. Our Redis and RabbitMQ transports set that header aside under
:data:`COMPRESSION` instead: the admission check decides, with the app's policy,
whether to inflate, and inflates with a cap.

:class:`Connection` puts these transports in place of kombu's for ``redis://``,
``rediss://``, ``sentinel://`` and ``amqp://`` URLs; other transports are kombu's own.
"""

from __future__ import annotations

import types
import typing as t
from queue import Empty

from celery.app.amqp import AMQP as CeleryAMQP
from kombu.connection import Connection as KombuConnection
from kombu.connection import ConnectionPool as KombuConnectionPool
from kombu.connection import PooledConnection as KombuPooledConnection
from kombu.transport import pyamqp
from kombu.transport import redis
from kombu.utils import json as kombu_json
from kombu.utils.encoding import bytes_to_str

from .fetch import ReliableFetch
from .leases import LeasedQoS
from .refusals import alert
from .refusals import failure
from .refusals import kind
from .refusals import Refused
from .refusals import shown

__all__ = ["AMQP", "COMPRESSION", "Checked", "Connection", "ConnectionPool", "envelope"]

#: Where the transports set a message's ``compression`` header aside.
COMPRESSION = "x-flask-execute-compression"


class Checked(dict[str, t.Any]):
    """A queue item :func:`envelope` let through (no JSON parse makes one)."""


def envelope(item: object, codecs: t.Mapping[str, t.Any]) -> Checked:
    """Check a Redis queue item (parsed JSON) against the envelope kombu builds a
    message from, and return it with its ``compression`` header set aside.

    :raises Refused: kombu would fail on it (or inflate it).
    """
    if not isinstance(item, dict):
        raise Refused("malformed", f"It is {kind(item)}, not a kombu message.")
    properties = item.get("properties")
    if not isinstance(properties, dict):
        raise Refused("malformed", f"Its properties are {kind(properties)}, not a mapping.")
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        raise Refused("malformed", "Its delivery tag is missing or not a string.")
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(
        isinstance(info.get(k), str) for k in ("exchange", "routing_key")
    ):
        raise Refused("malformed", "Its delivery info lacks an exchange and a routing key.")
    priority = properties.get("priority")
    if priority is not None and not (type(priority) is int and 0 <= priority <= 255):
        raise Refused("malformed", f"Its priority is {kind(priority)}, not 0 to 255.")
    headers = item.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise Refused("malformed", f"Its headers are {kind(headers)}, not a mapping.")
    for name in ("content-type", "content-encoding", "body"):
        if not isinstance(item.get(name), (str, type(None))):
            raise Refused("malformed", f"Its {name} is {kind(item.get(name))}, not a string.")
    encoding = properties.get("body_encoding")
    codec = codecs.get(encoding) if isinstance(encoding, str) else None
    if encoding is not None and codec is None:
        raise Refused("malformed", f"Its body encoding {shown(encoding)!r} is not kombu's.")
    try:
        if item.get("body") and codec is not None:
            codec.decode(item["body"])
        elif item.get("body"):
            item["body"].encode()  # kombu encodes a text body as UTF-8
    except Exception as exc:  # binascii.Error, UnicodeEncodeError (a lone surrogate)
        raise Refused("malformed", f"Its body does not decode: {failure(exc)}.") from None
    if headers and "compression" in headers:
        set_aside = {k: v for k, v in headers.items() if k != "compression"}
        set_aside[COMPRESSION] = headers["compression"]
        item = {**item, "headers": set_aside}
    return Checked(item)


def _raw_id(item: object) -> object:
    """The task id of a queue item, if it has one where Celery puts it."""
    if not isinstance(item, dict):
        return None
    headers, properties = item.get("headers"), item.get("properties")
    if isinstance(headers, dict) and headers.get("id"):
        return headers["id"]
    return properties.get("correlation_id") if isinstance(properties, dict) else None


def _raised_by(exc: BaseException, caller: types.CodeType, callee: types.CodeType) -> bool:
    """Did ``exc`` come out of a call to ``callee`` made by ``caller`` (code objects)?

    kombu parses an item inside the method that reads it from Redis, which also
    delivers it; only a failure of the parse itself is the item's fault. (Should kombu
    move its parse elsewhere, this says no and the error propagates as before.)
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code is not caller:
        tb = tb.tb_next
    return tb is not None and tb.tb_next is not None and tb.tb_next.tb_frame.f_code is callee


_LOADS = kombu_json.loads.__code__  # how kombu's Redis channel parses a queue item
_BRPOP_READ = redis.Channel._brpop_read.__code__
_RECEIVE_ONE = redis.Channel._receive_one.__code__


def _admitted(item: object, codecs: t.Mapping[str, t.Any]) -> Checked | None:
    """``item`` checked by :func:`envelope`, or None when it is refused (logged)."""
    if isinstance(item, Checked):
        return item
    try:
        return envelope(item, codecs)
    except Refused as refused:
        alert(_raw_id(item), refused)
        return None


class _ChannelGate:
    """For kombu's Redis channels: an item kombu cannot parse is dropped, logged."""

    codecs: t.Any

    def _parse(self, raw: bytes) -> dict[str, t.Any] | None:
        """For :class:`~flask_execute.fetch.ReliableFetch`: a queue item it took, checked
        by :func:`envelope`, or None when it is refused (logged)."""
        try:
            item = kombu_json.loads(bytes_to_str(raw))  # type: ignore[no-untyped-call]
        except Exception as exc:
            alert(None, Refused("malformed", f"The queue item is not JSON: {failure(exc)}."))
            return None
        return _admitted(item, self.codecs)

    def _brpop_read(self, **options: t.Any) -> t.Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except Exception as exc:
            if not _raised_by(exc, _BRPOP_READ, _LOADS):
                raise
            alert(None, Refused("malformed", f"The queue item is not JSON: {failure(exc)}."))
            raise Empty() from None  # what kombu raises when there was nothing to read

    def _receive_one(self, c: t.Any) -> t.Any:
        try:
            return super()._receive_one(c)  # type: ignore[misc]
        except Exception as exc:
            if not _raised_by(exc, _RECEIVE_ONE, _LOADS):
                raise
            alert(None, Refused("malformed", f"The published item is not JSON: {failure(exc)}."))
            return None


class _TransportGate:
    """For kombu's Redis transports: every parsed item passes :func:`envelope`."""

    Channel: t.Any

    def _deliver(self, message: t.Any, queue: str) -> None:
        checked = _admitted(message, self.Channel.codecs)  # the fetch's: checked already
        if checked is None:
            return  # popped off the list, never in the unacked hash: gone
        super()._deliver(checked, queue)  # type: ignore[misc]


class _Detached:
    """For kombu's Redis channels: closing a channel after its connection let go of
    the transport still gives its unacknowledged messages back.

    kombu's ``Connection.collect()``/``close()`` set ``transport.client`` to None; a
    channel closed after that (Celery's consumer closes its gossip and task channels
    while it reconnects) gives its messages back through a fresh pool built from
    ``transport.client``, and kombu raised ``AttributeError: 'NoneType' object has no
    attribute 'hostname'``, which stopped the worker. The channel keeps the connection
    it was made for and lends it to the transport for that one call.
    """

    connection: t.Any

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._made_for = self.connection.client

    def _connparams(self, asynchronous: bool = False) -> t.Any:
        transport = self.connection
        if transport.client is not None or self._made_for is None:
            return super()._connparams(asynchronous)  # type: ignore[misc]
        transport.client = self._made_for
        try:
            return super()._connparams(asynchronous)  # type: ignore[misc]
        finally:
            transport.client = None


class _RedisChannel(_ChannelGate, ReliableFetch, _Detached, redis.Channel):
    QoS = LeasedQoS


class RedisTransport(_TransportGate, redis.Transport):
    Channel = _RedisChannel


class _SentinelChannel(_ChannelGate, ReliableFetch, _Detached, redis.SentinelChannel):
    QoS = LeasedQoS


class SentinelTransport(_TransportGate, redis.SentinelTransport):
    Channel = _SentinelChannel


class _AMQPMessage(pyamqp.Message):
    """kombu's RabbitMQ message, its ``compression`` header set aside, not inflated."""

    def __init__(self, msg: t.Any, channel: t.Any = None, **kwargs: t.Any) -> None:
        headers = msg.properties.get("application_headers")
        if isinstance(headers, dict) and "compression" in headers:
            headers[COMPRESSION] = headers.pop("compression")
        super().__init__(msg, channel=channel, **kwargs)  # type: ignore[no-untyped-call]


class _AMQPChannel(pyamqp.Channel):
    Message = _AMQPMessage


class _AMQPConnection(pyamqp.Connection):
    Channel = _AMQPChannel


class AMQPTransport(pyamqp.Transport):
    Connection = _AMQPConnection


_GATED: dict[type, type] = {
    redis.Transport: RedisTransport,
    redis.SentinelTransport: SentinelTransport,
    pyamqp.Transport: AMQPTransport,
}


class Connection(KombuConnection):
    """kombu's connection, using our transports in place of kombu's Redis and RabbitMQ
    ones. The URL and ``transport_cls`` stay as configured, so ``as_uri()``, ``info()``
    and Flower still read ``redis://``. Its pool (Celery's ``app.pool``, which every
    publish and remote-control call acquires from) holds connections of this kind
    too: kombu's own pool makes plain ``PooledConnection`` objects."""

    def get_transport_cls(self) -> type:
        cls = t.cast(type, super().get_transport_cls())  # type: ignore[no-untyped-call]
        return _GATED.get(cls, cls)

    def Pool(self, limit: int | None = None, **kwargs: t.Any) -> ConnectionPool:
        return ConnectionPool(self, limit=limit, **kwargs)  # type: ignore[no-untyped-call]


class PooledConnection(KombuPooledConnection, Connection):
    """kombu's pooled connection, with our transports."""


class ConnectionPool(KombuConnectionPool):
    """kombu's connection pool, of :class:`PooledConnection` objects."""

    def new(self) -> PooledConnection:
        info = self.connection._info(resolve=False)
        return PooledConnection(self, **dict(info))  # type: ignore[no-untyped-call]


class AMQP(CeleryAMQP):  # type: ignore[misc]
    """Celery's ``app.amqp``, making every broker connection a :class:`Connection`."""

    Connection = Connection

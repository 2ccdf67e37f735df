"""Leases on Redis messages: a worker that holds a message keeps it; a dead worker's
messages come back soon, not after an hour.

kombu emulates acknowledgements on Redis: a message a worker took off a queue waits in
the *unacknowledged* hash, stamped with the time it was taken, until the worker
acknowledges it; any consumer puts back a message whose stamp is older than the
visibility timeout. So the timeout has to outlive the longest task, ETA and countdown
(one hour by default), and a message held by a worker that was killed waits that long.

Here each stamp is a lease that the holder renews:

* every ``unacked_restore_interval`` seconds (10), a worker re-stamps every message it
  still holds (:meth:`LeasedQoS.restore_visible`, before kombu's own sweep), so a
  message outlives the visibility timeout only when its worker stopped renewing:
  a visibility timeout of minutes is safe for tasks of any length;
* each worker also records the messages it holds in a set of its own (named after its
  host and process id, updated in the same transaction as kombu's hash), so that
  whoever sees it die (the local-services supervisor) gives them back at once with
  :func:`give_back`.

The lease is renewed by the worker's main process (its event loop), which a prefork or
threads pool leaves free while tasks run. A worker whose main process runs the task
itself (``--pool=solo``) cannot renew while a task runs: there a task that runs longer
than the visibility timeout is delivered again.
"""

from __future__ import annotations

import os
import socket
import time
import typing as t

from kombu.transport import redis
from kombu.utils.json import dumps

__all__ = ["LeasedQoS", "give_back", "owner_key"]


def owner_key(unacked_key: str, host: str, pid: int) -> str:
    """The set of delivery tags held by the worker process ``pid`` on ``host``."""
    return f"{unacked_key}:held:{host}:{pid}"


class LeasedQoS(redis.QoS):
    """kombu's Redis QoS, whose held messages are leases renewed by their holder."""

    @property
    def held_key(self) -> str:
        return owner_key(self.channel.unacked_key, socket.gethostname(), os.getpid())

    def _held_ttl(self) -> int:
        # a set nobody renews (its worker died unsupervised) goes away by itself
        return int(max(60.0, 4 * float(self.visibility_timeout)))

    def append(self, message: t.Any, delivery_tag: str) -> None:
        """Record a message as held: kombu's hash and index, and our own set, in one
        transaction."""
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                self.unacked_key,
                delivery_tag,
                dumps([message._raw, exchange, routing_key]),  # type: ignore[no-untyped-call]
            ).sadd(self.held_key, delivery_tag).expire(self.held_key, self._held_ttl()).execute()
            # kombu's virtual QoS keeps it in memory too (skipping redis.QoS.append)
            super(redis.QoS, self).append(message, delivery_tag)  # type: ignore[no-untyped-call]

    def _remove_from_indices(self, delivery_tag: str, pipe: t.Any = None) -> t.Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)  # type: ignore[no-untyped-call]
        return pipe.srem(self.held_key, delivery_tag)

    def restore_visible(self, *args: t.Any, **kwargs: t.Any) -> None:
        """Renew the leases of the messages this worker holds, then let kombu put back
        the ones whose lease ran out (their worker stopped renewing)."""
        tags = list(self._delivered)
        if tags:
            with self.channel.conn_or_acquire() as client:
                now = time.time()
                # XX: only re-stamp what is still unacknowledged (never re-add an ack)
                client.zadd(self.unacked_index_key, dict.fromkeys(tags, now), xx=True)
                client.expire(self.held_key, self._held_ttl())
        super().restore_visible(*args, **kwargs)  # type: ignore[no-untyped-call]


def give_back(channel: t.Any, host: str, pid: int) -> int:
    """Put every message held by the (dead) worker process ``pid`` on ``host`` back at
    the head of its queue, at once; return how many. ``channel`` is a Redis channel of
    the same broker (``connection.default_channel``). Safe to call twice."""
    key = owner_key(channel.unacked_key, host, pid)
    qos = channel.qos
    with channel.conn_or_acquire() as client:
        tags = [tag.decode() if isinstance(tag, bytes) else tag for tag in client.smembers(key)]
        for tag in tags:
            qos.restore_by_tag(tag, client, leftmost=True)
        client.delete(key)
    return len(tags)

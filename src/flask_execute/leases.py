"""Leases on Redis messages: a worker that holds a message keeps it; a dead worker's
messages come back soon, not after an hour.

kombu emulates acknowledgements on Redis: a message a worker took off a queue waits in
the *unacknowledged* hash, stamped with the time it was taken, until the worker
acknowledges it; any consumer puts back a message whose stamp is older than the
visibility timeout. So the timeout has to outlive the longest task, ETA and countdown
(one hour by default), and a message held by a worker that was killed waits that long.

Here each stamp is a lease that the holder renews (a worker's channel records a
message as held in the same atomic step as it takes it off its queue:
:mod:`flask_execute.fetch`):

* every ``unacked_restore_interval`` seconds (10), a worker re-stamps every message it
  still holds (:meth:`LeasedQoS.restore_visible`, before kombu's own sweep), so a
  message outlives the visibility timeout only when its worker stopped renewing:
  a visibility timeout of minutes is safe for tasks of any length;
* each consuming channel of a worker records the messages it holds in a set of its own
  (named after its host, process id and a token of the channel, updated in the same
  transaction as kombu's hash), and renews that set's entry in the broker-wide
  *lease book* (a sorted set: holder -> time of its last renewal) on every scan, so
  that whoever sees the worker die (the local-services supervisor) gives its messages
  back at once with :func:`give_back`;
* a message in kombu's hash that no *live* holder holds is an orphan: a worker took
  it, then lost its connection while giving it back (a broker restart does that to
  the messages a worker had prefetched; the worker reconnects on a new channel, with
  the same process id, and its old channel's messages are held by nobody), or the
  worker died where no supervisor saw it, or its supervisor could not reach the
  broker to give them back. A holder's entry says until when it is live: its last
  renewal plus :data:`ORPHAN_AFTER` seconds (three scans). Each scan puts back the
  orphans stamped more than that ago, and forgets the holders no longer live,
  instead of leaving their messages for the visibility timeout.

The lease is renewed by the worker's main process (its event loop), which a prefork or
threads pool leaves free while tasks run. A worker whose main process runs the task
itself (``--pool=solo``; ``eventlet`` and ``gevent`` when a task blocks) cannot renew
while a task runs: its holder stays live for the whole visibility timeout
(:class:`LeaseTerm`, a worker bootstep, says which), and a task that runs longer than
that is delivered again.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import typing as t
import uuid

from celery import bootsteps
from kombu.transport import redis
from kombu.utils.json import dumps

__all__ = ["ORPHAN_AFTER", "LeaseTerm", "LeasedQoS", "give_back", "lease_book_key", "owner_key"]

log = logging.getLogger(__name__)


#: seconds after which an unacknowledged message that no live holder holds is put
#: back, and after which a holder that did not renew is no longer live (three restore
#: intervals: a holder renews on every one)
ORPHAN_AFTER = 30.0


def owner_key(unacked_key: str, host: str, pid: int, token: str = "") -> str:
    """The set of delivery tags held by one channel (``token``) of the worker process
    ``pid`` on ``host``; without ``token``, the prefix shared by all its channels."""
    return f"{unacked_key}:held:{host}:{pid}:{token}"


def lease_book_key(unacked_key: str) -> str:
    """The sorted set of every holder's :func:`owner_key`, scored by the time until
    which it is live (its last renewal plus its term)."""
    return f"{unacked_key}:leases"


class LeasedQoS(redis.QoS):
    """kombu's Redis QoS, whose held messages are leases renewed by their holder."""

    #: whether this process's event loop runs (and renews) while tasks run: set by
    #: :class:`LeaseTerm` in a worker; False makes a holder live for the visibility
    #: timeout instead of :data:`ORPHAN_AFTER`
    renews_while_tasks_run: t.ClassVar[bool] = True

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # one holder per channel: after a reconnect the same process holds a new set,
        # and the old channel's messages (which it can no longer acknowledge) are
        # orphans once the old holder stops being renewed
        self._token = uuid.uuid4().hex[:12]
        #: the delivery tag of the message the channel is delivering now, which its
        #: fetch (:mod:`flask_execute.fetch`) recorded as held already
        self.recorded: str | None = None

    @property
    def held_key(self) -> str:
        return owner_key(self.channel.unacked_key, socket.gethostname(), os.getpid(), self._token)

    def live_until(self, now: float) -> float:
        """Until when this channel's holder is live, renewed at ``now``."""
        term = ORPHAN_AFTER if self.renews_while_tasks_run else float(self.visibility_timeout)
        return now + term

    def held_ttl(self) -> int:
        """Seconds the held set outlives its last renewal: a set nobody renews (its
        worker died unsupervised) goes away by itself."""
        return int(max(60.0, 4 * float(self.visibility_timeout)))

    def append(self, message: t.Any, delivery_tag: str) -> None:
        """Record a message as held: kombu's hash and index, and our own set, in one
        transaction; in memory only when the channel's fetch recorded it already
        (:attr:`recorded`)."""
        if delivery_tag == self.recorded:
            self.recorded = None
            # kombu's virtual QoS keeps it in memory (skipping redis.QoS.append)
            super(redis.QoS, self).append(message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                self.unacked_key,
                delivery_tag,
                dumps([message._raw, exchange, routing_key]),  # type: ignore[no-untyped-call]
            ).sadd(self.held_key, delivery_tag).pexpire(self.held_key, self.held_ttl() * 1000).zadd(
                lease_book_key(self.channel.unacked_key),
                {self.held_key: self.live_until(time.time())},
            ).execute()
            super(redis.QoS, self).append(message, delivery_tag)  # type: ignore[no-untyped-call]

    def forget(self, delivery_tag: str) -> None:
        """Take a recorded message out of the books without putting it back (it was
        refused, or nothing will acknowledge it)."""
        self._remove_from_indices(delivery_tag).execute()

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
                pipe = client.pipeline(transaction=False)
                # XX: only re-stamp what is still unacknowledged (never re-add an ack)
                pipe.zadd(self.unacked_index_key, dict.fromkeys(tags, now), xx=True)
                pipe.pexpire(self.held_key, self.held_ttl() * 1000)
                pipe.zadd(
                    lease_book_key(self.channel.unacked_key), {self.held_key: self.live_until(now)}
                )
                pipe.execute()
        self.restore_orphans()
        super().restore_visible(*args, **kwargs)  # type: ignore[no-untyped-call]

    def restore_orphans(self, older_than: float = ORPHAN_AFTER) -> int:
        """Put back (at the head of their queues) the unacknowledged messages stamped
        more than ``older_than`` seconds ago that no live holder holds, and forget the
        holders that did not renew for that long; return how many were put back."""
        with self.channel.conn_or_acquire() as client:
            now = time.time()
            # ZRANGE ... BYSCORE, not ZRANGEBYSCORE: kombu's client prefixes the keys
            # of the commands it knows (``global_keyprefix``), and only those
            stale = client.zrange(
                self.unacked_index_key, 0, now - older_than, byscore=True, offset=0, num=1000
            )
            if not stale:
                return 0  # the usual case: one round trip per scan
            book = lease_book_key(self.channel.unacked_key)
            for key in client.zrange(book, 0, now, byscore=True):
                # a holder that stopped renewing: its worker died or reconnected
                client.delete(key)
                client.zrem(book, key)
            held: set[bytes] = set()
            for key in client.zrange(book, now, "+inf", byscore=True):
                held |= client.smembers(key)
            orphans = [tag for tag in stale if tag not in held]
            for tag in orphans:
                try:
                    self.restore_by_tag(tag.decode(), client, leftmost=True)  # type: ignore[no-untyped-call]
                except (ValueError, TypeError, KeyError) as exc:
                    # not what kombu records (written by someone with access to the
                    # broker): drop it, or it would stop every scan here
                    log.critical("flask-execute: dropped unacknowledged entry %r: %s", tag, exc)
                    self.forget(tag.decode())
        if orphans:
            log.warning(
                "flask-execute: put back %d unacknowledged message(s) that no worker held",
                len(orphans),
            )
        return len(orphans)


class LeaseTerm(bootsteps.Step):  # type: ignore[misc]
    """Worker bootstep: a worker whose main process runs the tasks (the ``solo``,
    ``eventlet`` and ``gevent`` pools) cannot renew its leases while a task runs, so
    its holder is live for the visibility timeout, not :data:`ORPHAN_AFTER`."""

    def __init__(self, worker: t.Any, **kwargs: t.Any) -> None:
        super().__init__(worker, **kwargs)
        module = getattr(worker.pool_cls, "__module__", "") or ""
        in_main = module.rsplit(".", 1)[-1] in ("solo", "eventlet", "gevent")
        LeasedQoS.renews_while_tasks_run = not in_main


def give_back(channel: t.Any, host: str, pid: int) -> int:
    """Put every message held by the (dead) worker process ``pid`` on ``host`` back at
    the head of its queue, at once; return how many. ``channel`` is a Redis channel of
    the same broker (``connection.default_channel``). Safe to call twice. When the
    broker cannot be reached, the messages come back anyway: as orphans, once its
    holders stop being renewed (:data:`ORPHAN_AFTER`)."""
    book = lease_book_key(channel.unacked_key)
    prefix = owner_key(channel.unacked_key, host, pid).encode()
    qos = channel.qos
    count = 0
    with channel.conn_or_acquire() as client:
        for key in client.zrange(book, 0, -1):
            if not key.startswith(prefix):
                continue
            tags = [tag.decode() for tag in client.smembers(key)]
            for tag in tags:
                qos.restore_by_tag(tag, client, leftmost=True)
            client.delete(key)
            client.zrem(book, key)
            count += len(tags)
    return count

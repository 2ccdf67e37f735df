"""Reliable fetch on Redis: a message a worker takes off a queue is, at every instant,
either still on its queue or recorded as held by the channel that took it.

kombu takes a message with ``BRPOP``, which removes it from its list, and records it in
the unacknowledged hash only once the reply has reached the worker and been parsed
(kombu #305, celery #7950). A worker killed in between (``kill -9``, the OOM killer)
loses that message, whatever the delivery mode: nothing on the broker says it existed.

Here a channel never pops a queue with ``BRPOP``. It takes a message with a Lua script
(:data:`TAKE`) that pops it and records it, in one atomic step, where kombu's own
``append`` would: kombu's hash and index, the channel's held set and its entry in the
lease book (:mod:`flask_execute.leases`). A worker killed at any instant has its message
either on the queue or held by a holder that stops renewing, which whoever sees it die
(the local-services supervisor) or any worker's orphan scan puts back.

A script cannot block, so a channel with nothing to take waits on *bells* instead:
every publish (and every message put back on a queue) pushes a token on its queue's
bell (:func:`bell_key`) in the same transaction. The channel alternates:

* *taking*: it sends the script; a message comes back and is delivered, and it takes
  again; nothing comes back, and it waits;
* *waiting*: a ``BRPOP`` on the bells of its queues, with kombu's ``brpop_timeout``
  (1 s); a token or the timeout sends it back to taking. A token is only a wake-up: a
  message whose token was lost (taken by a killed worker, or published by a kombu that
  rings no bell) is taken within ``brpop_timeout``.

A message taken while the channel drains a queue spends one token of its queue's bell,
so a bell holds about as many tokens as its queue holds messages; a script that finds
every queue of the channel empty clears their bells, and a bell expires a minute after
its last ring (:data:`BELL_TTL_MS`). The script runs in the poll's
place on the same connection, so taking costs one round trip per message, as ``BRPOP``
and kombu's ``append`` did (one fewer: ``append`` had its own).

A transport with ``ack_emulation`` off keeps kombu's ``BRPOP`` (nothing is recorded
then to begin with).
"""

from __future__ import annotations

import hashlib
import typing as t
from queue import Empty
from time import monotonic
from time import time

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import NoScriptError

from .leases import lease_book_key

__all__ = ["BELL_TTL_MS", "TAKE", "ReliableFetch", "bell_key"]

#: Pop the first message of the given queue keys and record it as held, atomically.
#: KEYS: the unacknowledged hash, its index, the channel's held set, the lease book,
#: then the ``n`` queue keys in the order to try, then the bell of each.
#: ARGV: now, the held set's ttl, the holder's live-until, the holder's name in the
#: book, ``n``, "1" when a bell's token woke the channel (already spent), and one
#: character per queue key: "1" to record what is taken from it, "0" for a queue
#: consumed without acknowledgements.
#: Returns ``{index of the key, item, delivery tag or nil when not recorded}``, or
#: nil (and the bells cleared) when every queue is empty. An item that is not kombu's
#: envelope is popped and returned unrecorded: the worker refuses it.
TAKE = """
local n = tonumber(ARGV[5])
for i = 1, n do
  local item = redis.call('RPOP', KEYS[4 + i])
  if item then
    if ARGV[6] ~= '1' then redis.call('RPOP', KEYS[4 + n + i]) end
    local ok, m = pcall(cjson.decode, item)
    local tag, info = nil, nil
    if ok and type(m) == 'table' and type(m['properties']) == 'table' then
      tag = m['properties']['delivery_tag']
      info = m['properties']['delivery_info']
    end
    if string.sub(ARGV[7], i, i) == '1' and type(tag) == 'string' and tag ~= ''
        and type(info) == 'table'
        and type(info['exchange']) == 'string' and type(info['routing_key']) == 'string' then
      redis.call('ZADD', KEYS[2], ARGV[1], tag)
      redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
        .. ',' .. cjson.encode(info['routing_key']) .. ']')
      redis.call('SADD', KEYS[3], tag)
      redis.call('EXPIRE', KEYS[3], ARGV[2])
      redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])
      return {i, item, tag}
    end
    return {i, item, false}
  end
end
for i = 1, n do redis.call('DEL', KEYS[4 + n + i]) end
return false
"""

_TAKE_SHA = hashlib.sha1(TAKE.encode()).hexdigest()


#: milliseconds a bell outlives its last ring. A token only matters to a channel that
#: is waiting, or about to wait (it has just found every queue empty, with its take,
#: which runs before every wait): a token nobody popped within a minute wakes nobody,
#: and a bell whose queue nobody consumes, or that something else emptied, goes away.
BELL_TTL_MS = 60_000


def bell_key(queue: str) -> str:
    """The list of wake-up tokens of ``queue`` (one pushed per message put on it)."""
    return f"_flask_execute.bell.{queue}"


class _Commands(list[tuple[str, tuple[t.Any, ...]]]):
    """Collects the Redis commands kombu's ``_put`` would run (its publish-batch
    interface), to run them with the bell's in one transaction."""

    def add(self, name: str, *args: t.Any) -> None:
        self.append((name, args))


class _Ringing:
    """A pipeline that rings the bell of each queue a message is pushed onto."""

    def __init__(self, pipe: t.Any, sep: str) -> None:
        self._pipe, self._sep = pipe, sep

    def lpush(self, key: str, value: t.Any) -> t.Any:
        self._pipe.lpush(key, value)
        return self._ring(key)

    def rpush(self, key: str, value: t.Any) -> t.Any:
        self._pipe.rpush(key, value)
        return self._ring(key)

    def _ring(self, key: str) -> t.Any:
        bell = bell_key(key.rsplit(self._sep, 1)[0])
        self._pipe.lpush(bell, 1)
        return self._pipe.pexpire(bell, BELL_TTL_MS)

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._pipe, name)


class ReliableFetch:
    """For kombu's Redis channels (before ``redis.Channel`` in the bases): take messages
    with :data:`TAKE`, wait on bells, ring them on publish and restore.

    The channel's QoS is a :class:`~flask_execute.leases.LeasedQoS`: the script records
    a message as its ``append`` would, and its ``recorded`` slot tells ``append`` that
    the message it is given is recorded already.
    """

    # kombu's Redis channel
    client: t.Any
    connection: t.Any
    qos: t.Any
    sep: str
    ack_emulation: bool
    active_queues: list[str]
    priority_steps: list[int]
    global_keyprefix: str
    unacked_key: str
    unacked_index_key: str
    brpop_timeout: float | None
    connection_errors: tuple[type[BaseException], ...]
    _queue_cycle: t.Any
    _in_poll: t.Any
    _brpop_sent_at: t.Any
    _q_for_pri: t.Callable[[str, int], str]
    _flush_brpop_reauth: t.Callable[[], None]
    conn_or_acquire: t.Callable[..., t.Any]

    #: the next poll takes (the script) rather than waits (on the bells)
    _taking_next = True
    #: the command in flight: "take" or "wait"
    _sent = "wait"
    #: the last wait was ended by a token (which the next take must not spend again)
    _woken = False

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self._no_ack_queues: set[str] = set()
        #: the queue of each key the take in flight tries, in order
        self._from: list[str] = []

    # --- consuming -----------------------------------------------------------------

    def basic_consume(self, queue: str, *args: t.Any, **kwargs: t.Any) -> t.Any:
        no_ack = kwargs.get("no_ack", args[0] if args else False)
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, *args, **kwargs)  # type: ignore[misc]

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self.ack_emulation:
            return super()._brpop_start(timeout)  # type: ignore[misc, no-any-return]
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        prefix = self.global_keyprefix
        if self._taking_next:
            # (queue, key) for each queue key, in kombu's BRPOP order
            taken = [(q, self._q_for_pri(q, pri)) for pri in self.priority_steps for q in queues]
            qos, now = self.qos, time()
            held = qos.held_key
            names = [self.unacked_key, self.unacked_index_key, held]
            names += [lease_book_key(self.unacked_key)]
            names += [key for _, key in taken] + [bell_key(q) for q, _ in taken]
            args: list[t.Any] = ["EVALSHA", _TAKE_SHA, len(names)]
            args += [prefix + name for name in names]
            args += [now, qos.held_ttl(), qos.live_until(now), held, len(taken)]
            args.append(1 if self._woken else 0)
            args.append("".join("0" if q in self._no_ack_queues else "1" for q, _ in taken))
            self._from, self._sent = [q for q, _ in taken], "take"
        else:
            if timeout is None:
                timeout = self.brpop_timeout
            args = ["BRPOP", *(prefix + bell_key(q) for q in queues), timeout or 0]
            self._sent = "wait"
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(*args)
        return None

    def _brpop_read(self, **options: t.Any) -> t.Any:
        if not self.ack_emulation:
            return super()._brpop_read(**options)  # type: ignore[misc]
        try:
            return self._read(**options)
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _read(self, **options: t.Any) -> bool:
        sent = self._sent
        connection = self.client.connection
        command = "EVALSHA" if sent == "take" else "BRPOP"
        try:
            reply = self.client.parse_response(connection, command, **options)
        except self.connection_errors:
            connection.disconnect()  # the next poll reconnects
            raise
        except NoScriptError:  # a new (or restarted, or flushed) Redis
            self.client.script_load(TAKE)
            raise Empty() from None
        if sent == "wait":
            self._taking_next, self._woken = True, bool(reply)
            raise Empty()
        self._woken = False
        if not reply:
            self._taking_next = False
            raise Empty()
        index, raw, tag = reply
        dest = self._from[int(index) - 1]
        self._queue_cycle.rotate(dest)
        tag = bytes_to_str(tag) if tag else None  # type: ignore[no-untyped-call]
        message = self._parse(raw)
        if message is None:
            if tag:
                self.qos.forget(tag)
            raise Empty()
        self.qos.recorded = tag
        try:
            self.connection._deliver(message, dest)
        finally:
            self.qos.recorded = None
        return True

    def _parse(self, raw: bytes) -> dict[str, t.Any] | None:
        """The message in a queue item, or None when it is refused (and logged)."""
        return t.cast(dict[str, t.Any], loads(bytes_to_str(raw)))  # type: ignore[no-untyped-call]

    # --- putting on a queue --------------------------------------------------------

    def _put(self, queue: str, message: t.Any, **kwargs: t.Any) -> None:
        if not self.ack_emulation:
            return super()._put(queue, message, **kwargs)  # type: ignore[misc, no-any-return]
        batch = kwargs.pop("_publish_batch", None)
        commands = _Commands()
        super()._put(queue, message, _publish_batch=commands, **kwargs)  # type: ignore[misc]
        commands.add("lpush", bell_key(queue), 1)
        commands.add("pexpire", bell_key(queue), BELL_TTL_MS)
        if batch is not None:
            for name, args in commands:
                batch.add(name, *args)
            return None
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            for name, args in commands:
                getattr(pipe, name)(*args)
            pipe.execute()
        return None

    def _do_restore_message(
        self, payload: t.Any, exchange: str, routing_key: str, pipe: t.Any, leftmost: bool = False
    ) -> None:
        if self.ack_emulation:
            pipe = _Ringing(pipe, self.sep)
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)  # type: ignore[misc]

    def _purge(self, queue: str) -> int:
        count = t.cast(int, super()._purge(queue))  # type: ignore[misc]
        with self.conn_or_acquire() as client:
            client.delete(bell_key(queue))
        return count

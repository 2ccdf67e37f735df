"""Futures as arguments: a call that runs once other calls succeeded.

``celery.submit(g, f)`` where ``f`` is a :class:`~flask_execute.Future` (also inside a
list, tuple or dict argument, at any depth, and a :class:`~flask_execute.FuturePool`,
which stands for the list of its results) makes ``f`` a *dependency* of ``g``:

- in the caller (:func:`split`), each such future is replaced by a :class:`Placeholder`
  naming its task id; the ids travel in ``g``'s signed payload, ahead of the pickled
  call (:func:`frame`), and the options ``g`` is to be published with in its signed
  header (:func:`publish_options`);
- ``g`` is not published: :meth:`Dependencies.register` stores its envelope in the
  result backend under each dependency that has not finished, in one atomic script
  (or says to publish it at once when none is pending, or one already failed);
- the worker that stores the outcome of the last pending dependency (or of a failed or
  cancelled one) publishes ``g``, in the same atomic write that stores that outcome
  (:mod:`flask_execute.outbox`): the web process is not involved, and may have exited;
- the worker that runs ``g`` trusts none of that: it reads the outcomes of the
  dependencies its own verified payload names, verified like any outcome, and puts
  their values in place of the placeholders, or fails ``g`` with
  :class:`~flask_execute.DependencyError` (:mod:`flask_execute.upstream`).

A cycle cannot be built: a future exists only once its own call was submitted.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import typing as t
from collections.abc import Mapping

import redis.exceptions
from celery.backends.redis import RedisBackend
from kombu.utils.url import maybe_sanitize_url

from .claims import claim_key
from .errors import BrokerUnavailable
from .errors import DependencyError
from .futures import Future
from .pool import FuturePool

__all__ = [
    "Dependencies",
    "Placeholder",
    "dependency_error",
    "dependents_key",
    "frame",
    "publish_options",
    "restore_options",
    "settled",
    "split",
    "substitute",
    "unframe",
    "unmet_key",
    "waiting_key",
]

Call: t.TypeAlias = tuple[tuple[t.Any, ...], dict[str, t.Any]]


def waiting_key(task_id: str) -> str:
    """The sealed envelope of a call waiting for its dependencies."""
    return f"flask-execute:waiting:{task_id}"


def unmet_key(task_id: str) -> str:
    """The ids of the dependencies a waiting call still waits for (a set)."""
    return f"flask-execute:unmet:{task_id}"


def dependents_key(task_id: str) -> str:
    """The ids of the calls waiting for ``task_id`` (a set)."""
    return f"flask-execute:dependents:{task_id}"


class Placeholder:
    """Stands for the result of task ``task_id`` in a waiting call's arguments."""

    __slots__ = ("task_id",)

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def __reduce__(self) -> tuple[type[Placeholder], tuple[str]]:
        return (Placeholder, (self.task_id,))

    def __repr__(self) -> str:
        return f"<result of task {self.task_id}>"


def _holds_future(value: object) -> bool:
    if isinstance(value, (Future, FuturePool)):
        return True
    kind = type(value)
    if kind is list or kind is tuple:
        return any(_holds_future(item) for item in t.cast(tuple[object, ...], value))
    if kind is dict:
        return any(_holds_future(item) for item in t.cast(dict[object, object], value).values())
    return False


def split(args: tuple[t.Any, ...], kwargs: dict[str, t.Any], owner: object) -> tuple[
    tuple[t.Any, ...], dict[str, t.Any], list[Future[t.Any]]
]:  # fmt: skip
    """``args`` and ``kwargs`` with every future (in lists, tuples and dict values, at
    any depth) replaced by a :class:`Placeholder`, and a pool by the list of its
    members' placeholders; and the futures found, each once, in order.

    :raises ValueError: a future of another app or extension (``owner`` is the client
        of this one): it cannot be waited for here.
    """
    if not _holds_future(args) and not _holds_future(kwargs):
        return args, kwargs, []
    found: dict[str, Future[t.Any]] = {}

    def swap(value: t.Any) -> t.Any:
        if isinstance(value, FuturePool):
            return [swap(member) for member in value.futures]
        if isinstance(value, Future):
            if value.link is not owner:
                raise ValueError(
                    f"The future of task {value.id} belongs to another app (or another"
                    " flask-execute extension): only futures of the app the call is"
                    " submitted for can be its arguments. Pass future.result() instead."
                )
            found.setdefault(value.id, value)
            return Placeholder(value.id)
        kind = type(value)
        if kind is list:
            return [swap(item) for item in value]
        if kind is tuple:
            return tuple(swap(item) for item in value)
        if kind is dict:
            return {key: swap(item) for key, item in value.items()}
        return value

    new_args = t.cast(tuple[t.Any, ...], swap(args))
    new_kwargs = t.cast(dict[str, t.Any], swap(kwargs))
    return new_args, new_kwargs, list(found.values())


def substitute(value: t.Any, results: Mapping[str, object]) -> t.Any:
    """``value`` with each :class:`Placeholder` replaced by ``results[its task id]``
    (the shapes :func:`split` makes)."""
    if isinstance(value, Placeholder):
        return results[value.task_id]
    kind = type(value)
    if kind is list:
        return [substitute(item, results) for item in value]
    if kind is tuple:
        return tuple(substitute(item, results) for item in value)
    if kind is dict:
        return {key: substitute(item, results) for key, item in value.items()}
    return value


def frame(task_ids: list[str], call: bytes) -> bytes:
    """The payload of a waiting call: its dependencies' ids, then the pickled call
    (so a worker reads the ids without unpickling anything)."""
    head = json.dumps(task_ids, separators=(",", ":")).encode()
    return len(head).to_bytes(4, "big") + head + call


def unframe(payload: bytes) -> tuple[list[str], bytes]:
    """The dependencies' ids and the pickled call of a (verified) framed payload.

    :raises ValueError: the payload is not framed.
    """
    size = int.from_bytes(payload[:4], "big")
    ids = json.loads(payload[4 : 4 + size])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not ids:
        raise ValueError("no dependency ids")
    return ids, payload[4 + size :]


def publish_options(options: Mapping[str, t.Any]) -> dict[str, object]:
    """The Celery options of a waiting call, as they travel in its signed header (the
    worker that publishes it uses these; a countdown counts from then).

    :raises ValueError: an option whose value cannot travel (named).
    """
    out: dict[str, object] = {}
    for name, value in options.items():
        if isinstance(value, datetime.datetime):
            value = {"datetime": value.isoformat()}
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"Option {name!r} cannot be used on a call that has futures among its"
                f" arguments (the worker that publishes it reads its options from the"
                f" signed envelope, as JSON); got {value!r}. Use a queue name, numbers"
                " or datetimes."
            ) from None
        out[name] = value
    return out


def restore_options(sent: object) -> dict[str, t.Any]:
    """The options :func:`publish_options` made, as ``apply_async`` takes them."""
    if not isinstance(sent, Mapping):
        return {}
    out: dict[str, t.Any] = {}
    for name, value in sent.items():
        if isinstance(value, Mapping) and isinstance(value.get("datetime"), str):
            value = datetime.datetime.fromisoformat(value["datetime"])
        out[str(name)] = value
    return out


def dependency_error(
    label: str, task_id: str, dependency: str, cause: BaseException
) -> DependencyError:
    """The error of call ``task_id`` (of ``label``) whose dependency failed with
    ``cause`` (a ``CancelledError``: it was cancelled)."""
    if isinstance(cause, concurrent.futures.CancelledError):
        what = "was cancelled"
    elif isinstance(cause, DependencyError):
        what = "did not run either (a dependency of its own did not succeed)"
    else:
        what = f"failed ({type(cause).__name__}: {cause})"
    return DependencyError(
        f"{label}[{task_id}] did not run: its dependency, task {dependency}, {what}.",
        dependency,
        cause,
    )


def settled(label: str, task_id: str, after: list[Future[t.Any]]) -> dict[str, object]:
    """The results of the finished futures an eager call ``task_id`` was given (eager
    mode resolves its dependencies inline).

    :raises DependencyError: one failed or was cancelled.
    :raises ValueError: one is not done (a future of a call that did not run eagerly).
    """
    values: dict[str, object] = {}
    for dep in after:
        if not dep.done():
            raise ValueError(
                f"Eager mode (CELERY_ALWAYS_EAGER) runs a call at once, but the future of"
                f" task {dep.id} it was given is not done: pass a future of an eager call."
            )
        if dep.cancelled():
            cause: BaseException = concurrent.futures.CancelledError(
                f"Task {dep.id} was cancelled."
            )
            raise dependency_error(label, task_id, dep.id, cause)
        exc = dep.exception(0)
        if exc is not None:
            raise dependency_error(label, task_id, dep.id, exc)
        values[dep.id] = dep.result(0)
    return values


# Register a waiting call. KEYS[1] its waiting key, KEYS[2] its unmet key, then per
# dependency its state key, claim key and dependents key; ARGV[1] the envelope, ARGV[2]
# the ttl, ARGV[3] the call's id, ARGV[3 + i] the dependencies' ids. A dependency is
# final when its state is, or its claim says cancelled (it never runs) or done (its
# state expired). Returns 0 (publish it now: nothing pending, or a dependency did not
# succeed) or how many it waits for.
_REGISTER = """
local n = (#KEYS - 2) / 3
local pending = {}
for i = 1, n do
    local status = nil
    local state = redis.call('get', KEYS[3 * i])
    if state then
        local ok, meta = pcall(cjson.decode, state)
        if ok and type(meta) == 'table' then status = meta['status'] end
    end
    if status == 'FAILURE' or status == 'REVOKED' then return 0 end
    if status ~= 'SUCCESS' then
        local claim = redis.call('get', KEYS[3 * i + 1])
        if claim == 'cancelled' or claim == 'done' then return 0 end
        pending[#pending + 1] = i
    end
end
if #pending == 0 then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
for _, i in ipairs(pending) do
    redis.call('sadd', KEYS[3 * i + 2], ARGV[3])
    redis.call('expire', KEYS[3 * i + 2], ARGV[2])
    redis.call('sadd', KEYS[2], ARGV[3 + i])
end
redis.call('expire', KEYS[2], ARGV[2])
return #pending
"""


Item = t.TypeVar("Item", bound=tuple[str, str, t.Any])


class Dependencies:
    """The futures among the arguments of one app's calls, and its waiting calls."""

    def __init__(self, controller: t.Any, ttl: int, owner: t.Any) -> None:
        """``controller`` is the app's ``celery.Celery``; ``ttl`` how long a waiting
        call is kept (as long as its envelope stays valid); ``owner`` the client whose
        futures can be arguments (its ``eager`` says whether calls run inline)."""
        self._controller = controller
        self.ttl = ttl
        self._owner = owner

    def take(
        self, label: str, task_id: str, args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
    ) -> tuple[tuple[t.Any, ...], dict[str, t.Any], list[str]]:
        """The arguments of call ``task_id`` with placeholders for the futures among
        them, and those futures' ids; eagerly, with their results in place.

        :raises DependencyError: eagerly, one of them failed or was cancelled.
        :raises ValueError, TypeError: a future that cannot be waited for (named).
        """
        args, kwargs, after = split(args, kwargs, self._owner)
        if not after:
            return args, kwargs, []
        if self._owner.eager:
            args, kwargs = substitute((args, kwargs), settled(label, task_id, after))
            return args, kwargs, []
        self.check()
        return args, kwargs, [future.id for future in after]

    def among(self, calls: list[Call]) -> bool:
        """Is there a future among the arguments of ``calls``?"""
        return any(_holds_future(args) or _holds_future(kwargs) for args, kwargs in calls)

    def refuse(self, calls: list[Call], chunksize: int) -> None:
        """:raises ValueError: a future among the arguments of a ``map`` chunk."""
        if self.among(calls):
            raise ValueError(
                f"map() with chunksize={chunksize} cannot take futures as arguments"
                " (the calls of a chunk travel together, in one message); use chunksize=1."
            )

    def hold(self, items: list[Item], waiting: Mapping[str, list[str]]) -> list[Item]:
        """Store the messages ``(task id, envelope, ...)`` that wait for dependencies
        (:meth:`register`); return the ones to publish now.

        :raises BrokerUnavailable: the result backend cannot be reached.
        """
        if not waiting:
            return items
        try:
            return [
                item
                for item in items
                if item[0] not in waiting or not self.register(item[0], item[1], waiting[item[0]])
            ]
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            url = maybe_sanitize_url(str(self._controller.conf.result_backend))
            raise BrokerUnavailable(
                f"Cannot reach the result backend at {url}: {exc}. Is it running?"
                " (CELERY_RESULT_BACKEND)"
            ) from exc

    def check(self) -> None:
        """:raises TypeError: the result backend is not Redis (it holds the waiting
        calls)."""
        backend = self._controller.backend
        if not isinstance(backend, RedisBackend):
            raise TypeError(
                "Futures as arguments need the Redis result backend (CELERY_RESULT_BACKEND"
                f" = 'redis://...'); this app uses {type(backend).__name__}."
            )

    def register(self, task_id: str, envelope: str, after: list[str]) -> bool:
        """Store call ``task_id`` to be published when ``after`` succeeded; False when
        it is to be published now (nothing pending, or a dependency failed)."""
        backend = self._controller.backend
        keys = [waiting_key(task_id), unmet_key(task_id)]
        for dep in after:
            keys += [backend.get_key_for_task(dep), claim_key(dep), dependents_key(dep)]
        pending = backend.client.eval(
            _REGISTER, len(keys), *keys, envelope, self.ttl, task_id, *after
        )
        return bool(pending)

"""The caller side of one app: prepare a call (sanitize, pickle, seal), publish it,
run it eagerly, cancel it, explain why it waits, and find it again by id.

``apply``, ``map_apply`` and the executor share one preparation path
(:meth:`Client.prepare`); the futures it returns are completed from outside, by the
result watcher (or by an eager run, :mod:`flask_execute.eager`), and reach back here
only through the narrow :class:`~flask_execute.futures.FutureLink` interface this
class implements.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import threading
import typing as t
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping

from celery import Task

from .bulk import collection_paused
from .capacity import Capacity
from .celery_conf import CeleryApp
from .claims import Claims
from .config import Settings
from .dependencies import Dependencies
from .dependencies import frame
from .dependencies import publish_options
from .eager import EagerRuns
from .envelopes import Codec
from .errors import BrokerUnavailable
from .errors import DependencyError
from .futures import Chunk
from .futures import Future
from .message_fields import lineage
from .options import check_options
from .options import not_before
from .outage import CONNECTION_ERRORS
from .outage import Endpoints
from .outcomes import Outcomes
from .pool import FuturePool
from .routing import Routes
from .serialization import dump_call
from .serialization import dump_calls
from .serialization import function_label
from .serialization import sanitize
from .waits import describe_wait
from .watcher import Watcher

__all__ = ["Client", "Prepared", "at_interpreter_exit"]

R = t.TypeVar("R")
_exiting = threading.Event()


def at_interpreter_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` when the interpreter starts to exit, before ``atexit`` handlers
    (where ``concurrent.futures`` runs its own shutdown), so that it can still use the
    local services those handlers stop."""
    register = getattr(threading, "_register_atexit", None)  # CPython >= 3.9
    if register is None:  # pragma: no cover - other interpreters
        atexit.register(hook)
    else:
        register(hook)


# like concurrent.futures: no new calls once the interpreter exits (an atexit hook that
# submits would start local workers during shutdown, and its call would be lost)
at_interpreter_exit(_exiting.set)
Handler: t.TypeAlias = Future[t.Any] | Chunk


@dataclasses.dataclass
class Prepared:
    """Calls ready to send: one ``(task id, envelope, handler)`` per message; what the
    watcher follows (each future under its task id, and each chunk under the chunk's,
    for what befalls the whole message); the futures in call order; how they travel."""

    items: list[tuple[str, str, Handler]]
    watched: list[tuple[str, Handler]]
    futures: list[Future[t.Any]]
    label: str
    options: dict[str, t.Any]
    task: Task
    #: the calls that wait for futures given as arguments: their dependencies' ids
    waiting: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, task_id: str, envelope: str, handler: Handler) -> None:
        self.items.append((task_id, envelope, handler))
        self.watched.append((task_id, handler))
        members = handler.members if isinstance(handler, Chunk) else [handler]
        self.watched += [(member.id, member) for member in members if member.id != task_id]
        self.futures += members


class Client:
    """Sends the calls of one app and keeps the futures' side of the bargain."""

    def __init__(
        self,
        celery_app: CeleryApp,
        codec: Codec,
        claims: Claims,
        outcomes: Outcomes,
        settings: Settings,
        watcher: Callable[[], Watcher],
        start: Callable[[], None],
        endpoints: Endpoints,
        app_context: Callable[[], t.ContextManager[object]],
        capacity: Capacity,
    ) -> None:
        self.celery_app = celery_app
        self._app_context = app_context
        self.controller = celery_app.controller
        self.codec = codec
        self.claims = claims
        self.outcomes = outcomes
        self.settings = settings
        self._watcher = watcher
        self._start = start
        self.endpoints = endpoints
        self.broker_url = endpoints.broker_url
        self.backend_url = endpoints.backend_url
        #: run every call inline (CELERY_ALWAYS_EAGER, or the eager test fixture)
        self.eager = settings.always_eager
        self.pickling: dict[str, t.Any] = {
            "models": "requery" if settings.sanitize_arguments else "refuse",
            "by_value": settings.pickle_by_value,
        }
        self.eager_runs = EagerRuns(outcomes)
        self.routes = Routes(celery_app.controller)
        self.capacity = capacity
        self.dependencies = Dependencies(self.controller, claims.ttl, self)

    # --- submitting ------------------------------------------------------------------
    def apply(
        self,
        func: Callable[..., R],
        args: Iterable[t.Any],
        kwargs: Mapping[str, t.Any] | None,
        options: dict[str, t.Any],
    ) -> Future[R]:
        """Send ``func(*args, **kwargs)``; return its future."""
        if not callable(func):
            raise TypeError(f"submit() needs a callable; got {func!r}.")
        prepared = self.prepare(func, [(tuple(args), dict(kwargs or {}))], options)
        self.send(prepared)
        return t.cast(Future[R], prepared.futures[0])

    def map_apply(
        self,
        func: Callable[..., R],
        calls: Iterable[t.Any],
        kwargs: Mapping[str, t.Any] | None,
        chunksize: int | None,
        options: dict[str, t.Any],
    ) -> FuturePool[R]:
        """Send one call per item of ``calls`` (a tuple or list is unpacked, anything
        else is the single argument), ``kwargs`` for each; return their pool.
        ``chunksize=None`` picks one from the number of calls and the concurrency of
        the queue's workers (:mod:`flask_execute.capacity`)."""
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive integer; got {chunksize!r}.")
        # many new objects that all live on (eager runs the calls here: collector on)
        with contextlib.nullcontext() if self.eager else collection_paused():
            queue = options.get("queue") or self.controller.conf.task_default_queue
            constant = dict(kwargs or {})
            prepared_calls = [
                (tuple(call) if isinstance(call, (tuple, list)) else (call,), dict(constant))
                for call in calls
            ]
            if chunksize is None:  # one message per call when futures are arguments
                waits = self.eager or self.dependencies.among(prepared_calls)
                chunksize = 1 if waits else self.capacity.chunksize(len(prepared_calls), queue)
            elif chunksize > 1:
                self.dependencies.refuse(prepared_calls, chunksize)
            prepared = self.prepare(func, prepared_calls, options, chunksize)
            self.send(prepared)
        return FuturePool(t.cast(list[Future[R]], prepared.futures))

    def prepare(
        self,
        func: Callable[..., t.Any],
        calls: list[tuple[tuple[t.Any, ...], dict[str, t.Any]]],
        options: dict[str, t.Any],
        chunksize: int = 1,
    ) -> Prepared:
        """Check the options, sanitize, pickle and seal ``calls`` of ``func``: one
        message per call, or per ``chunksize`` calls (a chunk, whose calls each keep
        their own task id, future and outcome: :mod:`flask_execute.chunks`).

        :raises SerializationError: an argument cannot be pickled (named).
        :raises TypeError, ValueError: a Celery option that cannot be used (named).
        """
        if _exiting.is_set():
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        check_options(options)
        options = dict(options)
        task = self.dispatch_for(options)
        label = function_label(func)
        queue = self.routes.queue_of(task, options)
        sanitized = [sanitize(*c) for c in calls] if self.settings.sanitize_arguments else calls
        reply = None
        if not self.eager:
            self._start()  # local services (the embedded broker, maybe) come first
            reply = self.watcher().reply_channel
        prepared = Prepared([], [], [], label, options, task)
        for start in range(0, len(sanitized), chunksize):
            batch = sanitized[start : start + chunksize]
            task_id = str(uuid.uuid4())
            if chunksize == 1:
                future: Future[t.Any] = Future(task_id, self, name=label, queue=queue)
                try:  # futures among the arguments (resolved inline when eager)
                    args, kwargs, after = self.dependencies.take(label, task_id, *batch[0])
                except DependencyError as error:
                    future.settle("FAILURE", exc=error)
                    prepared.futures.append(future)
                    continue
                payload, by_value = dump_call(func, args, kwargs, **self.pickling)
                if after:
                    prepared.waiting[task_id] = after
                    payload = frame(after, payload)
                envelope = self.seal_call(
                    task_id, payload, by_value, label, options, "call", task, reply, after
                )
                prepared.add(task_id, envelope, future)
                continue
            chunk = Chunk(task_id)
            members = [(str(uuid.uuid4()), args, kwargs) for args, kwargs in batch]
            payload, by_value = dump_calls(func, members, **self.pickling)
            envelope = self.seal_call(
                task_id, payload, by_value, label, options, "chunk", task, reply
            )
            chunk.members = [
                Future(mid, self, name=label, queue=queue, chunk=chunk) for mid, _, _ in members
            ]
            prepared.add(task_id, envelope, chunk)
        return prepared

    def send(self, prepared: Prepared) -> None:
        """Run the prepared calls eagerly, or start local services and publish them."""
        if self.eager:
            for task_id, envelope, handler in prepared.items:
                self.eager_runs.run(handler, task_id, envelope, prepared.task)
        elif prepared.items:
            self._start()
            self.publish(prepared, prepared.label, prepared.options, prepared.task)

    def seal_call(
        self,
        task_id: str,
        payload: bytes,
        by_value: bool,
        label: str,
        options: Mapping[str, t.Any],
        kind: str = "call",
        task: Task | None = None,
        reply: str | None = None,
        after: list[str] | None = None,
    ) -> str:
        """The call envelope of ``payload`` for task ``task_id``; ``reply`` is the
        channel of this process's result watcher; a call that waits for the
        futures ``after`` carries the options the worker that publishes it uses."""
        root, parent = lineage(task_id, self.controller.current_worker_task, after)
        extra: dict[str, object] = {
            "fn": label,
            "task": (task or self.celery_app.dispatch).name,
            "root": root,
            "parent": parent,
        }
        if reply is not None:  # workers publish this call's states there too
            extra["reply"] = reply
        if kind != "call":
            extra["k"] = kind
        if after:  # what the worker that publishes it needs
            extra.update(after=len(after), send=publish_options(options))
        return self.codec.seal(
            "call",
            task_id,
            payload,
            by_value=by_value,
            not_before=not_before(options),
            extra=extra,
        )

    def publish(
        self,
        prepared: Prepared,
        label: str,
        options: dict[str, t.Any],
        task: Task | None = None,
    ) -> None:
        """Publish envelopes (one producer connection for all of them), watching each
        task id before its message leaves."""
        task = task or self.celery_app.dispatch
        items = prepared.items
        watcher = self.watcher()
        watcher.watch_many(prepared.watched)
        try:
            # a call waiting for futures: published by the worker that finishes them
            items = self.dependencies.hold(items, prepared.waiting)
            parent = self.controller.current_worker_task
            with self.controller.producer_or_acquire() as producer:
                for task_id, envelope, _ in items:
                    root_id, parent_id = lineage(task_id, parent, prepared.waiting.get(task_id))
                    task.apply_async(
                        (envelope,),
                        task_id=task_id,
                        root_id=root_id,
                        parent_id=parent_id,
                        shadow=label,
                        argsrepr=f"<{label}>",
                        kwargsrepr="{}",
                        producer=producer,
                        **options,
                    )
        except CONNECTION_ERRORS as exc:
            for task_id, _ in prepared.watched:
                watcher.forget(task_id)
            if isinstance(exc, BrokerUnavailable):  # the result backend's (hold)
                raise
            # kombu already retried the publish (CELERY_BROKER_TIMEOUT bounds it)
            raise self.endpoints.unavailable("broker", exc) from exc

    def watcher(self) -> Watcher:
        """The running result watcher.

        :raises BrokerUnavailable: the result backend cannot be reached.
        """
        watcher = self._watcher()
        # ensure_running() waits (CELERY_BROKER_TIMEOUT) for its subscription: no retry
        self.endpoints.call("backend", watcher.ensure_running, retry=False)
        return watcher

    def dispatch_for(self, options: dict[str, t.Any]) -> Task:
        """Pick the dispatch task for these options (``acks_late`` is popped).

        (A countdown, ETA or run time longer than the Redis visibility timeout is
        fine: the worker holding the message renews its lease, :mod:`.leases`.)
        """
        late = options.pop("acks_late", None)
        if late is None:
            late = bool(self.controller.conf.task_acks_late)
        return self.celery_app.dispatch_late if late else self.celery_app.dispatch

    # --- finding a task again ----------------------------------------------------------
    def get(self, task_id: str) -> Future[t.Any]:
        """A future for a task submitted earlier (by any process)."""
        if self.eager:
            return self.eager_runs.get(task_id)
        future: Future[t.Any] = Future(task_id, self)
        self.follow(future)
        return future

    def follow(self, future: Future[t.Any]) -> None:
        """Move ``future`` along its task's states (a task of any process): the stored
        state now, then each change as the result watcher receives it."""
        # the stored state (and claim) now, then whatever it publishes: a task that
        # finished and whose result is gone fails with ResultExpired (the watcher reads
        # the claim and the state in one round trip, so a task just starting never does)
        watcher = self.watcher()
        self.endpoints.call("backend", lambda: watcher.watch(future.id, future, foreign=True))

    def unfollow(self, future: Future[t.Any]) -> None:
        """Stop delivering states to ``future`` (nobody follows it any more)."""
        self._watcher().unwatch(future.id, future)

    # --- the futures' link (FutureLink) ------------------------------------------------
    def cancel(self, future: Future[t.Any], terminate: bool) -> bool:
        """True when the task will never run (or, with ``terminate``, has been
        stopped)."""
        if self.eager:
            return False
        cancelled = self.endpoints.call("backend", lambda: self.claims.cancel(future.id))
        if not cancelled and not terminate:
            return False  # a worker claimed it first: it started
        # a member of a chunk has no message of its own: its claim is all it takes,
        # unless it runs and is to be stopped (its chunk's process then stops too)
        message = future.id if future.chunk is None else future.chunk.task_id
        if future.chunk is None or terminate:
            control = self.controller.control
            self.endpoints.call(
                "broker",
                lambda: control.revoke(message, terminate=terminate, signal="SIGTERM"),
            )
        if not terminate:
            self._watcher().release(future.id, future)  # settled here; nothing to wait for
        return True

    def hold(self, future: Future[t.Any]) -> None:
        """Keep delivering to ``future`` (and its chunk) while only its callbacks need
        it."""
        if self.eager:
            return
        watcher = self._watcher()
        watcher.hold(future.id, future)
        if future.chunk is not None:
            watcher.hold(future.chunk.task_id, future.chunk)

    def async_result(self, task_id: str) -> t.Any:
        return self.controller.AsyncResult(task_id)

    def callback_context(self) -> t.ContextManager[object]:
        """Done-callbacks run in an application context of this app."""
        return self._app_context()

    def describe_wait(self, future: Future[t.Any]) -> str:
        """Why a future is still pending, for its timeout error (asks the workers which
        queues they consume, for at most 0.3 s)."""
        return describe_wait(
            self.controller,
            future,
            self.celery_app.base_queue,
            self.settings.start_local_workers,
            self.broker_url,
        )

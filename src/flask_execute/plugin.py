"""The ``Celery`` extension: ``init_app``, ``submit``/``apply``/``map``/``get``,
``status``, ``start``/``stop``.

Nothing app-specific lives on the extension object: each app's Celery app, codec,
watcher and local services live in ``app.extensions["celery"]`` (a :class:`_State`).
"""

from __future__ import annotations

import logging
import time
import typing as t
import uuid
import weakref
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping

import celery as celery_module
from celery import Task
from flask import current_app
from flask import Flask
from flask import has_app_context
from kombu.exceptions import OperationalError
from werkzeug.local import LocalProxy

from .control import Control
from .control import Inspect
from .errors import BrokerUnavailable
from .errors import ResultExpired
from .executor import CeleryExecutor
from .futures import _Chunk
from .futures import Future
from .futures import FuturePool
from .options import check_options
from .options import RESERVED_OPTIONS
from .registry import apply_schedule
from .registry import register
from .registry import ScheduleRegistry
from .registry import TaskRegistry
from .serialization import dump_call
from .serialization import dump_calls
from .serialization import function_label
from .state import _safe_url
from .state import _State

__all__ = ["RESERVED_OPTIONS", "Celery"]
log = logging.getLogger(__name__)
P = t.ParamSpec("P")
R = t.TypeVar("R")


class Celery:
    """The flask-execute extension: Celery for a Flask app, configured from
    ``app.config``, with any function submittable and local workers in development.

    ``Celery(app)`` registers directly; ``Celery()`` then ``init_app(app)`` serves the
    factory pattern, and one instance may serve several apps. ``base_task`` is the
    Celery ``Task`` subclass every task of this extension derives from.
    """

    def __init__(self, app: Flask | None = None, *, base_task: type[Task] | None = None) -> None:
        self.base_task = base_task
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        #: ``@celery.task`` and ``celery.task.<name>``; see :class:`TaskRegistry`.
        self.task = TaskRegistry(self)
        #: ``@celery.schedule(...)``; see :class:`ScheduleRegistry`.
        self.schedule = ScheduleRegistry(self)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the extension on ``app``; validate and read its config once.

        :raises ConfigurationError: a config key has a wrong value (the message names
            the key and the accepted forms).
        :raises RuntimeError: the app already has flask-execute registered.
        """
        if "celery" in app.extensions:
            raise RuntimeError(
                "A 'Celery' instance has already been registered on this Flask app."
                " Import and use that instance instead."
            )
        state = _State(self, app)
        app.extensions["celery"] = state
        self._apps.add(app)
        for declaration in self.task.declarations():
            register(state, declaration)
        for entry in self.schedule.entries():
            apply_schedule(state, entry)
        from .cli import celery_cli

        app.cli.add_command(celery_cli)

    def _states(self) -> list[_State]:
        """The states of every app this extension serves."""
        return [app.extensions["celery"] for app in list(self._apps)]

    # --- which app --------------------------------------------------------------------
    def _get_state(self) -> _State:
        app: Flask | None = None
        if has_app_context():
            app = current_app._get_current_object()  # type: ignore[attr-defined]
            if app not in self._apps:
                app = None
        if app is None:
            apps = list(self._apps)
            if len(apps) == 1:
                app = apps[0]
            elif not apps:
                raise RuntimeError(
                    "The flask-execute extension is not registered on any app yet."
                    " Call 'celery.init_app(app)' (or 'Celery(app)') first; a submit at"
                    " import time, before the app exists, cannot work."
                )
            else:
                raise RuntimeError(
                    "This flask-execute extension serves several apps; push an app"
                    " context ('with app.app_context():') to pick one."
                )
        return t.cast(_State, app.extensions["celery"])

    @property
    def controller(self) -> celery_module.Celery:
        """The ``celery.Celery`` app of the current Flask app."""
        return self._get_state().controller

    # --- submitting --------------------------------------------------------------------
    def submit(self, func: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Run ``func(*args, **kwargs)`` on a worker; return its :class:`Future`.

        ``func`` needs no registration. Keyword arguments named in
        :data:`RESERVED_OPTIONS` (``queue``, ``countdown``, ``eta``, ``expires``,
        ``priority``, ``retry``, ``retry_policy``, ``time_limit``,
        ``soft_time_limit``, ``acks_late``) are Celery options; use :meth:`apply` when
        ``func`` itself takes one of those names.

        :raises SerializationError: an argument cannot be serialized (named).
        :raises BrokerUnavailable: the broker cannot be reached.
        """
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in RESERVED_OPTIONS}
        return self.apply(func, args, kwargs, **options)

    def apply(
        self,
        func: Callable[..., R],
        args: Iterable[t.Any] = (),
        kwargs: Mapping[str, t.Any] | None = None,
        **options: t.Any,
    ) -> Future[R]:
        """Like :meth:`submit`, with the arguments given explicitly and any
        ``apply_async`` option (``queue``, ``countdown``, ``eta``, ``routing_key``, …)."""
        if not callable(func):
            raise TypeError(f"submit() needs a callable; got {func!r}.")
        check_options(options)
        state = self._get_state()
        call_args, call_kwargs = _sanitize(state, tuple(args), dict(kwargs or {}))
        task_id = str(uuid.uuid4())
        payload, by_value = dump_call(func, call_args, call_kwargs, **state.pickling)
        label = function_label(func)
        task = state.dispatch_for(options)
        envelope = state.seal_call(task_id, payload, by_value, label, options, task=task)
        future: Future[R] = Future(task_id, state, name=label, queue=options.get("queue"))
        if state.eager:
            state.run_eager(future, task_id, envelope, task)
            return future
        state.ensure_started()
        state.publish([(task_id, envelope, future)], label, options, task)
        return future

    def map(
        self,
        func: Callable[..., R],
        *calls: t.Any,
        chunksize: int | None = None,
        **kwargs: t.Any,
    ) -> FuturePool[R]:
        """Run ``func`` once per positional argument; return a :class:`FuturePool`.

        Each positional argument is ONE call's arguments: a tuple or list is unpacked
        (``map(add, [1, 2], [3, 4])`` runs ``add(1, 2)`` and ``add(3, 4)``), anything
        else is passed as the single argument. Keyword arguments are passed to every
        call (reserved option names excepted). ``chunksize=n`` sends ``n`` calls per
        message (fewer broker round trips; the members of a chunk finish together).
        """
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in RESERVED_OPTIONS}
        return self.map_apply(func, calls, kwargs, chunksize=chunksize, **options)

    def map_apply(
        self,
        func: Callable[..., R],
        calls: Iterable[t.Any],
        kwargs: Mapping[str, t.Any] | None = None,
        *,
        chunksize: int | None = None,
        **options: t.Any,
    ) -> FuturePool[R]:
        """:meth:`map` with the calls, the constant keyword arguments and any
        ``apply_async`` option given explicitly (as :meth:`apply` is to :meth:`submit`)."""
        kwargs = dict(kwargs or {})
        check_options(options)
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive integer; got {chunksize!r}.")
        state = self._get_state()
        label = function_label(func)
        queue = options.get("queue")
        task = state.dispatch_for(options)
        prepared = []
        for call in calls:
            call_args = tuple(call) if isinstance(call, (tuple, list)) else (call,)
            prepared.append(_sanitize(state, call_args, dict(kwargs)))
        futures: list[Future[R]] = []
        items: list[tuple[str, str, Future[t.Any] | _Chunk]] = []
        size = chunksize or 1
        for start in range(0, len(prepared), size):
            batch = prepared[start : start + size]
            task_id = str(uuid.uuid4())
            if chunksize is None:
                payload, by_value = dump_call(func, *batch[0], **state.pickling)
                envelope = state.seal_call(task_id, payload, by_value, label, options, task=task)
                future: Future[R] = Future(task_id, state, name=label, queue=queue)
                futures.append(future)
                items.append((task_id, envelope, future))
            else:
                payload, by_value = dump_calls(func, batch, **state.pickling)
                envelope = state.seal_call(
                    task_id, payload, by_value, label, options, "chunk", task
                )
                members: list[Future[R]] = [
                    Future(task_id, state, name=label, queue=queue) for _ in batch
                ]
                chunk = _Chunk(task_id, t.cast(list[Future[t.Any]], members))
                for member in members:
                    member._chunk = chunk
                futures.extend(members)
                items.append((task_id, envelope, chunk))
        if state.eager:
            for task_id, envelope, handler in items:
                state.run_eager(handler, task_id, envelope, task)
        elif items:
            state.ensure_started()
            state.publish(items, label, options, task)
        return FuturePool(futures)

    def get(self, task_id: str) -> Future[t.Any]:
        """A :class:`Future` for a task submitted earlier (by any process)."""
        state = self._get_state()
        if state.eager:
            found = state.eager_futures.get(task_id)
            if found is None:
                raise LookupError(
                    f"No eager task {task_id!r} is known: eager mode (CELERY_ALWAYS_EAGER)"
                    " keeps no result store, only futures still referenced somewhere."
                )
            return found
        future: Future[t.Any] = Future(task_id, state)
        state.watcher_or_error().watch(task_id, future, catch_up=True)
        if not future.done() and future.state == "PENDING" and state.claims.claimed(task_id):
            # it ran (a worker claimed it and would have stored STARTED at least), but
            # the backend has nothing any more: the result expired
            future._finish("FAILURE", exc=ResultExpired(task_id))
        return future

    def executor(self, **options: t.Any) -> CeleryExecutor:
        """A :class:`concurrent.futures.Executor` on this app's workers (stdlib
        semantics; ``options`` are Celery options for every call, e.g. ``queue=``)."""
        return CeleryExecutor(self, **options)

    # --- local services and operations -----------------------------------------------
    def start(self) -> None:
        """Start the local services now (normally done by the first ``submit``).

        :raises ServiceStartError: with the tail of the failing service's log.
        """
        state = self._get_state()
        if state.is_child or state.eager:
            return
        with state._start_lock:
            state.services.start()
            state._started = True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the local services this process started (idempotent). Running tasks get
        ``timeout`` seconds to finish; queued tasks stay in the broker."""
        self._get_state().stop(timeout)

    def status(self, timeout: float = 1.0) -> dict[str, str]:
        """``{"name@host": "OK"}`` for every worker answering a broadcast ping.

        Returns as soon as every expected local worker answered, else after
        ``timeout`` seconds.
        """
        state = self._get_state()
        expected = set(state.services.expected_nodes()) if state.services.running else set()
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        try:
            while True:
                # A worker that just started may miss one broadcast (its pidbox
                # subscription is asynchronous): ask again until all answered.
                left = deadline - time.monotonic()
                wait = min(left, 0.3) if expected else left
                seen.update(state.ping(timeout=max(wait, 0.01), limit=len(expected) or None))
                if not expected or expected <= set(seen) or time.monotonic() >= deadline:
                    return seen
        except (OperationalError, OSError) as exc:
            raise BrokerUnavailable(
                f"Cannot reach the Celery broker at {_safe_url(state.broker_url)}: {exc}."
            ) from exc

    @property
    def inspect(self) -> Inspect:
        """``celery.inspect.ping()`` / ``active()`` / ``stats()`` …, in process."""
        state = self._get_state()
        limit = len(state.settings.workers) if state.services.running else None
        return Inspect(state.controller, limit or None)

    @property
    def control(self) -> Control:
        """``celery.control.shutdown()`` / ``pool_grow(1)`` / ``autoscale(5, 1)`` …, in
        process, with replies."""
        state = self._get_state()
        limit = len(state.settings.workers) if state.services.running else None
        return Control(state.controller, limit or None)


def _sanitize(
    state: _State, args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
) -> tuple[tuple[t.Any, ...], dict[str, t.Any]]:
    """Resolve Werkzeug ``LocalProxy`` arguments (CELERY_SANITIZE_ARGUMENTS)."""
    if not state.settings.sanitize_arguments:
        return args, kwargs

    def resolve(value: t.Any) -> t.Any:
        if isinstance(value, LocalProxy):
            return value._get_current_object()
        return value

    return tuple(resolve(a) for a in args), {k: resolve(v) for k, v in kwargs.items()}

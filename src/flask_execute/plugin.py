"""The ``Celery`` extension: ``init_app``, ``submit``/``apply``/``map``/``get``,
``status``, ``start``/``stop``.

``app.extensions["celery"]`` is the extension object itself (as Flask-SQLAlchemy and
Flask-Execute 0.1.6 store themselves), so ``current_app.extensions["celery"].submit``
works. Nothing app-specific lives on it: each app's Celery app, codec, watcher and
local services live in that app's :class:`~flask_execute.runtime.Runtime`
(:meth:`Celery.runtime`). The extension picks the app and delegates.
"""

from __future__ import annotations

import gc
import logging
import typing as t
import weakref
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping

import celery as celery_module
from celery import Task
from flask import current_app
from flask import Flask
from flask import has_app_context

from .cli import celery_cli
from .control import Control
from .control import Inspect
from .executor import CeleryExecutor
from .futures import Future
from .options import RESERVED_OPTIONS
from .pool import FuturePool
from .registry import apply_schedule
from .registry import register
from .registry import ScheduleRegistry
from .registry import TaskRegistry
from .runtime import Runtime

__all__ = ["RESERVED_OPTIONS", "Celery"]
log = logging.getLogger(__name__)
P = t.ParamSpec("P")
R = t.TypeVar("R")
_RUNTIME_KEY = "celery.runtime"


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
        self.schedule = ScheduleRegistry(self, self.task)
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
        state = Runtime(app, self.base_task)
        app.extensions["celery"] = self
        # the runtime lives as long as its app (it refers to the app: a weak mapping
        # from app to runtime would keep every app alive)
        app.extensions[_RUNTIME_KEY] = state
        self._apps.add(app)
        for declaration in self.task.declarations():
            register(state, declaration)
        for entry in self.schedule.entries():
            apply_schedule(state, entry)
        app.cli.add_command(celery_cli)
        state.start_in_dev_server()

    def runtimes(self) -> list[Runtime]:
        """The runtimes of every app this extension serves."""
        return [app.extensions[_RUNTIME_KEY] for app in list(self._apps)]

    # --- which app --------------------------------------------------------------------
    def runtime(self, app: Flask | None = None) -> Runtime:
        """The :class:`~flask_execute.runtime.Runtime` of ``app`` (default: the current
        app, or the only one served): its Celery app (``.controller``), codec, local
        services. For tools and tests; applications need only this extension.

        :raises RuntimeError: no app is registered, or several are and none is current.
        """
        if app is not None:
            if app not in self._apps:
                raise RuntimeError(
                    f"The app {app.import_name!r} does not use this flask-execute extension:"
                    " call 'celery.init_app(app)' first."
                )
            return t.cast(Runtime, app.extensions[_RUNTIME_KEY])
        return self._get_state()

    def _get_state(self) -> Runtime:
        app: Flask | None = None
        if has_app_context():
            app = current_app._get_current_object()  # type: ignore[attr-defined]
            if app not in self._apps:
                app = None
        if app is None:
            apps = list(self._apps)
            if len(apps) > 1:
                # an app nobody uses any more may live on in reference cycles (the
                # app of an earlier test, say) until the collector runs: collect
                # before calling the choice ambiguous (a path that otherwise raises)
                del apps
                gc.collect()
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
        return t.cast(Runtime, app.extensions[_RUNTIME_KEY])

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
        return self._get_state().client.apply(func, args, kwargs, options)

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
        message (fewer broker round trips; each call still resolves on its own);
        ``None`` chooses from the number of calls and the queue's worker
        concurrency (:func:`flask_execute.capacity.auto_chunksize`), ``1`` sends one
        message per call.
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
        return self._get_state().client.map_apply(func, calls, kwargs, chunksize, options)

    def get(self, task_id: str) -> Future[t.Any]:
        """A :class:`Future` for a task submitted earlier (by any process)."""
        return self._get_state().client.get(task_id)

    def executor(self, **options: t.Any) -> CeleryExecutor:
        """A :class:`concurrent.futures.Executor` on this app's workers (stdlib
        semantics; ``options`` are Celery options for every call, e.g. ``queue=``)."""
        return CeleryExecutor(self._get_state().client, **options)

    # --- local services and operations -----------------------------------------------
    def start(self) -> None:
        """Start the local services now (normally done by the first ``submit``).

        :raises BrokerUnavailable: the broker does not answer (nothing was started).
        :raises ServiceStartError: with the tail of the failing service's log.
        """
        self._get_state().start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the local services this process started (idempotent). Running tasks get
        ``timeout`` seconds to finish; queued tasks stay in the broker."""
        self._get_state().stop(timeout)

    def status(self, timeout: float = 1.0) -> dict[str, str]:
        """``{"name@host": "OK"}`` for every worker answering a broadcast ping.

        Returns as soon as every expected local worker answered, else after
        ``timeout`` seconds.
        """
        return self._get_state().status(timeout)

    @property
    def logs(self) -> list[str]:
        """The log files of the local services this process runs for the current app
        (workers, beat, Flower; as Flask-Execute 0.1.6's ``celery.logs``); empty when it
        runs none."""
        return [child.log_path for child in self._get_state().services.children]

    @property
    def inspect(self) -> Inspect:
        """``celery.inspect.ping()`` / ``active()`` / ``stats()`` …, in process."""
        state = self._get_state()
        limit = len(state.settings.workers) if state.services.running else None
        return Inspect(state.controller, limit or None, state.endpoints)

    @property
    def control(self) -> Control:
        """``celery.control.shutdown()`` / ``pool_grow(1)`` / ``autoscale(5, 1)`` …, in
        process, with replies."""
        state = self._get_state()
        limit = len(state.settings.workers) if state.services.running else None
        return Control(state.controller, limit or None, state.endpoints)

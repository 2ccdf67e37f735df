"""Every task body runs inside an application context of the app that owns it.

:func:`make_task_class` builds the base class of every task of one app (dispatch,
registered and scheduled tasks): it derives from the user's ``base_task`` (Celery's
``Task`` by default) and pushes a fresh app context around each run, popping it (and
so running ``teardown_appcontext``) in ``finally``. :data:`current_task` is a proxy to
the running task, falsy outside one.
"""

from __future__ import annotations

import contextlib
import typing as t
from collections.abc import Iterator
from contextvars import ContextVar

from celery import Task
from werkzeug.local import LocalProxy

if t.TYPE_CHECKING:
    from flask import Flask

__all__ = ["current_task", "eager_run", "eager_run_active", "make_task_class", "task_running"]

_no_task_msg = """\
Working outside of a task.

This typically means that you used `current_task` in code that is not running inside a
Celery task (submitted with `celery.submit`, registered with `@celery.task` or run by
beat). Check `if current_task:` first when the code runs both ways.\
"""

_cv_task: ContextVar[Task] = ContextVar("flask_execute.task")

#: The Celery task currently executing (``current_task.request.id``, also
#: ``current_task.id``; ``current_task.update_state(state="PROGRESS", meta={...})``).
#: Falsy outside a task.
current_task: Task = LocalProxy(_cv_task, unbound_message=_no_task_msg)

# Eager runs report progress straight to the Future waiting on them (no backend).
_eager_listeners: ContextVar[t.Callable[[str, object], None] | None] = ContextVar(
    "flask_execute.eager_listener", default=None
)


@contextlib.contextmanager
def eager_run(listener: t.Callable[[str, object], None]) -> Iterator[None]:
    """Run a task eagerly in this thread: its ``update_state`` calls go to
    ``listener(state, meta)`` instead of a result backend."""
    token = _eager_listeners.set(listener)
    try:
        yield
    finally:
        _eager_listeners.reset(token)


def task_running() -> bool:
    """True inside the body of a task of ours (submitted, registered or scheduled)."""
    return _cv_task.get(None) is not None


def eager_run_active() -> bool:
    """True while this thread runs a task eagerly (``CELERY_ALWAYS_EAGER``) for a call of
    ours. This, never Celery's ``request.is_eager`` (a message field anyone who can write
    to the broker can set), tells the dispatch task that no broker is involved."""
    return _eager_listeners.get() is not None


def make_task_class(flask_app: Flask, base: type[Task] | None) -> type[Task]:
    """Return the task base class for ``flask_app``, derived from ``base``."""
    base = base or Task

    class FlaskTask(base):  # type: ignore[valid-type,misc]
        abstract = True

        def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
            token = _cv_task.set(self)
            try:
                with flask_app.app_context():
                    return super().__call__(*args, **kwargs)
            finally:
                _cv_task.reset(token)

        @property
        def id(self) -> str | None:
            """The running task's id: ``current_task.id`` is ``current_task.request.id``
            (Flask-Execute 0.1.6's ``current_task`` was the request, so its users
            wrote ``.id``)."""
            return t.cast("str | None", self.request.id)

        def update_state(
            self,
            task_id: str | None = None,
            state: str | None = None,
            meta: t.Any = None,
            **kwargs: t.Any,
        ) -> None:
            listener = _eager_listeners.get()
            if listener is not None and (task_id is None or task_id == self.request.id):
                listener(state or "PENDING", meta)
                return
            super().update_state(task_id, state, meta, **kwargs)

    FlaskTask.__name__ = FlaskTask.__qualname__ = f"FlaskTask[{base.__name__}]"
    FlaskTask.__module__ = base.__module__
    return FlaskTask

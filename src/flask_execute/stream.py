"""A task's states as server-sent events, for a browser to follow it live.

``return stream(task_id)`` from a Flask view answers with ``text/event-stream``: the
task's current state at once, then each change the moment the process's result watcher
receives it (:mod:`flask_execute.watcher`; nothing polls the result backend), then one
``end`` event with the final state, and the response ends::

    event: state
    data: {"state": "PENDING"}

    event: state
    data: {"info": {"done": 3, "total": 10}, "state": "PROGRESS"}

    event: end
    data: {"state": "SUCCESS"}

What a follower sees is decided here, as for anyone holding the task id, because ids
leak (URLs, logs, ``Referer`` headers, Flower): the state name always; the ``meta`` a
task gives ``current_task.update_state`` for a state of its own (``info=``, shown by
default: it is what a task publishes for observers); the return value and the
exception only when the view asks (``result=``, ``error=``). Celery's own metas
(``STARTED``'s hostname and pid, ``RETRY``'s exception) and tracebacks are never sent.
Who may follow which task is the view's decision, like any other Flask view.

The stream holds no thread and no timer of its own: it waits in the request's thread on
a queue the watcher fills. It ends after ``idle_timeout`` seconds without a change (the
browser's ``EventSource`` then reconnects and re-attaches), and a comment every
``heartbeat`` seconds finds out that the client has gone; either way the watcher stops
following the task for this stream.
"""

from __future__ import annotations

import logging
import queue
import re
import time
import typing as t
from collections.abc import Callable
from collections.abc import Generator
from collections.abc import Iterator

from celery import states
from flask import current_app
from flask import Flask
from flask import Response
from werkzeug.exceptions import NotFound

from .client import Client
from .futures import Future
from .futures import READY

__all__ = ["EVENT_STREAM", "stream"]

log = logging.getLogger(__name__)

#: The media type of the response.
EVENT_STREAM = "text/event-stream"
# what a Celery task id may look like here (ours are UUIDs); anything else is refused
# before it reaches the result backend
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}")
# the line breaks of the event-stream format (and only those: not U+2028 and the like)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# one thing to send: (event name, JSON-ready payload); None ends the queue
_Event: t.TypeAlias = tuple[str, dict[str, object]]

Summary: t.TypeAlias = bool | Callable[[t.Any], object]


class _Feed(Future[t.Any]):
    """A future that also queues each state it is moved to, for one stream."""

    def __init__(self, task_id: str, client: Client) -> None:
        super().__init__(task_id, client)
        self.events: queue.SimpleQueue[tuple[str, object, BaseException | None]] = (
            queue.SimpleQueue()
        )
        self.received = False

    def set_progress(self, state: str, info: object = None) -> None:
        with self._condition:
            if self.done():
                return
            super().set_progress(state, info)
            self.received = True
            self.events.put((state, info, None))

    def settle(self, state: str, value: object = None, exc: BaseException | None = None) -> None:
        with self._condition:
            if self.done():
                return
            self.received = True
            self.events.put((state, value, exc))
        super().settle(state, value, exc)

    def begin(self) -> None:
        """What the stream shows first when nothing is stored yet: ``PENDING`` (a
        queued task, or an id nobody submitted: Celery cannot tell them apart)."""
        with self._condition:
            if not self.received:
                self.events.put(("PENDING", None, None))


def stream(
    task_id: str,
    *,
    info: Summary = True,
    result: Summary = False,
    error: Summary = False,
    idle_timeout: float = 60.0,
    heartbeat: float = 15.0,
    retry: float = 2.0,
) -> Response:
    """A ``text/event-stream`` response following task ``task_id`` until it is final.

    Events: ``state`` (``{"state": ...}``, with ``"info"`` for a task's own states),
    ``end`` (the final state, then the response ends) and ``idle`` (no change for
    ``idle_timeout`` seconds; the response ends and the browser reconnects after
    ``retry`` seconds).

    ``info``, ``result`` and ``error`` choose what a follower sees of a progress meta,
    the return value and the exception: ``False`` nothing, ``True`` the meta or value
    itself (it must be JSON-serializable) or ``"ExceptionType: message"``, or a
    function returning what to show. Call it in a view that has decided the current
    user may follow this task.

    :raises NotFound: ``task_id`` cannot be a task id (404).
    :raises BrokerUnavailable: the result backend cannot be reached.
    :raises RuntimeError: no flask-execute extension on the current app.
    """
    if not isinstance(task_id, str):
        raise TypeError(f"'task_id' must be a str (a task id); got {type(task_id).__name__}.")
    for name, value in (("idle_timeout", idle_timeout), ("heartbeat", heartbeat)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name!r} must be a number of seconds above 0; got {value!r}.")
    if not _TASK_ID.fullmatch(task_id):
        raise NotFound(f"{task_id[:80]!r} is not a task id.")
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    client = _client(app)
    show = _Show(app, info, result, error)
    if client.eager:
        try:
            done = client.get(task_id)
        except LookupError as exc:
            raise NotFound(str(exc)) from None
        events: t.Iterable[str] = _finished(done, show, retry)
    else:
        feed = _Feed(task_id, client)
        client.follow(feed)
        feed.begin()
        events = _Events(feed, client, show, idle_timeout, heartbeat, retry)
    response = Response(events, mimetype=EVENT_STREAM)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


def _client(app: Flask) -> Client:
    extension = app.extensions.get("celery")
    runtime = getattr(extension, "runtime", None)
    if runtime is None:
        raise RuntimeError(
            f"The app {app.import_name!r} has no flask-execute extension:"
            " call 'celery.init_app(app)' first."
        )
    return t.cast(Client, runtime(app).client)


class _Show:
    """What a follower is shown of the states of one task."""

    def __init__(self, app: Flask, info: Summary, result: Summary, error: Summary) -> None:
        for name, value in (("info", info), ("result", result), ("error", error)):
            if not isinstance(value, bool) and not callable(value):
                raise TypeError(
                    f"{name!r} must be True, False or a function returning what to show;"
                    f" got {value!r}."
                )
        self.app = app
        self.info = info
        self.result = result
        self.error = error

    def event(self, state: str, value: object, exc: BaseException | None) -> _Event:
        """The event for one state (``end`` once it is final)."""
        payload: dict[str, object] = {"state": state}
        if state not in READY:
            # Celery's own states carry Celery's meta (hostname, pid, a retry's
            # exception); only a task's own states carry what it chose to publish
            if state not in states.ALL_STATES and value is not None:
                self._add(payload, "info", self.info, value)
            return "state", payload
        if state == states.SUCCESS:
            self._add(payload, "result", self.result, value)
        elif state == states.FAILURE and exc is not None:
            self._add(payload, "error", self.error, exc)
        return "end", payload

    def _add(self, payload: dict[str, object], key: str, how: Summary, value: t.Any) -> None:
        if how is False:
            return
        try:
            if how is True:
                shown = f"{type(value).__name__}: {value}" if key == "error" else value
            else:
                with self.app.app_context():  # a summary may read the config, a database
                    shown = how(value)
            self.app.json.dumps(shown)  # fails here, not half-way through a line
        except Exception as exc:
            log.error(
                "flask-execute: the %s of a task could not be shown in its event stream"
                " (%s: %s); pass %s= a function returning JSON-serializable data.",
                key,
                type(exc).__name__,
                exc,
                key,
            )
            return
        payload[key] = shown

    def encode(self, event: _Event) -> str:
        """One event: its name, its payload as JSON on ``data:`` lines."""
        name, payload = event
        # JSON escapes the line breaks inside strings, so nothing a task (or a forged
        # state) stores can start a line; the only breaks are an indenting JSON
        # provider's whitespace, sent as several data lines (the browser rejoins them)
        lines = _LINE_BREAK.split(self.app.json.dumps(payload))
        return f"event: {name}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


def _finished(future: Future[t.Any], show: _Show, retry: float) -> Iterator[str]:
    """An eager run's events: it is final already."""
    yield f"retry: {int(retry * 1000)}\n\n"
    if future.cancelled():
        yield show.encode(show.event(states.REVOKED, None, None))
        return
    exc = future.exception(0)
    value = None if exc is not None else future.result(0)
    yield show.encode(show.event(future.state, value, exc))


class _Events:
    """The response body of one stream; closing it (the server does, also when the
    client has gone) stops following the task."""

    def __init__(
        self,
        feed: _Feed,
        client: Client,
        show: _Show,
        idle_timeout: float,
        heartbeat: float,
        retry: float,
    ) -> None:
        self._feed: _Feed | None = feed
        self._client = client
        self._body = self._run(feed, show, idle_timeout, heartbeat, retry)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._body)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop following the task (idempotent)."""
        self._body.close()
        feed, self._feed = self._feed, None
        if feed is not None:
            self._client.unfollow(feed)

    @staticmethod
    def _run(
        feed: _Feed, show: _Show, idle_timeout: float, heartbeat: float, retry: float
    ) -> Generator[str, None, None]:
        yield f"retry: {int(retry * 1000)}\n\n"
        last: _Event | None = None
        idle_until = time.monotonic() + idle_timeout
        while True:
            left = idle_until - time.monotonic()
            if left <= 0:
                yield show.encode(("idle", {"state": feed.state}))
                return
            try:
                state, value, exc = feed.events.get(timeout=min(heartbeat, left))
            except queue.Empty:
                if idle_until - time.monotonic() > 0:
                    yield ": keep-alive\n\n"  # a client that has gone fails this write
                continue
            event = show.event(state, value, exc)
            if event == last:  # the same state read twice (a sweep, a second channel)
                continue
            last = event
            idle_until = time.monotonic() + idle_timeout
            yield show.encode(event)
            if event[0] == "end":
                return

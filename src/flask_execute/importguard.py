"""A worker imports the user's code to build the Flask app: code that *submits* at
import time would run again inside the worker. Refuse it there, at once, saying why.

A local worker (and beat, and Flower) builds the app by importing the module or the
script that built it in the web process (:mod:`flask_execute.locator`). A script whose
top level submits a call (``future = celery.submit(add, 1, 2)`` outside ``if __name__
== "__main__":``) would submit that call again from inside every worker, before the
worker consumes anything, then wait for a result no worker can produce. Like
:mod:`multiprocessing` and Dask, we stop the worker instead, with the cause and the
fix; the web process's start-up wait sees the worker exit and quotes its log.

The check uses Celery's public ``before_task_publish`` signal, so every way of
sending (``submit``, ``map``, ``executor()``, a registered task's ``delay``) is
covered. It raises a ``BaseException``: Celery logs and swallows an ``Exception``
raised by a signal receiver.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import os
import sys
import tokenize
import types
import typing as t
from collections.abc import Iterator

__all__ = ["ImportTimeCall", "refuse_calls_while_importing"]

# frames of these packages are the machinery between the user's line and the publish
_MACHINERY = ("flask_execute", "celery", "kombu", "importlib", "flask", "werkzeug", "click")


class ImportTimeCall(RuntimeError):
    """The user's code sent a task while a worker was importing it to build the app."""


class _Stop(BaseException):
    def __init__(self, where: tuple[str, int] | None) -> None:
        super().__init__(where)
        self.where = where


def _user_line(frame: types.FrameType | None) -> tuple[str, int] | None:
    """File and line of the innermost module-level user code on the stack: the line
    of the imported module that leads to the publish."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if (
            frame.f_code.co_name == "<module>"
            and module.split(".")[0] not in _MACHINERY
            and not frame.f_code.co_filename.startswith("<frozen")
        ):
            return frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back
    return None


def _code(path: str, line: int) -> str:
    """The source line, without its comment."""
    source = linecache.getline(path, line).strip()
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return source  # a line of a statement spanning several: quote it as it is
    comment = next((tok for tok in tokens if tok.type == tokenize.COMMENT), None)
    return source[: comment.start[1]].rstrip() if comment else source


def explain(where: tuple[str, int] | None) -> str:
    """The error a worker stops with: what ran, where, why it is wrong, and the fix."""
    if where is None:
        place, code, path = "The code that builds the Flask app", "", "it"
    else:
        path, line = os.path.abspath(where[0]), where[1]
        source = _code(where[0], line)
        code = f" (line {line}: `{source}`)" if source else f" (line {line})"
        place = path
    return (
        f"{place} sends a task when it is imported{code}. A worker imports {path} to"
        " build the same Flask app as the web process, so that code would run again"
        " here, in every worker, at start-up. Put the code that submits under"
        ' `if __name__ == "__main__":` at the bottom of the script (it then runs only'
        " when you run the script itself), or in a function, a view or a CLI command."
    )


@contextlib.contextmanager
def refuse_calls_while_importing() -> Iterator[None]:
    """While the body runs (the worker building the app), any task published in this
    process stops the import; it surfaces as :class:`ImportTimeCall`."""
    from celery import signals

    def refuse(**_: t.Any) -> None:
        raise _Stop(_user_line(sys._getframe(1)))

    signals.before_task_publish.connect(refuse, weak=False)
    try:
        yield
    except _Stop as stop:
        raise ImportTimeCall(explain(stop.where)) from None
    finally:
        signals.before_task_publish.disconnect(refuse)

"""Source lines of code sent by value, so that remote tracebacks show them.

cloudpickle names every code object it sends by value ``<dynamic-code>``, so a
traceback from a lambda, a closure or a ``__main__`` function read ``File
"<dynamic-code>"`` with no source line. Here such a code object keeps its real file name
and carries the lines it spans; the worker puts them in :mod:`linecache` under that
name before it builds the code object (only where its own copy of the file, if any,
differs), so ``traceback`` formats them as for any other code.
"""

from __future__ import annotations

import linecache
import threading
import types
import typing as t

import cloudpickle

__all__ = ["reduce_code"]

_lock = threading.Lock()


def reduce_code(code: types.CodeType) -> tuple[t.Any, ...]:
    """Reduce ``code`` as cloudpickle does, plus its file name and source lines."""
    rebuild, args = cloudpickle.cloudpickle._code_reduce(code)
    filename = code.co_filename
    first = code.co_firstlineno
    numbers = [line for _, _, line in code.co_lines() if line is not None]
    last = max(numbers, default=first)
    lines = linecache.getlines(filename)[first - 1 : last] if first > 0 else []
    return _rebuild_code, (rebuild, args, filename, first, lines)


def _rebuild_code(
    rebuild: t.Callable[..., types.CodeType],
    args: tuple[t.Any, ...],
    filename: str,
    first: int,
    lines: list[str],
) -> types.CodeType:
    if lines:
        _remember(filename, first, lines)
    return rebuild(*args).replace(co_filename=filename)


def _remember(filename: str, first: int, lines: list[str]) -> None:
    """Make ``lines`` (from line ``first``) of ``filename`` what linecache shows."""
    with _lock:
        known = list(linecache.getlines(filename))
        if known[first - 1 : first - 1 + len(lines)] == lines:
            return  # this process sees the same source already
        if len(known) < first - 1 + len(lines):
            known += ["\n"] * (first - 1 + len(lines) - len(known))
        known[first - 1 : first - 1 + len(lines)] = lines
        # no mtime: linecache.checkcache() keeps the entry instead of re-reading a file
        linecache.cache[filename] = (sum(map(len, known)), None, known, filename)

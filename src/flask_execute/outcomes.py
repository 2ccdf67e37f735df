"""What a task's outcome means for the process that receives it.

:func:`contained` keeps a ``BaseException`` that is not an ``Exception``
(``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``, ``asyncio.CancelledError``,
...) from unwinding the process that receives it: it travels as
:class:`RemoteError`.
"""

from __future__ import annotations

import reprlib

from .errors import RemoteError

__all__ = ["contained"]

_short = reprlib.Repr()
_short.maxlevel = 3
_short.maxstring = 200
_short.maxother = 200


def contained(exc: BaseException, tb_text: str = "", note: str = "") -> BaseException:
    """``exc`` itself when it is an :class:`Exception`; otherwise a :class:`RemoteError`
    naming it, so that a task's ``SystemExit``, ``KeyboardInterrupt``,
    ``GeneratorExit`` or ``asyncio.CancelledError`` never unwinds the process that
    receives it. ``note`` is appended to the message."""
    if isinstance(exc, Exception):
        return exc
    return RemoteError(_type_name(type(exc)), f"the task raised {_short.repr(exc)}{note}", tb_text)


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"

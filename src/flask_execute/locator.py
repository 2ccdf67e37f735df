"""How a worker process will find (build) the same Flask app as the process that
starts it: a *locator* recorded at ``init_app``.

The locator names the module attribute holding the app, the factory function that
built it (found on the call stack), a script file run as ``python app.py``, or — for
apps built anywhere else (a test body, a notebook, ``python -c``, a script piped to
``python -``) — a bare app of the same name.
:mod:`flask_execute.boot` rebuilds the app from it in the worker.
"""

from __future__ import annotations

import dis
import os
import sys
import types
import typing as t

from flask import Flask

__all__ = ["Locator", "locate"]

Locator = tuple[t.Any, ...]


def locate(app: Flask) -> Locator:
    """Find how to rebuild ``app`` in another process. Called from ``init_app``."""
    module = sys.modules.get(app.import_name)
    if module is not None:
        for attr, value in vars(module).items():
            if value is app:
                return _from_module(module, attr, factory=False)
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith("flask_execute"):
            if frame.f_code.co_name == "<module>" and name in sys.modules:
                for attr, value in frame.f_globals.items():
                    if value is app:
                        return _from_module(sys.modules[name], attr, factory=False)
            func = frame.f_globals.get(frame.f_code.co_name)
            if getattr(func, "__code__", None) is frame.f_code and _returns_local_app(frame, app):
                mod = sys.modules.get(name)
                if mod is not None:
                    return _from_module(mod, frame.f_code.co_name, factory=True)
        frame = frame.f_back  # type: ignore[assignment]
    return ("bare",)


def _returns_local_app(frame: types.FrameType, app: Flask) -> bool:
    """Does the function of ``frame`` end by returning the local that holds ``app``?"""
    names = {n for n, v in frame.f_locals.items() if v is app}
    if not names or frame.f_code.co_flags & (0x20 | 0x80 | 0x200):  # generators, coroutines
        return False
    previous = None
    for ins in dis.get_instructions(frame.f_code):
        if (
            ins.opname == "RETURN_VALUE"
            and previous is not None
            and previous.opname.startswith("LOAD_FAST")
            and previous.argval in names
        ):
            return True
        previous = ins
    return False


def _from_module(module: types.ModuleType, attr: str, *, factory: bool) -> Locator:
    if module.__name__ == "__main__":
        path = getattr(module, "__file__", None)
        if not path or not os.path.isfile(path):
            # `python -c`, `python - < script.py` ("<stdin>"), a REPL: no file a worker
            # could import; it builds a bare app, and functions travel by value
            return ("bare",)
        return ("file", os.path.abspath(path), attr, factory)
    return ("module", module.__name__, attr, factory)

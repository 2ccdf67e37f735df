"""How a task's failure travels in Celery's result backend.

A dispatch task's exception is pickled and sealed as an ``error`` envelope, which
rides in the arguments of a JSON-safe stand-in exception (a *carrier*) with the
original type's module and name, so that Celery's logs and Flower still read
``ValueError`` while the caller gets the real exception back only after the envelope
checked out.
"""

from __future__ import annotations

import typing as t

from .envelopes import Codec
from .serialization import dump_exception

__all__ = ["make_carrier", "seal_failure"]

_carriers: dict[tuple[str, str], type[Exception]] = {}


def _carrier_class(module: str, qualname: str) -> type[Exception]:
    carrier_cls = _carriers.get((module, qualname))
    if carrier_cls is None:
        carrier_cls = type(
            qualname.rpartition(".")[2],
            (Exception,),
            {
                "__module__": module,
                "__qualname__": qualname,
                "__repr__": lambda self: self.args[2],
                "__str__": lambda self: self.args[0],
                # Celery checks that exceptions survive pickle (between pool processes)
                "__reduce__": lambda self: (_rebuild_carrier, (module, qualname, self.args)),
                "flask_execute_carrier": True,
            },
        )
        _carriers[(module, qualname)] = carrier_cls
    return carrier_cls


def _rebuild_carrier(module: str, qualname: str, args: tuple[t.Any, ...]) -> Exception:
    return _carrier_class(module, qualname)(*args)


def make_carrier(exc: BaseException, envelope: str, *, clear: bool = True) -> Exception:
    """A JSON-safe exception standing in for ``exc`` in Celery's result backend.

    Celery stores the type's qualname and module (so logs and Flower still read
    ``ValueError``) and the args, which hold the readable message and the sealed pickle
    of the real exception. ``clear=False`` (``CELERY_ENCRYPT``) keeps the message out
    of the stored state and of the worker's log line: only the type name is readable.
    """
    cls = type(exc)
    carrier_cls = _carrier_class(cls.__module__, cls.__qualname__)
    if not clear:
        message, text = "<encrypted>", f"{cls.__qualname__}(<encrypted>)"
    else:
        try:
            message = str(exc)
            text = repr(exc)
        except Exception:
            message = text = f"<unprintable {cls.__qualname__}>"
    return carrier_cls(message, {"flask_execute": envelope}, text)


def seal_failure(codec: Codec, tid: str, exc: BaseException, tb_text: str) -> Exception:
    """The carrier of ``exc`` sealed for task ``tid``: what a dispatch task raises,
    and what the result backend stores, for a failure."""
    envelope = codec.seal("error", tid, dump_exception(exc, tb_text))
    return make_carrier(exc, envelope, clear=not codec.encrypts)

"""How a call and its outcome are pickled for the trip to a worker and back.

Celery itself only ever sees JSON: the call ``(function, args, kwargs)`` is pickled
with cloudpickle (importable functions by reference, closures, lambdas and
``__main__`` functions by value), and the bytes travel sealed in an envelope
(:mod:`flask_execute.envelopes`) as one opaque string argument of the registered
dispatch task. When something cannot be pickled, the error names the culprit.
"""

from __future__ import annotations

import collections
import importlib
import inspect
import pickle
import sys
import traceback
import types
import typing as t
from collections.abc import Callable

import cloudpickle
from flask import current_app
from flask import Flask
from flask import has_app_context

from .errors import RemoteError
from .errors import SerializationError
from .sources import reduce_code

__all__ = [
    "dump_call",
    "dump_calls",
    "dump_exception",
    "dumps",
    "format_exception",
    "function_label",
    "sanitize",
]

PROTOCOL = pickle.HIGHEST_PROTOCOL


def function_label(func: Callable[..., object]) -> str:
    """``module:qualname`` of a callable: what logs and Flower show for a call."""
    target = getattr(func, "func", func)  # functools.partial
    module = getattr(target, "__module__", None) or type(target).__module__
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{name}"


def _import_attr(module: str, name: str) -> object:
    return getattr(importlib.import_module(module), name)


_proxies: dict[int, tuple[str, str]] = {}


def _known_proxies() -> dict[int, tuple[str, str]]:
    """Module-level ``LocalProxy`` objects (``current_app``, ``g``, ``request``,
    ``session``, ``current_task``) that must travel by name, never by value."""
    if not _proxies:
        from werkzeug.local import LocalProxy

        for module_name in ("flask", "flask.globals", "flask_execute", "flask_execute.context"):
            module = importlib.import_module(module_name)
            for name, value in vars(module).items():
                if type(value) is LocalProxy or (
                    isinstance(type(value), type) and issubclass(type(value), LocalProxy)
                ):
                    _proxies.setdefault(id(value), (module_name, name))
    return _proxies


# --- the app and the extension travel as the worker's own ------------------------------
def _worker_app() -> Flask:
    """Worker side of a Flask app a by-value function referenced: the app of the
    running task (calls are unpickled inside its application context)."""
    if not has_app_context():
        raise RuntimeError(
            "A call that references its Flask app can only be unpickled inside an"
            " application context (flask-execute's workers unpickle calls in one)."
        )
    return t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]


def _worker_extension() -> object:
    """Worker side of the flask-execute extension a by-value function referenced: the
    extension serving the worker's app (``app.extensions["celery"]``)."""
    return _worker_app().extensions["celery"]


def _is_extension(obj: object) -> bool:
    """Is ``obj`` a flask-execute ``Celery`` extension? Found through ``sys.modules``:
    the extension's module imports this one (through the client), so it cannot be
    imported here; no extension exists before that module is loaded."""
    plugin = sys.modules.get("flask_execute.plugin")
    return plugin is not None and isinstance(obj, plugin.Celery)


def _submitting_app() -> Flask | None:
    """The app a call is being submitted for, when an app context says so."""
    if has_app_context():
        return t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]
    return None


def _reduce_app(app: Flask) -> tuple[t.Any, ...]:
    current = _submitting_app()
    if "celery" not in app.extensions or (current is not None and current is not app):
        raise SerializationError(
            f"The Flask app {app.import_name!r} cannot be sent to a worker: only the app"
            " the call is submitted for travels (it arrives as the worker's own app)."
            " Use flask.current_app in the function instead, or push this app's context"
            " before submitting."
        )
    return _worker_app, ()


def _reduce_extension(extension: object) -> tuple[t.Any, ...]:
    current = _submitting_app()
    if current is not None and current.extensions.get("celery") is not extension:
        raise SerializationError(
            f"This flask-execute extension does not serve the app {current.import_name!r}"
            " the call is submitted for, so it cannot be sent to a worker: only the"
            " extension of that app travels (it arrives as the worker's own)."
        )
    return _worker_extension, ()


def _requery(model: type[t.Any], identity: tuple[t.Any, ...]) -> t.Any:
    """Worker side of a model argument: load it again in this app context's session."""
    from flask import current_app

    db = current_app.extensions.get("sqlalchemy")
    if db is None:
        raise RuntimeError(
            f"A {model.__name__} argument needs Flask-SQLAlchemy on the worker's app."
        )
    key = identity[0] if len(identity) == 1 else identity
    obj = db.session.get(model, key)
    if obj is None:
        raise LookupError(f"{model.__name__} with primary key {key!r} no longer exists.")
    return obj


def _is_model(obj: object) -> bool:
    if "sqlalchemy" not in sys.modules or isinstance(obj, type):
        return False
    return getattr(type(obj), "__mapper__", None) is not None


class _TrackingPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, noting whether anything had to travel by value (code objects), and
    sending Flask's context proxies by name (a by-value function that uses
    ``current_app`` must find the worker's app, not carry the caller's). Likewise the
    Flask app and the flask-execute extension of the call (a script's own ``app`` and
    ``celery`` globals, used by a function that travels by value) arrive as the
    worker's own app and extension.

    ``models``: ``"requery"`` sends SQLAlchemy model instances as (model, primary key),
    loaded again on the worker; ``"refuse"`` refuses them; ``None`` pickles them as is.
    """

    by_value = False
    models: str | None = None
    # code objects sent by value keep their file name and source lines (sources.py)
    dispatch_table: t.ClassVar[t.Mapping[type, t.Any]] = collections.ChainMap(
        {types.CodeType: reduce_code}, cloudpickle.Pickler.dispatch_table
    )

    def reducer_override(self, obj: object) -> object:
        ref = _known_proxies().get(id(obj))
        if ref is not None:
            return _import_attr, ref
        if isinstance(obj, Flask):
            return _reduce_app(obj)
        if _is_extension(obj):
            return _reduce_extension(obj)
        if self.models is not None and _is_model(obj):
            return self._reduce_model(obj)
        if not self.by_value and isinstance(obj, (types.FunctionType, type)):
            try:
                by_ref = cloudpickle.cloudpickle._should_pickle_by_reference(obj)
            except Exception:  # pragma: no cover - private API moved
                by_ref = False
            if not by_ref:
                self.by_value = True
        return super().reducer_override(obj)

    def _reduce_model(self, obj: object) -> tuple[t.Any, ...]:
        from sqlalchemy import inspect as sa_inspect

        name = type(obj).__name__
        if self.models == "refuse":
            raise SerializationError(
                f"A model instance ({name}) cannot be sent to a worker: pass its primary key"
                " and query it in the task (or set CELERY_SANITIZE_ARGUMENTS=True to send"
                " models by primary key)."
            )
        identity = sa_inspect(obj).identity
        if identity is None:
            raise SerializationError(
                f"The {name} instance has no primary key yet (it was never saved):"
                " commit it before submitting, or pass its data instead."
            )
        return _requery, (type(obj), tuple(identity))


def dumps(obj: object, *, models: str | None = None) -> tuple[bytes, bool]:
    """Pickle ``obj`` with cloudpickle; return the bytes and whether code travelled by
    value (then the payload is only valid for the same Python minor version)."""
    import io

    buffer = io.BytesIO()
    pickler = _TrackingPickler(buffer, protocol=PROTOCOL)
    pickler.models = models
    pickler.dump(obj)
    return buffer.getvalue(), pickler.by_value


def sanitize(
    args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
) -> tuple[tuple[t.Any, ...], dict[str, t.Any]]:
    """Resolve Werkzeug ``LocalProxy`` arguments (CELERY_SANITIZE_ARGUMENTS)."""
    from werkzeug.local import LocalProxy

    def resolve(value: t.Any) -> t.Any:
        if isinstance(value, LocalProxy):
            return value._get_current_object()
        return value

    return tuple(resolve(a) for a in args), {k: resolve(v) for k, v in kwargs.items()}


def _explain(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def dump_call(
    func: Callable[..., object],
    args: tuple[object, ...],
    kwargs: dict[str, object],
    *,
    models: str | None = None,
    by_value: bool = True,
) -> tuple[bytes, bool]:
    """Pickle one call. On failure, find and name the culprit.

    :raises SerializationError: naming the function or the argument that cannot be
        pickled, and why; or, with ``by_value=False``, saying that code would have to
        travel by value.
    """
    try:
        data, used_value = dumps((func, args, kwargs), models=models)
    except Exception as exc:
        raise _call_error(func, args, kwargs, exc, models) from exc
    if used_value and not by_value:
        raise _by_value_error(func)
    return data, used_value


def dump_calls(
    func: Callable[..., object],
    calls: list[tuple[str, tuple[object, ...], dict[str, object]]],
    *,
    models: str | None = None,
    by_value: bool = True,
) -> tuple[bytes, bool]:
    """Pickle several calls of one function (a ``map`` chunk): ``(task id of the call,
    args, kwargs)`` each."""
    try:
        data, used_value = dumps((func, calls), models=models)
    except Exception as exc:
        for _, args, kwargs in calls:
            try:
                dumps((args, kwargs), models=models)
            except Exception as inner:
                raise _call_error(func, args, kwargs, inner, models) from inner
        raise _call_error(func, (), {}, exc, models) from exc
    if used_value and not by_value:
        raise _by_value_error(func)
    return data, used_value


def _by_value_error(func: Callable[..., object]) -> SerializationError:
    return SerializationError(
        f"{function_label(func)} (or something in its arguments) is not importable by"
        " reference — a lambda, a closure or code from __main__ — and"
        " CELERY_PICKLE_BY_VALUE is off. Move it to an importable module."
    )


def _call_error(
    func: Callable[..., object],
    args: tuple[object, ...],
    kwargs: dict[str, object],
    exc: BaseException,
    models: str | None = None,
) -> SerializationError:
    label = function_label(func)
    try:
        dumps(func)
    except Exception as inner:
        return SerializationError(
            f"The function {label} cannot be sent to a worker: {_explain(inner)}."
        )
    names: list[str]
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(len(args)):
        if i < len(params) and params[i].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            names.append(f"argument {params[i].name!r} (position {i})")
        else:
            names.append(f"positional argument {i}")
    named = [*zip(names, args, strict=True), *((f"argument {k!r}", v) for k, v in kwargs.items())]
    for name, value in named:
        try:
            dumps(value, models=models)
        except Exception as inner:
            advice = (
                ""  # our own errors already say what to do
                if isinstance(inner, SerializationError)
                else ". Pass something picklable instead (for example an id the task can look up)."
            )
            return SerializationError(
                f"{name[0].upper()}{name[1:]} of {label} cannot be serialized"
                f" ({type(value).__name__} value): {_explain(inner)}{advice}"
            )
    return SerializationError(f"The call to {label} cannot be serialized: {_explain(exc)}.")


def dump_exception(exc: BaseException, tb_text: str) -> bytes:
    """Pickle a task's exception so the caller gets its own type back. Exceptions that
    do not survive a pickle round trip travel as :class:`RemoteError` (type name,
    message and traceback text)."""
    try:
        data, _ = dumps((exc, tb_text))
        pickle.loads(data)
        return data
    except Exception:
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        try:
            message = str(exc)
        except Exception:
            message = "<unprintable>"
        data, _ = dumps((RemoteError(name, message, tb_text), tb_text))
        return data


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

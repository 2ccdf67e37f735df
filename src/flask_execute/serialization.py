"""How a call and its outcome travel: pickled, inside an HMAC-signed envelope.

Celery itself only ever sees JSON: the call ``(function, args, kwargs)`` is pickled
with cloudpickle (importable functions by reference, closures, lambdas and
``__main__`` functions by value), and the bytes travel as one opaque string argument
of the registered dispatch task. The string is an *envelope*::

    fe1.<base64url(header JSON)>.<base64url(payload)>.<base64url(HMAC-SHA256)>

The MAC covers the header and the payload under a key derived per purpose ("call",
"result", "error"), so a result can never be replayed as a call. The header binds the
task id, the key id, the issue and expiry times and, for by-value payloads, the
Python version. :meth:`Codec.open` checks size, form, key, MAC (constant time),
purpose, task id and expiry *before* anything is unpickled. With ``CELERY_ENCRYPT`` the
payload is AES-GCM ciphertext (the header stays clear, signed and authenticated as
associated data) and is decrypted only after all those checks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import importlib
import inspect
import json
import pickle
import sys
import time
import traceback
import types
import typing as t
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence

import cloudpickle

from .crypto import decrypt_payload
from .crypto import make_cipher
from .errors import RemoteError
from .errors import SerializationError
from .errors import SignatureError

__all__ = ["Codec", "derive_key", "dump_call", "function_label"]

VERSION = "fe1"
PROTOCOL = pickle.HIGHEST_PROTOCOL
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
#: How long a call envelope stays valid after its ETA (replays are bounded by it).
DEFAULT_MAX_AGE = 7 * 24 * 3600
_CLOCK_SKEW = 300


def derive_key(secret: bytes, salt: bytes = b"flask-execute.signing") -> bytes:
    """Derive the signing key from an application secret (``SECRET_KEY``), so that a
    leaked task key is not a session key and vice versa."""
    return hmac.new(secret, salt, hashlib.sha256).digest()


def key_id(key: bytes) -> str:
    """Stable, public fingerprint of a key (safe to log; reveals nothing of the key)."""
    return hmac.new(key, b"flask-execute/kid", hashlib.sha256).hexdigest()[:8]


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


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
    ``current_app`` must find the worker's app, not carry the caller's).

    ``models``: ``"requery"`` sends SQLAlchemy model instances as (model, primary key),
    loaded again on the worker; ``"refuse"`` refuses them; ``None`` pickles them as is.
    """

    by_value = False
    models: str | None = None

    def reducer_override(self, obj: object) -> object:
        ref = _known_proxies().get(id(obj))
        if ref is not None:
            return _import_attr, ref
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
    calls: list[tuple[tuple[object, ...], dict[str, object]]],
    *,
    models: str | None = None,
    by_value: bool = True,
) -> tuple[bytes, bool]:
    """Pickle several calls of one function (a ``map`` chunk)."""
    try:
        data, used_value = dumps((func, calls), models=models)
    except Exception as exc:
        for args, kwargs in calls:
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


class Codec:
    """Seals and opens envelopes with one signing key and any number of older keys.

    The newest key signs; every key verifies (key rotation). Keys are never logged and
    never part of ``repr``. With ``encrypt`` (``CELERY_ENCRYPT``: ``True``, or dedicated
    secrets, newest first) every payload is also encrypted (:mod:`flask_execute.crypto`)
    and :meth:`open` refuses any envelope that is not, and vice versa.
    """

    def __init__(
        self,
        key: bytes,
        fallbacks: Iterable[bytes] = (),
        *,
        max_size: int = 64 * 1024 * 1024,
        max_age: float = DEFAULT_MAX_AGE,
        encrypt: bool | Sequence[bytes] = False,
    ) -> None:
        fallbacks = list(fallbacks)
        self._kid = key_id(key)
        self._keys = {key_id(k): k for k in (*fallbacks, key)}
        # CELERY_ENCRYPT: True derives the cipher's keys from these signing keys
        self._cipher = make_cipher(encrypt, [key, *fallbacks])
        self._purpose_keys: dict[tuple[str, str], bytes] = {}
        self.max_size = max_size
        self.max_age = max_age

    def __repr__(self) -> str:
        encrypted = f" encrypted={self._cipher.kid}" if self._cipher else ""
        return f"<Codec kid={self._kid} keys={len(self._keys)}{encrypted}>"

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def encrypts(self) -> bool:
        """Whether payloads are encrypted (``CELERY_ENCRYPT``)."""
        return self._cipher is not None

    def _key(self, kid: str, purpose: str) -> bytes:
        cached = self._purpose_keys.get((kid, purpose))
        if cached is None:
            cached = hmac.new(
                self._keys[kid], b"flask-execute/v1/" + purpose.encode(), hashlib.sha256
            ).digest()
            self._purpose_keys[(kid, purpose)] = cached
        return cached

    def seal(
        self,
        purpose: str,
        tid: str,
        payload: bytes,
        *,
        by_value: bool = False,
        not_before: float | None = None,
        extra: dict[str, object] | None = None,
    ) -> str:
        """Sign ``payload`` for ``purpose`` and task id ``tid``; return the envelope.

        The envelope expires ``max_age`` seconds after ``not_before`` (the ETA) or now.
        """
        now = time.time()
        header: dict[str, object] = {
            "p": purpose,
            "tid": tid,
            "kid": self._kid,
            "iat": int(now),
            "exp": int(max(now, not_before or now) + self.max_age),
        }
        if by_value:
            header["py"] = PYTHON
        if extra:
            header.update(extra)
        if self._cipher is not None:
            header["enc"] = self._cipher.kid
        head = _b64e(json.dumps(header, separators=(",", ":")).encode())
        if self._cipher is not None:
            # AEAD with the (signed, clear) header as associated data, then the MAC
            # over both: see docs/security.md, "Confidentiality"
            payload = self._cipher.encrypt(payload, f"{VERSION}.{head}".encode())
        body = _b64e(payload)
        signed = f"{VERSION}.{head}.{body}"
        mac = hmac.new(self._key(self._kid, purpose), signed.encode(), hashlib.sha256)
        envelope = f"{signed}.{_b64e(mac.digest())}"
        if len(envelope) > self.max_size:
            raise SerializationError(
                f"The {purpose} payload is {len(envelope)} bytes, over the"
                f" CELERY_MAX_MESSAGE_SIZE limit of {self.max_size} bytes."
            )
        return envelope

    def open(
        self,
        envelope: object,
        purpose: str,
        tid: str,
        bindings: dict[str, object] | None = None,
    ) -> tuple[dict[str, t.Any], bytes]:
        """Verify an envelope and return its header and payload bytes (still pickled).

        ``bindings`` are further header fields that must match (e.g. the task name).

        :raises SignatureError: with ``reason`` set; nothing was deserialized.
        """
        if not isinstance(envelope, str):
            raise SignatureError("malformed", "Envelope is not a string.")
        if len(envelope) > self.max_size:
            raise SignatureError("too_large", f"Envelope of {len(envelope)} bytes is too large.")
        parts = envelope.split(".")
        if len(parts) != 4 or parts[0] != VERSION:
            raise SignatureError("malformed", "Envelope is not a flask-execute envelope.")
        _, head, body, mac_text = parts
        try:
            if len(head) > 4096:
                raise ValueError("header too long")
            header = json.loads(_b64d(head))
            mac = _b64d(mac_text)
        except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError) as exc:
            raise SignatureError("malformed", f"Envelope header is unreadable: {exc}.") from None
        if not isinstance(header, dict):
            raise SignatureError("malformed", "Envelope header is not an object.")
        kid = header.get("kid")
        if not isinstance(kid, str) or kid not in self._keys:
            raise SignatureError(
                "unknown_key", f"Envelope signed with unknown key id {str(kid)[:16]!r}."
            )
        if header.get("p") != purpose:
            # checked before the MAC only to pick the key: a wrong purpose fails the
            # MAC anyway, since each purpose has its own key.
            raise SignatureError("binding_mismatch", "Envelope is not for this purpose.")
        expected = hmac.new(
            self._key(kid, purpose), f"{VERSION}.{head}.{body}".encode(), hashlib.sha256
        ).digest()
        if not hmac.compare_digest(expected, mac):
            raise SignatureError("bad_mac", "Envelope signature does not match.")
        if header.get("tid") != tid:
            raise SignatureError("binding_mismatch", "Envelope belongs to another task id.")
        for field, value in (bindings or {}).items():
            if header.get(field) != value:
                raise SignatureError("binding_mismatch", f"Envelope is not for this {field}.")
        now = time.time()
        exp, iat = header.get("exp"), header.get("iat")
        if not isinstance(exp, int) or not isinstance(iat, int):
            raise SignatureError("malformed", "Envelope has no validity window.")
        if now > exp:
            raise SignatureError("expired", "Envelope has expired.")
        if iat > now + _CLOCK_SKEW:
            raise SignatureError("expired", "Envelope was issued in the future.")
        py = header.get("py")
        if py is not None and py != PYTHON:
            raise SignatureError(
                "python_mismatch",
                f"Envelope carries code pickled by value on Python {py}; this is Python"
                f" {PYTHON}. Run workers on the same Python version as the web process.",
            )
        try:
            payload = _b64d(body)
        except (ValueError, binascii.Error) as exc:  # pragma: no cover - MAC covers it
            raise SignatureError("malformed", f"Envelope payload is unreadable: {exc}.") from None
        associated = f"{VERSION}.{head}".encode()
        return header, decrypt_payload(
            self._cipher, header.get("enc"), payload, associated, purpose
        )

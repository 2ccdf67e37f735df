"""Which keys sign and verify envelopes for one app.

``CELERY_SIGNING_KEY`` (plus ``CELERY_SIGNING_KEY_FALLBACKS``) when set; else keys
derived from ``SECRET_KEY`` and ``SECRET_KEY_FALLBACKS``; else, in development, a
random key kept in a 0600 file of the app's private runtime directory
(:mod:`.rundir`), shared by its local workers. In production without a key,
``init_app`` refuses to start.

Whoever knows a key that verifies can run code on the workers, so weak keys are
refused at ``init_app``: an empty key in any of the four settings always (an unset
environment variable read with ``os.environ.get(..., "")``), and in production a
secret shorter than :data:`MIN_SECRET_LENGTH` bytes or a well-known placeholder.
"""

from __future__ import annotations

import os
import secrets
import threading
import typing as t
from collections.abc import Callable

from flask import Flask

from . import config as config_module
from .envelopes import derive_key
from .errors import ConfigurationError
from .rundir import create_private
from .rundir import open_private

__all__ = [
    "MIN_SECRET_LENGTH",
    "PLACEHOLDERS",
    "check_secrets",
    "development_key",
    "signing_keys",
]

#: The shortest signing secret accepted in production, in bytes.
MIN_SECRET_LENGTH = 16
#: Secrets anyone can guess: common placeholders and every value in our own docs and
#: examples (compared case-insensitively, surrounding blanks ignored).
PLACEHOLDERS = frozenset(
    {
        "dev", "development", "devkey", "dev-key", "test", "testing", "secret",
        "secret-key", "secret_key", "secretkey", "mysecret", "my-secret", "my-secret-key",
        "your-secret-key", "your_secret_key", "change-me", "changeme", "change_me",
        "change-this", "changethis", "replace-me", "please-change-me", "password",
        "default", "key", "s3cret", "supersecret", "super-secret", "super-secret-key",
        "not-a-secret", "insecure", "keyboard cat",
        # the values our README, docs and examples show
        "demo-only-secret-change-me", "progress-example-only-change-me", "shop-dev",
    }
)  # fmt: skip

_SETTINGS = (
    "SECRET_KEY",
    "SECRET_KEY_FALLBACKS",
    "CELERY_SIGNING_KEY",
    "CELERY_SIGNING_KEY_FALLBACKS",
)


def signing_keys(
    app: Flask, settings: config_module.Settings, rundir: Callable[[], str]
) -> tuple[bytes, list[bytes]]:
    """(signing key, verify-only keys). The newest key signs; all verify.

    ``rundir`` gives the app's runtime directory; it is only called for the
    development key (an app with a key of its own needs no directory).

    :raises ConfigurationError: no key in production, or a weak key (see
        :func:`check_secrets`).
    """
    development = settings.start_local_workers or settings.always_eager or app.debug or app.testing
    check_secrets(app.config, settings, production=not development)
    if settings.signing_keys:
        key, *older = settings.signing_keys
        return key, [*older, *settings.signing_key_fallbacks]
    secret = app.config.get("SECRET_KEY")
    if secret:
        fallbacks = app.config.get("SECRET_KEY_FALLBACKS") or []
        raw = [s.encode() if isinstance(s, str) else s for s in [secret, *fallbacks]]
        derived = [derive_key(s) for s in raw]
        return derived[0], [*derived[1:], *settings.signing_key_fallbacks]
    if not development:
        raise ConfigurationError(
            "flask-execute signs every task and result and needs a key: set 'SECRET_KEY'"
            " or 'CELERY_SIGNING_KEY' (the same value on the web and worker processes)."
        )
    return development_key(app, rundir()), list(settings.signing_key_fallbacks)


def check_secrets(
    config: t.Mapping[str, object], settings: config_module.Settings, *, production: bool
) -> None:
    """Refuse keys anyone can compute.

    An empty key in any of ``SECRET_KEY``, ``SECRET_KEY_FALLBACKS``,
    ``CELERY_SIGNING_KEY`` and ``CELERY_SIGNING_KEY_FALLBACKS`` is always refused: it
    derives a signing key that anyone can derive too. In ``production`` every secret
    that verifies envelopes must also be at least :data:`MIN_SECRET_LENGTH` bytes long
    and not a well-known placeholder (:data:`PLACEHOLDERS`).

    :raises ConfigurationError: naming the setting, why the value is refused and the fix
        (never the value itself).
    """
    found: dict[str, list[tuple[str, object]]] = {}
    for name in _SETTINGS:
        value = config.get(name)
        if isinstance(value, (list, tuple)):
            found[name] = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        elif value is not None:
            found[name] = [(name, value)]
    for where, value in (entry for entries in found.values() for entry in entries):
        if isinstance(value, (str, bytes)) and not value.strip():
            raise ConfigurationError(
                f"{where!r} is an empty key. With flask-execute a key signs the code that"
                " workers run, and an empty one lets anyone who can write to the broker"
                " run code on them. Set a long random value, or drop the entry (an unset"
                " environment variable read with a default of '' does this)."
            )
    if not production:
        return
    # the secrets that verify envelopes: the signing keys when set, else SECRET_KEY's
    used = (
        ("CELERY_SIGNING_KEY", "CELERY_SIGNING_KEY_FALLBACKS")
        if settings.signing_keys
        else ("SECRET_KEY", "SECRET_KEY_FALLBACKS", "CELERY_SIGNING_KEY_FALLBACKS")
    )
    for where, value in (entry for name in used for entry in found.get(name, ())):
        if not isinstance(value, (str, bytes)):
            continue
        raw = value.encode() if isinstance(value, str) else value
        if raw.strip().lower().decode("utf-8", "replace") in PLACEHOLDERS:
            why = "is a well-known placeholder"
        elif len(raw) < MIN_SECRET_LENGTH:
            why = f"is shorter than {MIN_SECRET_LENGTH} bytes"
        else:
            continue
        raise ConfigurationError(
            f"{where!r} {why}. flask-execute signs the code that workers run with it:"
            " whoever guesses it and can write to the broker runs code on every worker"
            " (remote code execution, not only forged sessions). Set a long random"
            " value, e.g. python -c 'import secrets; print(secrets.token_hex(32))'."
        )


def development_key(app: Flask, rundir: str) -> bytes:
    """A per-app random key created once (0600), shared by local workers. Created
    atomically (hard link of a complete file), so racing processes agree on it.

    :raises UnsafePathError: the key file is a link, another user's or not 0600.
    """
    path = os.path.join(rundir, "signing.key")
    for _ in range(3):
        try:
            with os.fdopen(open_private(path), "rb") as f:
                key = f.read()
            if len(key) >= 32:
                return key
            os.unlink(path)  # truncated by a crash of its writer
        except FileNotFoundError:
            pass
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with os.fdopen(create_private(tmp), "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # fails if another process won the race: use theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    raise ConfigurationError(f"Could not create the development signing key {path}.")

"""Which keys sign and verify envelopes for one app.

``CELERY_SIGNING_KEY`` (plus ``CELERY_SIGNING_KEY_FALLBACKS``) when set; else keys
derived from ``SECRET_KEY`` and ``SECRET_KEY_FALLBACKS``; else, in development, a
random key kept in a 0600 file of the app's private runtime directory
(:mod:`.rundir`), shared by its local workers. In production without a key,
``init_app`` refuses to start.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable

from flask import Flask

from . import config as config_module
from .errors import ConfigurationError
from .rundir import create_private
from .rundir import open_private
from .serialization import derive_key

__all__ = ["development_key", "signing_keys"]


def signing_keys(
    app: Flask, settings: config_module.Settings, rundir: Callable[[], str]
) -> tuple[bytes, list[bytes]]:
    """(signing key, verify-only keys). The newest key signs; all verify.

    ``rundir`` gives the app's runtime directory; it is only called for the
    development key (an app with a key of its own needs no directory).
    """
    if settings.signing_keys:
        key, *older = settings.signing_keys
        return key, [*older, *settings.signing_key_fallbacks]
    secret = app.config.get("SECRET_KEY")
    if secret:
        fallbacks = app.config.get("SECRET_KEY_FALLBACKS") or []
        raw = [s.encode() if isinstance(s, str) else s for s in [secret, *fallbacks]]
        derived = [derive_key(s) for s in raw]
        return derived[0], [*derived[1:], *settings.signing_key_fallbacks]
    development = settings.start_local_workers or settings.always_eager or app.debug or app.testing
    if not development:
        raise ConfigurationError(
            "flask-execute signs every task and result and needs a key: set 'SECRET_KEY'"
            " or 'CELERY_SIGNING_KEY' (the same value on the web and worker processes)."
        )
    return development_key(app, rundir()), list(settings.signing_key_fallbacks)


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

"""The boot file: how the web process hands a local worker what it needs to rebuild
the app (locator, ``sys.path``, config snapshot with the signing keys).

The content is pickled, so whoever can change the file between its write and its
read runs code in the worker. Three locks on that door:

* the file lives in the private runtime directory (:mod:`.rundir`), is created with
  ``O_EXCL | O_NOFOLLOW`` under a random name, and is opened with ``O_NOFOLLOW``
  and checked (ours, regular, 0600) before it is read;
* its content is a signed envelope (the same :class:`~.envelopes.Codec` as every
  call, purpose ``boot``, bound to the file's name) under a *one-shot* random key
  that never touches the disk: the web process hands it to that one child in its
  environment (``/proc/<pid>/environ`` is readable by the same user and root only,
  unlike the command line); the child takes it out of its environment at once;
* the child verifies the envelope before anything is unpickled, and refuses to
  start otherwise.
"""

from __future__ import annotations

import base64
import binascii
import os
import pickle
import secrets
import typing as t

import cloudpickle

from .envelopes import Codec
from .errors import SignatureError
from .rundir import create_private
from .rundir import open_private

__all__ = ["read", "write"]

PURPOSE = "boot"


def write(directory: str, boot: dict[str, object]) -> tuple[str, str]:
    """Seal ``boot`` under a new random key into a new file of ``directory``.

    Returns ``(path, key)``: the key (base64 text) goes to the one child that reads
    the file, through its environment; it is never written anywhere.
    """
    name = f"boot-{secrets.token_hex(8)}.pickle"
    path = os.path.join(directory, name)
    key = secrets.token_bytes(32)
    envelope = Codec(key).seal(PURPOSE, name, cloudpickle.dumps(boot))
    fd = create_private(path)
    with os.fdopen(fd, "wb") as f:
        f.write(envelope.encode("ascii"))
    return path, base64.urlsafe_b64encode(key).decode("ascii")


def read(path: str, key: str | None) -> dict[str, t.Any]:
    """Open, verify, then unpickle the boot file at ``path`` and delete it.

    :raises UnsafePathError: the file is a link, another user's or not 0600.
    :raises SignatureError: no key was given, or the content is not what the web
        process sealed for this file (nothing was unpickled; the file is left for
        inspection).
    """
    fd = open_private(path)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    try:
        if not key:
            raise SignatureError("malformed", "No boot key came with it.")
        try:
            codec = Codec(base64.urlsafe_b64decode(key))
        except (ValueError, binascii.Error):
            raise SignatureError("malformed", "The boot key is not base64.") from None
        # latin-1 maps any byte: whatever is there reaches the checks, which refuse it
        _, payload = codec.open(data.decode("latin-1"), PURPOSE, os.path.basename(path))
    except SignatureError as exc:
        raise SignatureError(
            exc.reason,
            f"Refusing the boot file {path} ({exc.reason}): {exc} It is not what the web"
            " process wrote for this worker, so nothing in it was unpickled and the"
            f" worker does not start. Check who else can write to {os.path.dirname(path)}.",
        ) from None
    boot = pickle.loads(payload)  # verified: sealed by our parent for this file
    os.unlink(path)  # it holds the app's secrets; read once
    return t.cast(dict[str, t.Any], boot)

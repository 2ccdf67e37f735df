"""Envelopes: how flask-execute signs (and, with ``CELERY_ENCRYPT``, encrypts) what
travels through the broker and the result backend.

An envelope is one ASCII string::

    fe1.<base64url(header JSON)>.<base64url(payload)>.<base64url(HMAC-SHA256)>

The MAC covers the header and the payload under a key derived per purpose ("call",
"result", "error", "boot"), so a result can never be replayed as a call. The header
binds the task id, the key id, the issue and expiry times and, for by-value payloads,
the Python version. :meth:`Codec.open` checks size, form, key, MAC (constant time),
purpose, task id and expiry *before* anything is unpickled. With ``CELERY_ENCRYPT`` the
payload is AES-GCM ciphertext (the header stays clear, signed and authenticated as
associated data) and is decrypted only after all those checks. What the payload holds
(pickled calls and outcomes) is :mod:`flask_execute.serialization`'s business.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import sys
import time
import typing as t
from collections.abc import Iterable
from collections.abc import Sequence

from .crypto import decrypt_payload
from .crypto import make_cipher
from .errors import SerializationError
from .errors import SignatureError

__all__ = [
    "DEFAULT_MAX_AGE",
    "PYTHON",
    "REPLY_PREFIX",
    "VERSION",
    "Codec",
    "derive_key",
    "key_id",
    "reply_channel",
    "unverified_header",
]

VERSION = "fe1"
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
#: How long a call envelope stays valid after its ETA (replays are bounded by it).
DEFAULT_MAX_AGE = 7 * 24 * 3600
_CLOCK_SKEW = 300
#: A call envelope's ``reply`` names the Redis channel of the process that waits for
#: it: ``<REPLY_PREFIX><32 hex digits>``.
REPLY_PREFIX = "flask-execute:reply:"
_REPLY = re.compile(re.escape(REPLY_PREFIX) + r"[0-9a-f]{32}")


def reply_channel(header: t.Mapping[str, object]) -> str | None:
    """The reply channel a verified call header names, if it names a valid one."""
    reply = header.get("reply")
    return reply if isinstance(reply, str) and _REPLY.fullmatch(reply) else None


def unverified_header(envelope: object) -> dict[str, object] | None:
    """The header of ``envelope`` WITHOUT any check of its signature, or None when it
    has no readable one. Only for telling the sender of an envelope this process
    refuses where to hear of it (:func:`flask_execute.refusals.notice`); never for a
    decision about the envelope itself."""
    if not isinstance(envelope, str) or len(envelope) > 64 * 1024 * 1024:
        return None
    parts = envelope.split(".", 2)
    if len(parts) < 3 or parts[0] != VERSION or len(parts[1]) > 4096:
        return None
    try:
        header = json.loads(_b64d(parts[1]))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


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
            error = SignatureError(
                "python_mismatch",
                f"Envelope carries code pickled by value on Python {py}; this is Python"
                f" {PYTHON}. Run workers on the same Python version as the web process.",
            )
            error.header = header
            raise error
        try:
            payload = _b64d(body)
        except (ValueError, binascii.Error) as exc:  # pragma: no cover - MAC covers it
            raise SignatureError("malformed", f"Envelope payload is unreadable: {exc}.") from None
        associated = f"{VERSION}.{head}".encode()
        try:
            data = decrypt_payload(self._cipher, header.get("enc"), payload, associated, purpose)
        except SignatureError as error:
            if error.reason == "encryption_mismatch":
                error.header = header  # genuine: the MAC checked out
            raise
        return header, data

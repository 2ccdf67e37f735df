"""Confidentiality of envelope payloads (``CELERY_ENCRYPT``): AES-256-GCM.

A :class:`Cipher` holds one or more 256-bit keys, newest first: the newest encrypts,
every key decrypts (rotation), each found by a public fingerprint (its key id). Keys
are derived from a secret with HMAC-SHA256 under a label of their own, so an
encryption key is never a signing key, a session key or the secret itself.

A ciphertext is ``nonce (12 random bytes) || AES-GCM(plaintext) || tag (16 bytes)``,
authenticated together with caller-given *associated data* (the envelope header).
Nonces are random: with 96 bits, a collision under one key becomes likely only after
about 2**48 encryptions, far beyond any key's lifetime here.

The ``cryptography`` package is imported only when a :class:`Cipher` is built, so
flask-execute runs without it unless ``CELERY_ENCRYPT`` is on.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Sequence

from .errors import ConfigurationError
from .errors import SignatureError

__all__ = [
    "NONCE_SIZE",
    "Cipher",
    "InvalidCiphertext",
    "decrypt_payload",
    "derive_encryption_key",
    "make_cipher",
]

#: Derivation label: distinct from the signing key's salt and from the per-purpose
#: MAC labels (``flask-execute/v1/<purpose>``), so no derived key is ever reused.
LABEL = b"flask-execute/encryption/v1"
NONCE_SIZE = 12
TAG_SIZE = 16


class InvalidCiphertext(ValueError):
    """A ciphertext did not decrypt: unknown key id, wrong key, or altered bytes
    (ciphertext, nonce, tag or associated data). Nothing was returned."""


def derive_encryption_key(secret: bytes) -> bytes:
    """The 256-bit AES key of a secret (a signing key or a dedicated key)."""
    return hmac.new(secret, LABEL, hashlib.sha256).digest()


def _fingerprint(key: bytes) -> str:
    return hmac.new(key, b"flask-execute/ekid", hashlib.sha256).hexdigest()[:8]


class Cipher:
    """AES-256-GCM under the keys derived from ``secrets`` (newest first).

    :raises ConfigurationError: the ``cryptography`` package is not installed, or
        ``secrets`` is empty.
    """

    def __init__(self, secrets: Sequence[bytes]) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError as exc:
            raise ConfigurationError(
                "'CELERY_ENCRYPT' is on, but the 'cryptography' package is not installed:"
                " pip install 'flask-execute[encrypt]' (on the web and worker processes)."
            ) from exc
        if not secrets:
            raise ConfigurationError("'CELERY_ENCRYPT' needs at least one key.")
        keys = [derive_encryption_key(secret) for secret in secrets]
        self._kid = _fingerprint(keys[0])
        # oldest first, so that the newest wins a (harmless) duplicate
        self._aeads = {_fingerprint(key): AESGCM(key) for key in reversed(keys)}

    def __repr__(self) -> str:
        return f"<Cipher kid={self._kid} keys={len(self._aeads)}>"

    @property
    def kid(self) -> str:
        """Public fingerprint of the encrypting key (safe to log and store)."""
        return self._kid

    def knows(self, kid: str) -> bool:
        return kid in self._aeads

    def encrypt(self, plaintext: bytes, associated: bytes) -> bytes:
        """Encrypt with the newest key under a fresh random nonce; ``associated`` is
        authenticated, not encrypted. Decrypt with ``decrypt(cipher.kid, ...)``."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aeads[self._kid].encrypt(nonce, plaintext, associated)

    def decrypt(self, kid: str, ciphertext: bytes, associated: bytes) -> bytes:
        """Authenticate and decrypt what :meth:`encrypt` produced under key ``kid``.

        :raises InvalidCiphertext: unknown ``kid``, another key, or any byte of the
            ciphertext or of ``associated`` changed.
        """
        from cryptography.exceptions import InvalidTag

        aead = self._aeads.get(kid)
        if aead is None:
            raise InvalidCiphertext(f"No encryption key with id {kid[:16]!r}.")
        if len(ciphertext) < NONCE_SIZE + TAG_SIZE:
            raise InvalidCiphertext("Ciphertext is too short.")
        try:
            return aead.decrypt(ciphertext[:NONCE_SIZE], ciphertext[NONCE_SIZE:], associated)
        except InvalidTag:
            raise InvalidCiphertext("Ciphertext does not authenticate.") from None


def make_cipher(setting: bool | Sequence[bytes], signing: Sequence[bytes]) -> Cipher | None:
    """The cipher ``CELERY_ENCRYPT`` asks for: none (``False``), keys derived from the
    signing keys ``signing`` (``True``: newest first, older ones decrypt), or keys
    derived from the dedicated secrets given (newest first)."""
    if setting is False:
        return None
    return Cipher(signing if setting is True else setting)


_SAME_SETTING = "Set the same CELERY_ENCRYPT on the web and worker processes."


def decrypt_payload(
    cipher: Cipher | None, enc: object, payload: bytes, associated: bytes, purpose: str
) -> bytes:
    """The plaintext of a verified envelope's payload, by the envelope rules: with
    ``CELERY_ENCRYPT`` on, every envelope is encrypted (header field ``enc``, the key
    id); with it off, none is. Called only after the envelope's MAC checked out, so a
    mismatch is a set-up mistake of the key holder, said in words.

    :raises SignatureError: ``encryption_mismatch`` (naming CELERY_ENCRYPT) or
        ``bad_mac`` (the ciphertext does not authenticate).
    """
    if enc is None:
        if cipher is None:
            return payload
        raise SignatureError(
            "encryption_mismatch",
            f"This {purpose} envelope is not encrypted, but CELERY_ENCRYPT is on in this"
            f" process: the process that sealed it runs with CELERY_ENCRYPT off. {_SAME_SETTING}",
        )
    if cipher is None:
        raise SignatureError(
            "encryption_mismatch",
            f"This {purpose} envelope is encrypted (CELERY_ENCRYPT is on where it was"
            f" sealed), but CELERY_ENCRYPT is off in this process. {_SAME_SETTING}",
        )
    if not isinstance(enc, str) or not cipher.knows(enc):
        raise SignatureError(
            "encryption_mismatch",
            f"This {purpose} envelope is encrypted with a key (id {str(enc)[:16]!r}) this"
            " process does not have: CELERY_ENCRYPT, or the signing key it is derived"
            f" from, differs between the processes. {_SAME_SETTING}",
        )
    try:
        return cipher.decrypt(enc, payload, associated)
    except InvalidCiphertext:
        raise SignatureError(
            "bad_mac", "Envelope ciphertext does not authenticate under its encryption key."
        ) from None

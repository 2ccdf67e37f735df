"""``CELERY_ENCRYPT`` as pure logic: the AES-GCM cipher, encrypted envelopes, the
setting's validation, and eager mode end to end (no broker; the real-worker and
at-rest checks are in ``test_encryption.py``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import sys
import time

import pytest
from flask import Flask

from flask_execute import Celery
from flask_execute import ConfigurationError
from flask_execute import SignatureError
from flask_execute.config import load
from flask_execute.crypto import Cipher
from flask_execute.crypto import derive_encryption_key
from flask_execute.crypto import InvalidCiphertext
from flask_execute.crypto import NONCE_SIZE
from flask_execute.envelopes import Codec
from flask_execute.envelopes import derive_key
from flask_execute.failures import make_carrier
from tests.test_security import handmade

OLD = b"an old encryption secret"
NEW = b"a new encryption secret!"
AAD = b"fe1.header"
K = derive_key(b"the signing secret")
SAME_SETTING = "Set the same CELERY_ENCRYPT on the web and worker processes."
PIP = "pip install 'flask-execute[encrypt]'"


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def refusal(codec: Codec, envelope: str, purpose: str = "call", tid: str = "t1") -> SignatureError:
    with pytest.raises(SignatureError) as info:
        codec.open(envelope, purpose, tid)
    return info.value


# --- the cipher -------------------------------------------------------------------------
def test_round_trip_hides_the_plaintext() -> None:
    cipher = Cipher([NEW])
    secret = b"the canary plaintext"
    sealed = cipher.encrypt(secret, AAD)
    assert secret not in sealed
    assert len(sealed) == NONCE_SIZE + len(secret) + 16  # nonce, ciphertext, tag
    assert cipher.decrypt(cipher.kid, sealed, AAD) == secret


@pytest.mark.parametrize(
    "position",
    [0, NONCE_SIZE - 1, NONCE_SIZE, NONCE_SIZE + 5, -16, -1],
    ids=["nonce-first", "nonce-last", "ciphertext-first", "ciphertext", "tag-first", "tag-last"],
)
def test_any_changed_byte_fails(position: int) -> None:
    cipher = Cipher([NEW])
    sealed = bytearray(cipher.encrypt(b"some plaintext", AAD))
    sealed[position] ^= 0x01
    with pytest.raises(InvalidCiphertext, match=r"^Ciphertext does not authenticate\.$"):
        cipher.decrypt(cipher.kid, bytes(sealed), AAD)


def test_changed_associated_data_fails() -> None:
    cipher = Cipher([NEW])
    sealed = cipher.encrypt(b"some plaintext", AAD)
    with pytest.raises(InvalidCiphertext, match="does not authenticate"):
        cipher.decrypt(cipher.kid, sealed, AAD + b"x")


def test_truncated_ciphertext_fails() -> None:
    cipher = Cipher([NEW])
    with pytest.raises(InvalidCiphertext, match=r"^Ciphertext is too short\.$"):
        cipher.decrypt(cipher.kid, cipher.encrypt(b"", AAD)[:-1], AAD)


def test_wrong_key_fails() -> None:
    sealed = Cipher([OLD]).encrypt(b"some plaintext", AAD)
    other, old_kid = Cipher([NEW]), Cipher([OLD]).kid
    with pytest.raises(InvalidCiphertext, match=f"^No encryption key with id '{old_kid}'"):
        other.decrypt(old_kid, sealed, AAD)
    # even under the id of a key it holds, another key never decrypts it
    with pytest.raises(InvalidCiphertext, match="does not authenticate"):
        other.decrypt(other.kid, sealed, AAD)


def test_rotation() -> None:
    old, new, both = Cipher([OLD]), Cipher([NEW]), Cipher([NEW, OLD])
    assert both.kid == new.kid != old.kid  # the newest key encrypts ...
    from_old = old.encrypt(b"queued before the rotation", AAD)
    assert both.decrypt(old.kid, from_old, AAD) == b"queued before the rotation"  # ... all decrypt
    assert new.decrypt(both.kid, both.encrypt(b"after", AAD), AAD) == b"after"
    with pytest.raises(InvalidCiphertext, match="No encryption key"):  # the old key retired
        new.decrypt(old.kid, from_old, AAD)
    assert repr(both) == f"<Cipher kid={new.kid} keys=2>"


def test_nonces_are_random_and_unique() -> None:
    cipher = Cipher([NEW])
    sealed = [cipher.encrypt(b"the same plaintext", AAD) for _ in range(20_000)]
    nonces = {s[:NONCE_SIZE] for s in sealed}
    assert len(nonces) == len(sealed)  # no nonce reused, the same plaintext never repeats
    assert len({s[NONCE_SIZE:] for s in sealed}) == len(sealed)
    # random, not a counter: the nonces share no common prefix
    assert len({n[:4] for n in nonces}) > len(sealed) // 2


def test_keys_are_derived_apart_from_the_signing_keys() -> None:
    secret = b"SECRET_KEY value"
    signing = derive_key(secret)
    encryption = derive_encryption_key(signing)
    purpose_keys = {
        hmac.new(signing, b"flask-execute/v1/" + p.encode(), hashlib.sha256).digest()
        for p in ("call", "result", "error")
    }
    assert len(encryption) == 32  # AES-256
    assert encryption not in {secret, signing, *purpose_keys}
    assert derive_encryption_key(secret) != encryption


def test_missing_cryptography_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    message = (
        "'CELERY_ENCRYPT' is on, but the 'cryptography' package is not installed:"
        f" {PIP} (on the web and worker processes)."
    )
    with pytest.raises(ConfigurationError) as info:
        Cipher([NEW])
    assert str(info.value) == message
    app = Flask("crypt_missing")
    app.config.update(SECRET_KEY="s" * 16, CELERY_ENCRYPT=True, CELERY_START_LOCAL_WORKERS=False)
    with pytest.raises(ConfigurationError) as info:
        Celery(app)
    assert str(info.value) == message
    # off, the package is not needed
    app = Flask("crypt_missing_off")
    app.config.update(SECRET_KEY="s" * 16, CELERY_START_LOCAL_WORKERS=False)
    Celery(app)


# --- encrypted envelopes ----------------------------------------------------------------
def test_envelope_header_stays_clear_and_the_payload_does_not() -> None:
    codec = Codec(K, encrypt=True)
    payload = pickle.dumps("the canary argument")
    envelope = codec.seal("call", "t1", payload, extra={"fn": "m:f"})
    _, head, body, _ = envelope.split(".")
    header = json.loads(b64d(head))
    assert header["enc"] == Cipher([K]).kid  # True: derived from the signing key
    assert header["fn"] == "m:f" and header["tid"] == "t1"
    assert b"canary" not in b64d(body)
    assert codec.open(envelope, "call", "t1") == (header, payload)
    assert codec.encrypts and not Codec(K).encrypts
    assert repr(codec) == f"<Codec kid={codec.kid} keys=1 encrypted={Cipher([K]).kid}>"


def test_mac_is_checked_before_anything_is_decrypted(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec(K, encrypt=True)
    envelope = codec.seal("call", "t1", b"payload")

    def never(*args: object) -> bytes:
        raise AssertionError("decrypted before the MAC was checked")

    monkeypatch.setattr(Cipher, "decrypt", never)
    _, head, body, mac = envelope.split(".")
    tampered = f"fe1.{head}.{'A' if body[5] != 'A' else 'B'}{body[1:5]}{body[6:]}.{mac}"
    error = refusal(codec, tampered)
    assert (error.reason, str(error)) == ("bad_mac", "Envelope signature does not match.")


def _encrypted_by_hand(header: dict[str, object], plaintext: bytes) -> tuple[str, bytes]:
    """What a holder of the signing key, but not of the encryption key, could MAC."""
    head = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return head, Cipher([K]).encrypt(plaintext, f"fe1.{head}".encode())


def test_ciphertext_is_bound_to_its_header() -> None:
    codec = Codec(K, encrypt=True)
    now = int(time.time())
    header = {"p": "call", "tid": "t1", "kid": codec.kid, "iat": now, "exp": now + 60}
    header["enc"] = Cipher([K]).kid
    _, sealed = _encrypted_by_hand(header, b"payload")
    assert codec.open(handmade(header, sealed, K, "call"), "call", "t1")[1] == b"payload"
    altered = bytearray(sealed)
    altered[-1] ^= 1
    # re-MACed, so only the AEAD tag can catch these
    for envelope, tid in (
        (handmade(header, bytes(altered), K, "call"), "t1"),
        (handmade({**header, "tid": "t2"}, sealed, K, "call"), "t2"),  # moved to another task
    ):
        error = refusal(codec, envelope, tid=tid)
        assert (error.reason, str(error)) == (
            "bad_mac",
            "Envelope ciphertext does not authenticate under its encryption key.",
        )


@pytest.mark.parametrize("purpose", ["call", "result", "error"])
def test_encrypted_envelope_refused_where_encryption_is_off(purpose: str) -> None:
    envelope = Codec(K, encrypt=True).seal(purpose, "t1", b"payload")
    error = refusal(Codec(K), envelope, purpose)
    assert error.reason == "encryption_mismatch"
    assert str(error) == (
        f"This {purpose} envelope is encrypted (CELERY_ENCRYPT is on where it was sealed),"
        f" but CELERY_ENCRYPT is off in this process. {SAME_SETTING}"
    )


@pytest.mark.parametrize("purpose", ["call", "result", "error"])
def test_clear_envelope_refused_where_encryption_is_on(purpose: str) -> None:
    envelope = Codec(K).seal(purpose, "t1", b"payload")
    error = refusal(Codec(K, encrypt=True), envelope, purpose)
    assert error.reason == "encryption_mismatch"
    assert str(error) == (
        f"This {purpose} envelope is not encrypted, but CELERY_ENCRYPT is on in this"
        f" process: the process that sealed it runs with CELERY_ENCRYPT off. {SAME_SETTING}"
    )


def test_envelope_under_another_encryption_key_is_refused() -> None:
    envelope = Codec(K, encrypt=[OLD]).seal("result", "t1", b"payload")
    error = refusal(Codec(K, encrypt=[NEW]), envelope, "result")
    assert error.reason == "encryption_mismatch"
    assert str(error) == (
        f"This result envelope is encrypted with a key (id '{Cipher([OLD]).kid}') this"
        " process does not have: CELERY_ENCRYPT, or the signing key it is derived from,"
        f" differs between the processes. {SAME_SETTING}"
    )


def test_rotation_of_dedicated_keys() -> None:
    queued = Codec(K, encrypt=[OLD]).seal("call", "t1", b"sealed before")
    rotated = Codec(K, encrypt=[NEW, OLD])
    assert rotated.open(queued, "call", "t1")[1] == b"sealed before"
    fresh = rotated.seal("call", "t1", b"sealed after")
    assert Codec(K, encrypt=[NEW]).open(fresh, "call", "t1")[1] == b"sealed after"


def test_rotation_follows_the_signing_keys() -> None:
    old, new = derive_key(b"old SECRET_KEY"), derive_key(b"new SECRET_KEY")
    queued = Codec(old, encrypt=True).seal("call", "t1", b"sealed before")
    # SECRET_KEY = new, SECRET_KEY_FALLBACKS = [old]: the old key verifies and decrypts
    assert Codec(new, [old], encrypt=True).open(queued, "call", "t1")[1] == b"sealed before"
    error = refusal(Codec(new, encrypt=True), queued)
    assert error.reason == "unknown_key"  # retired: the signature fails first


def test_carrier_keeps_the_message_out_of_clear_state() -> None:
    exc = ValueError("the canary message")
    hidden = make_carrier(exc, "envelope", clear=False)
    assert type(hidden).__qualname__ == "ValueError" and type(hidden).__module__ == "builtins"
    assert hidden.args == ("<encrypted>", {"flask_execute": "envelope"}, "ValueError(<encrypted>)")
    assert "canary" not in str(hidden) + repr(hidden)
    assert make_carrier(exc, "envelope").args[0] == "the canary message"


# --- the setting -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (False, False),
        (True, True),
        ("x" * 16, [b"x" * 16]),
        (b"\x00" * 32, [b"\x00" * 32]),
        (["n" * 16, b"o" * 20], [b"n" * 16, b"o" * 20]),
        (("n" * 16,), [b"n" * 16]),
    ],
)
def test_accepted_settings(value: object, expected: object) -> None:
    assert load({"CELERY_ENCRYPT": value}).encrypt == expected


EXPECTED = (
    "'CELERY_ENCRYPT' must be True, False, a key of at least 16 bytes (str or bytes) or a"
    " list of such keys, newest first; got"
)
GENERATE = ' Generate one with python -c "import secrets; print(secrets.token_urlsafe(32))".'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1, f"{EXPECTED} a value of type 'int'."),
        (None, f"{EXPECTED} a value of type 'NoneType'."),
        ({"key": "k" * 16}, f"{EXPECTED} a value of type 'dict'."),
        ([], f"{EXPECTED} an empty list."),
        ("", f"{EXPECTED} a key of 0 bytes.{GENERATE}"),
        ("short secret", f"{EXPECTED} a key of 12 bytes.{GENERATE}"),
        (["n" * 16, b"old"], f"{EXPECTED} a key of 3 bytes.{GENERATE}"),
        (["n" * 16, 5], f"{EXPECTED} a list item of type 'int'."),
    ],
)
def test_rejected_settings_never_quote_a_key(value: object, message: str) -> None:
    app = Flask("crypt_config")
    app.config.update(SECRET_KEY="s" * 16, CELERY_ENCRYPT=value)
    with pytest.raises(ConfigurationError) as info:
        Celery(app)
    assert str(info.value) == message


# --- eager mode: the same dispatch path, in process ---------------------------------------
def reveal(secret: str) -> dict[str, str]:
    return {"echo": secret}


def fail(secret: str) -> None:
    raise KeyError(secret)


def test_eager_calls_map_chunks_and_errors_round_trip() -> None:
    app = Flask("crypt_eager")
    app.config.update(SECRET_KEY="eager secret", CELERY_ALWAYS_EAGER=True, CELERY_ENCRYPT=True)
    celery = Celery(app)
    with app.app_context():
        assert app.extensions["celery"].runtime(app).codec.encrypts
        assert celery.submit(reveal, "a").result() == {"echo": "a"}
        assert celery.map(reveal, ["b"], ["c"], chunksize=2).result() == [
            {"echo": "b"},
            {"echo": "c"},
        ]
        assert isinstance(celery.submit(fail, "d").exception(), KeyError)
        pool = celery.map(fail, ["e"], ["f"], chunksize=2)
        assert [type(f.exception()) for f in pool] == [KeyError, KeyError]

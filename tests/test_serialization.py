"""``flask_execute.serialization``: signed envelopes and how calls, results and
exceptions are pickled (pure logic: no broker, no workers)."""

from __future__ import annotations

import base64
import json
import pickle
import string
import threading
import types
from collections.abc import Callable

import flask
import pytest
from flask import current_app
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import flask_execute
from flask_execute import current_task
from flask_execute import envelopes
from flask_execute import ExecuteError
from flask_execute import RemoteError
from flask_execute import SerializationError
from flask_execute import SignatureError
from flask_execute.envelopes import Codec
from flask_execute.envelopes import derive_key
from flask_execute.envelopes import key_id
from flask_execute.serialization import dump_call
from flask_execute.serialization import dump_calls
from flask_execute.serialization import dump_exception

REASONS = {
    "bad_mac",
    "expired",
    "malformed",
    "unknown_key",
    "binding_mismatch",
    "python_mismatch",
    "too_large",
}
K1 = derive_key(b"the old secret")
K2 = derive_key(b"the new secret")
T0 = 1_800_000_000  # a fixed "now" for the clock fixture
DAY = 24 * 3600


# --- helpers --------------------------------------------------------------------------
def add(x, y):
    return x + y


def total(*numbers):
    return sum(numbers)


class Evil:
    """Unpickling this creates the canary file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


class Clock:
    def __init__(self) -> None:
        self.now = float(T0)

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Time as seen by the serialization module only."""
    fake = Clock()
    monkeypatch.setattr(envelopes, "time", types.SimpleNamespace(time=fake.time))
    return fake


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def other_char(c: str) -> str:
    return "B" if c == "A" else "A"


def flip(envelope: str, part: int, index: int) -> str:
    """Replace one character of part ``part`` (1 header, 2 payload, 3 mac)."""
    parts = envelope.split(".")
    text = parts[part]
    parts[part] = text[:index] + other_char(text[index]) + text[index + 1 :]
    return ".".join(parts)


def with_header(envelope: str, **changes: object) -> str:
    """The same payload and MAC under a rewritten header."""
    version, head, body, mac = envelope.split(".")
    header = json.loads(b64d(head))
    header.update(changes)
    return ".".join([version, b64e(json.dumps(header).encode()), body, mac])


def rejected(codec: Codec, envelope: object, purpose: str = "call", tid: str = "t1") -> str:
    with pytest.raises(SignatureError) as excinfo:
        codec.open(envelope, purpose, tid)
    assert excinfo.value.reason in REASONS
    return excinfo.value.reason


# --- envelopes ------------------------------------------------------------------------
def test_round_trip_and_format(clock: Clock) -> None:
    codec = Codec(K1)
    envelope = codec.seal("call", "t1", b"\x80\x05payload")
    version, head, body, mac = envelope.split(".")
    assert version == "fe1"
    assert json.loads(b64d(head)) == {
        "p": "call",
        "tid": "t1",
        "kid": key_id(K1),
        "iat": T0,
        "exp": T0 + envelopes.DEFAULT_MAX_AGE,
    }
    assert b64d(body) == b"\x80\x05payload"
    assert len(b64d(mac)) == 32
    assert all(
        set(part) <= set(string.ascii_letters + string.digits + "-_") for part in (head, body, mac)
    )
    header, payload = codec.open(envelope, "call", "t1")
    assert payload == b"\x80\x05payload"
    assert header == json.loads(b64d(head))


def test_by_value_and_extra_are_in_the_header() -> None:
    codec = Codec(K1)
    header, _ = codec.open(codec.seal("call", "t1", b"x", by_value=True), "call", "t1")
    assert header["py"] == envelopes.PYTHON
    header, _ = codec.open(codec.seal("call", "t1", b"x", extra={"fn": "m:f"}), "call", "t1")
    assert header["fn"] == "m:f"
    assert "py" not in header


def test_empty_payload() -> None:
    codec = Codec(K1)
    assert codec.open(codec.seal("result", "t1", b""), "result", "t1")[1] == b""


def test_open_returns_bytes_and_never_unpickles(tmp_path) -> None:
    canary = tmp_path / "pwned"
    data = pickle.dumps(Evil(str(canary)))
    codec = Codec(K1)
    header, payload = codec.open(codec.seal("call", "t1", data), "call", "t1")
    assert type(payload) is bytes
    assert payload == data
    assert isinstance(header, dict)
    assert not canary.exists()


@pytest.mark.parametrize(
    ("part", "index", "reasons"),
    [
        (2, 0, {"bad_mac"}),
        (2, 7, {"bad_mac"}),
        (2, -1, {"bad_mac"}),
        (3, 0, {"bad_mac"}),
        (3, 20, {"bad_mac"}),
        (1, 0, {"malformed"}),
        (1, 10, {"bad_mac", "malformed", "unknown_key", "binding_mismatch"}),
        (1, 30, {"bad_mac", "malformed", "unknown_key", "binding_mismatch"}),
        (1, -2, {"bad_mac", "malformed", "unknown_key", "binding_mismatch"}),
    ],
)
def test_tampered_envelope_is_rejected_before_unpickling(
    tmp_path, part: int, index: int, reasons: set[str]
) -> None:
    canary = tmp_path / "pwned"
    codec = Codec(K1)
    envelope = codec.seal("call", "t1", pickle.dumps(Evil(str(canary))))
    if index < 0:
        index += len(envelope.split(".")[part])
    assert rejected(codec, flip(envelope, part, index)) in reasons
    assert not canary.exists()


def test_rebinding_the_header_breaks_the_mac() -> None:
    codec = Codec(K1)
    envelope = codec.seal("call", "t1", b"x")
    assert rejected(codec, with_header(envelope, tid="t2"), tid="t2") == "bad_mac"
    assert rejected(codec, with_header(envelope, exp=2**40)) == "bad_mac"
    assert rejected(codec, with_header(envelope, py=None)) == "bad_mac"


def test_result_cannot_be_replayed_as_a_call() -> None:
    codec = Codec(K1)
    result = codec.seal("result", "t1", b"x")
    assert rejected(codec, result, purpose="call") == "binding_mismatch"
    # relabelling the purpose does not help: each purpose signs with its own key
    assert rejected(codec, with_header(result, p="call"), purpose="call") == "bad_mac"


def test_wrong_task_id() -> None:
    codec = Codec(K1)
    envelope = codec.seal("call", "t1", b"x")
    with pytest.raises(SignatureError) as excinfo:
        codec.open(envelope, "call", "t2")
    assert excinfo.value.reason == "binding_mismatch"
    assert str(excinfo.value) == "Envelope belongs to another task id."


def test_wrong_purpose() -> None:
    codec = Codec(K1)
    envelope = codec.seal("error", "t1", b"x")
    assert rejected(codec, envelope, purpose="result") == "binding_mismatch"


def test_unknown_key() -> None:
    envelope = Codec(K1).seal("call", "t1", b"x")
    with pytest.raises(SignatureError) as excinfo:
        Codec(K2).open(envelope, "call", "t1")
    assert excinfo.value.reason == "unknown_key"
    assert str(excinfo.value) == f"Envelope signed with unknown key id {key_id(K1)!r}."


def test_forged_kid_is_unknown_key() -> None:
    envelope = Codec(K1).seal("call", "t1", b"x")
    assert rejected(Codec(K1), with_header(envelope, kid=["list"])) == "unknown_key"
    assert rejected(Codec(K1), with_header(envelope, kid=None)) == "unknown_key"


def test_expired(clock: Clock) -> None:
    codec = Codec(K1, max_age=60)
    envelope = codec.seal("call", "t1", b"x")
    clock.now = T0 + 60
    assert codec.open(envelope, "call", "t1")[1] == b"x"
    clock.now = T0 + 61
    with pytest.raises(SignatureError) as excinfo:
        codec.open(envelope, "call", "t1")
    assert excinfo.value.reason == "expired"
    assert str(excinfo.value) == "Envelope has expired."


def test_issued_in_the_future(clock: Clock) -> None:
    codec = Codec(K1)
    clock.now = T0 + 3600
    envelope = codec.seal("call", "t1", b"x")
    clock.now = T0
    with pytest.raises(SignatureError) as excinfo:
        codec.open(envelope, "call", "t1")
    assert excinfo.value.reason == "expired"
    assert str(excinfo.value) == "Envelope was issued in the future."
    # a little clock skew between web and worker hosts is fine
    clock.now = T0 + 3600 - 200
    assert codec.open(envelope, "call", "t1")[1] == b"x"


def test_expiry_follows_not_before(clock: Clock) -> None:
    codec = Codec(K1, max_age=DAY)
    envelope = codec.seal("call", "t1", b"x", not_before=T0 + 30 * DAY)
    header, _ = codec.open(envelope, "call", "t1")
    assert header["exp"] == T0 + 31 * DAY
    clock.now = T0 + 2 * DAY  # max_age after issue has long passed; the ETA has not
    assert codec.open(envelope, "call", "t1")[1] == b"x"
    clock.now = T0 + 31 * DAY
    assert codec.open(envelope, "call", "t1")[1] == b"x"
    clock.now = T0 + 31 * DAY + 1
    assert rejected(codec, envelope) == "expired"


def test_not_before_in_the_past_counts_from_now(clock: Clock) -> None:
    codec = Codec(K1, max_age=DAY)
    header, _ = codec.open(codec.seal("call", "t1", b"x", not_before=T0 - 5 * DAY), "call", "t1")
    assert header["exp"] == T0 + DAY


def test_too_large() -> None:
    envelope = Codec(K1).seal("call", "t1", b"x" * 200)
    small = Codec(K1, max_size=len(envelope) - 1)
    with pytest.raises(SignatureError) as excinfo:
        small.open(envelope, "call", "t1")
    assert excinfo.value.reason == "too_large"
    assert str(excinfo.value) == f"Envelope of {len(envelope)} bytes is too large."
    assert Codec(K1, max_size=len(envelope)).open(envelope, "call", "t1")[1] == b"x" * 200


def test_seal_refuses_too_large() -> None:
    codec = Codec(K1, max_size=100)
    with pytest.raises(SerializationError) as excinfo:
        codec.seal("call", "t1", b"x" * 200)
    message = str(excinfo.value)
    assert message.startswith("The call payload is ")
    assert message.endswith(" bytes, over the CELERY_MAX_MESSAGE_SIZE limit of 100 bytes.")


def _valid() -> str:
    return Codec(K1).seal("call", "t1", b"x")


@pytest.mark.parametrize(
    "envelope",
    [
        None,
        42,
        b"fe1.a.b.c",
        {"envelope": "fe1"},
        "",
        "garbage",
        "fe1.a.b",
        "fe1.a.b.c.d",
        "fe1...",
        "fe1.!!!.AA.AA",
        "fe1." + b64e(b"[1, 2]") + ".AA.AA",
        "fe1." + b64e(b"\xff\xfe{") + ".AA.AA",
        "fe1." + "A" * 5000 + ".AA.AA",
        "fe2." + _valid().split(".", 1)[1],
        "FE1." + _valid().split(".", 1)[1],
    ],
)
def test_malformed(envelope: object) -> None:
    with pytest.raises(SignatureError) as excinfo:
        Codec(K1).open(envelope, "call", "t1")
    assert excinfo.value.reason == "malformed"


def test_malformed_mac_encoding() -> None:
    envelope = _valid()
    # a 45-character MAC is not base64 at all; a 44-character one is simply wrong
    assert rejected(Codec(K1), envelope + "AA") == "malformed"
    assert rejected(Codec(K1), envelope + "A") == "bad_mac"


def test_signed_header_without_validity_window_is_malformed() -> None:
    codec = Codec(K1)
    envelope = codec.seal("call", "t1", b"x", extra={"iat": None})
    with pytest.raises(SignatureError) as excinfo:
        codec.open(envelope, "call", "t1")
    assert excinfo.value.reason == "malformed"
    assert str(excinfo.value) == "Envelope has no validity window."


def test_deeply_nested_header_is_malformed() -> None:
    envelope = "fe1." + b64e(b"[" * 3000) + ".AA.AA"
    with pytest.raises(SignatureError) as excinfo:
        Codec(K1).open(envelope, "call", "t1")
    assert excinfo.value.reason == "malformed"


def test_python_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    sealer = envelopes.PYTHON
    codec = Codec(K1)
    by_value = codec.seal("call", "t1", b"x", by_value=True)
    by_reference = codec.seal("call", "t2", b"y")
    monkeypatch.setattr(envelopes, "PYTHON", "2.7")
    with pytest.raises(SignatureError) as excinfo:
        codec.open(by_value, "call", "t1")
    assert excinfo.value.reason == "python_mismatch"
    assert str(excinfo.value) == (
        f"Envelope carries code pickled by value on Python {sealer}; this is Python 2.7."
        " Run workers on the same Python version as the web process."
    )
    # by-reference payloads are not tied to one Python version
    assert codec.open(by_reference, "call", "t2")[1] == b"y"


def test_signature_error_default_message() -> None:
    error = SignatureError("bad_mac")
    assert error.reason == "bad_mac"
    assert str(error) == "Signed envelope rejected: bad_mac."
    assert isinstance(error, ExecuteError)


# --- keys -----------------------------------------------------------------------------
def test_rotation_old_envelopes_still_open() -> None:
    old = Codec(K1).seal("call", "t1", b"sealed with k1")
    rotated = Codec(K2, [K1])
    assert rotated.open(old, "call", "t1")[1] == b"sealed with k1"


def test_rotation_newest_key_signs() -> None:
    # cf. Flask CVE-2025-47278: the fallback keys must verify only, never sign
    rotated = Codec(K2, [K1])
    assert rotated.kid == key_id(K2)
    envelope = rotated.seal("call", "t1", b"x")
    assert json.loads(b64d(envelope.split(".")[1]))["kid"] == key_id(K2)
    assert Codec(K2).open(envelope, "call", "t1")[1] == b"x"
    assert rejected(Codec(K1), envelope) == "unknown_key"


def test_rotation_without_the_old_key() -> None:
    old = Codec(K1).seal("call", "t1", b"x")
    assert rejected(Codec(K2), old) == "unknown_key"
    assert rejected(Codec(K2, [derive_key(b"another")]), old) == "unknown_key"


def test_derive_key() -> None:
    secret = b"flask secret key"
    key = derive_key(secret)
    assert len(key) == 32
    assert key == derive_key(secret)
    assert key != secret
    assert key != derive_key(secret, b"another.salt")
    assert derive_key(secret, b"a") != derive_key(secret, b"b")
    assert key != derive_key(b"flask secret kez")


def test_key_id_reveals_nothing() -> None:
    for key in (K1, K2, b"short", b"\x00" * 32):
        kid = key_id(key)
        assert len(kid) == 8
        assert set(kid) <= set(string.hexdigits.lower())
        assert kid not in key.hex()
        assert not key.hex().startswith(kid)
    assert key_id(K1) != key_id(K2)


def test_repr_has_no_key_material() -> None:
    key = b"very-secret-signing-key"
    codec = Codec(key, [b"older-secret-key"])
    text = repr(codec)
    assert text == f"<Codec kid={key_id(key)} keys=2>"
    for k in (key, b"older-secret-key"):
        assert k.hex() not in text
        assert k.decode() not in text
        assert b64e(k) not in text


# --- calls ----------------------------------------------------------------------------
def test_importable_function_travels_by_reference() -> None:
    data, by_value = dump_call(add, (1, 2), {})
    assert by_value is False
    func, args, kwargs = pickle.loads(data)
    assert func is add
    assert func(*args, **kwargs) == 3
    assert dump_call(add, (1,), {"y": 2})[1] is False


def test_lambda_travels_by_value() -> None:
    data, by_value = dump_call(lambda x: x * 2, (21,), {})
    assert by_value is True
    func, args, kwargs = pickle.loads(data)
    assert func(*args, **kwargs) == 42


def test_closure_travels_by_value() -> None:
    offset = 10

    def shifted(x):
        return x + offset

    data, by_value = dump_call(shifted, (5,), {})
    assert by_value is True
    func, args, kwargs = pickle.loads(data)
    assert func(*args, **kwargs) == 15


def test_main_module_function_travels_by_value() -> None:
    main_add = types.FunctionType(add.__code__, {"__name__": "__main__"}, "add")
    assert main_add.__module__ == "__main__"
    data, by_value = dump_call(main_add, (1, 2), {})
    assert by_value is True
    func, args, kwargs = pickle.loads(data)
    assert func is not add
    assert func(*args, **kwargs) == 3


def test_local_class_argument_travels_by_value() -> None:
    class Point:
        def __init__(self, x):
            self.x = x

    data, by_value = dump_call(add, (Point(1), 2), {})
    assert by_value is True


ARGUMENT_ADVICE = " Pass something picklable instead (for example an id the task can look up)."


def test_unpicklable_positional_argument_is_named() -> None:
    with pytest.raises(SerializationError) as excinfo:
        dump_call(add, (1, threading.Lock()), {})
    message = str(excinfo.value)
    assert message.startswith(
        f"Argument 'y' (position 1) of {__name__}:add cannot be serialized (lock value):"
        " TypeError: "
    )
    assert message.endswith("." + ARGUMENT_ADVICE)
    assert isinstance(excinfo.value.__cause__, TypeError)


def test_unpicklable_keyword_argument_is_named() -> None:
    with pytest.raises(SerializationError) as excinfo:
        dump_call(add, (1,), {"y": threading.Lock()})
    assert str(excinfo.value).startswith(
        f"Argument 'y' of {__name__}:add cannot be serialized (lock value): TypeError: "
    )


def test_unpicklable_variadic_argument_is_named_by_position() -> None:
    with pytest.raises(SerializationError) as excinfo:
        dump_call(total, (1, 2, threading.Lock()), {})
    assert str(excinfo.value).startswith(
        f"Positional argument 2 of {__name__}:total cannot be serialized (lock value): "
    )


def test_unpicklable_argument_in_a_map_chunk_is_named() -> None:
    with pytest.raises(SerializationError) as excinfo:
        dump_calls(add, [("t1", (1, 2), {}), ("t2", (3,), {"y": threading.Lock()})])
    assert str(excinfo.value).startswith(f"Argument 'y' of {__name__}:add cannot be serialized")


def test_unpicklable_function() -> None:
    lock = threading.Lock()

    def holds_lock():
        with lock:
            return 1

    with pytest.raises(SerializationError) as excinfo:
        dump_call(holds_lock, (), {})
    assert str(excinfo.value).startswith(
        f"The function {__name__}:test_unpicklable_function.<locals>.holds_lock cannot be"
        " sent to a worker: TypeError: "
    )


def test_serialization_error_hierarchy() -> None:
    assert issubclass(SerializationError, TypeError)
    assert issubclass(SerializationError, ExecuteError)


# --- Flask proxies --------------------------------------------------------------------
def test_flask_proxies_travel_by_name() -> None:
    # outside any app context: pickling the proxies by value would fail
    data, by_value = dump_call(lambda: (current_app, current_task), (), {})
    assert by_value is True
    func, args, kwargs = pickle.loads(data)
    app_proxy, task_proxy = func()
    assert app_proxy is flask.current_app
    assert task_proxy is flask_execute.current_task


def test_flask_proxy_arguments_travel_by_name() -> None:
    data, _ = dump_call(add, (flask.g, flask.request), {"y": flask.session})
    _, args, kwargs = pickle.loads(data)
    assert args[0] is flask.g
    assert args[1] is flask.request
    assert kwargs["y"] is flask.session


# --- exceptions -----------------------------------------------------------------------
def test_exception_round_trips_with_its_type() -> None:
    exc, tb_text = pickle.loads(dump_exception(KeyError("missing"), "Traceback ...\n"))
    assert type(exc) is KeyError
    assert exc.args == ("missing",)
    assert tb_text == "Traceback ...\n"


def test_unpicklable_exception_still_dumps() -> None:
    exc = ValueError("boom")
    exc.lock = threading.Lock()  # type: ignore[attr-defined]
    assert isinstance(dump_exception(exc, "tb"), bytes)
    assert isinstance(dump_exception(NeedsTwo(1, 2), "tb"), bytes)


def _held_lock_error() -> BaseException:
    exc = ValueError("boom")
    exc.lock = threading.Lock()  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize(
    ("make", "type_name", "message"),
    [
        (lambda: NeedsTwo(1, 2), f"{__name__}.NeedsTwo", "1 and 2"),
        (_held_lock_error, "builtins.ValueError", "boom"),
    ],
    ids=["required-init-args", "holds-a-lock"],
)
def test_unrebuildable_exception_becomes_remote_error(
    make: Callable[[], BaseException], type_name: str, message: str
) -> None:
    exc, tb_text = pickle.loads(dump_exception(make(), "Traceback (most recent call last):\n"))
    assert type(exc) is RemoteError
    assert exc.type_name == type_name
    assert exc.remote_message == message
    assert exc.remote_traceback == "Traceback (most recent call last):\n"
    assert tb_text == "Traceback (most recent call last):\n"


def test_remote_error_survives_pickle() -> None:
    error = pickle.loads(pickle.dumps(RemoteError("m.E", "msg", "tb")))
    assert (error.type_name, error.remote_message, error.remote_traceback) == ("m.E", "msg", "tb")


# --- property: one changed character ----------------------------------------------------
_ALPHABET = string.ascii_letters + string.digits + "-_."
_CODEC = Codec(K1)
_PAYLOAD = pickle.dumps({"answer": 42, "text": "a payload of some length " * 3})
_ENVELOPE = _CODEC.seal("call", "tid-1", _PAYLOAD, by_value=True)
_HEADER = _CODEC.open(_ENVELOPE, "call", "tid-1")[0]


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(_ENVELOPE) - 1), st.sampled_from(_ALPHABET))
def test_one_changed_character_never_opens_to_anything_else(position: int, char: str) -> None:
    mutated = _ENVELOPE[:position] + char + _ENVELOPE[position + 1 :]
    try:
        header, payload = _CODEC.open(mutated, "call", "tid-1")
    except SignatureError as exc:
        assert exc.reason in REASONS
        assert mutated != _ENVELOPE
        return
    assert (header, payload) == (_HEADER, _PAYLOAD)
    if mutated != _ENVELOPE:
        # The one accepted change: the MAC's last character carries 2 unused bits, so a
        # few characters there decode to the very same MAC (base64 is not canonical).
        assert position == len(_ENVELOPE) - 1
        assert b64d(mutated.rsplit(".", 1)[1]) == b64d(_ENVELOPE.rsplit(".", 1)[1])

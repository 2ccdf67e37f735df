"""Issue 10.1: keys anyone can compute are refused at ``init_app``.

With flask-execute a key that verifies envelopes decides which code the workers run,
so an empty or guessable key is remote code execution for anyone who can write to the
broker. The attack seen on main: ``SECRET_KEY_FALLBACKS=os.environ.get("OLD_KEYS",
"").split(",")`` gives ``[""]``, which was accepted and derives a key anyone can derive;
an envelope sealed with ``derive_key(b"")`` was unpickled on a worker.
"""

from __future__ import annotations

import pytest
from flask import Flask

from flask_execute import Celery
from flask_execute import ConfigurationError
from flask_execute.envelopes import Codec
from flask_execute.envelopes import derive_key
from flask_execute.keys import MIN_SECRET_LENGTH
from flask_execute.keys import PLACEHOLDERS

STRONG = "4f1c0e9a2b7d4e55a0c3b8f1d2e6a9c7"

DEVELOPMENT = {"CELERY_ALWAYS_EAGER": True}  # eager: no process is started
PRODUCTION = {"CELERY_START_LOCAL_WORKERS": False}


def build(**config: object) -> Flask:
    app = Flask("weak_keys")
    app.config.update(config)
    Celery(app)
    return app


def refusal(**config: object) -> str:
    with pytest.raises(ConfigurationError) as info:
        build(**config)
    return str(info.value)


def test_an_empty_fallback_from_an_unset_environment_variable_is_refused() -> None:
    old_keys = ""  # os.environ.get("OLD_KEYS", "")
    message = refusal(SECRET_KEY=STRONG, SECRET_KEY_FALLBACKS=old_keys.split(","), **DEVELOPMENT)
    assert message.startswith("'SECRET_KEY_FALLBACKS[0]' is an empty key. ")
    assert "lets anyone who can write to the broker run code on them" in message


@pytest.mark.parametrize("mode", [DEVELOPMENT, PRODUCTION], ids=["development", "production"])
@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"SECRET_KEY": ""}, "'SECRET_KEY'"),
        ({"SECRET_KEY": b"  "}, "'SECRET_KEY'"),
        ({"SECRET_KEY": STRONG, "SECRET_KEY_FALLBACKS": [STRONG, ""]}, "'SECRET_KEY_FALLBACKS[1]'"),
        ({"CELERY_SIGNING_KEY": ""}, "'CELERY_SIGNING_KEY'"),
        ({"CELERY_SIGNING_KEY": [STRONG, b""]}, "'CELERY_SIGNING_KEY'"),
        ({"CELERY_SIGNING_KEY": STRONG, "CELERY_SIGNING_KEY_FALLBACKS": [""]},
         "'CELERY_SIGNING_KEY_FALLBACKS'"),
    ],
)  # fmt: skip
def test_an_empty_key_in_any_setting_is_refused(
    mode: dict[str, object], config: dict[str, object], named: str
) -> None:
    message = refusal(**config, **mode)
    assert named in message
    assert "empty" in message


def test_the_empty_key_derives_a_key_anyone_can_compute() -> None:
    # why the refusal matters: what the attacker computes is what the app verified with
    attacker = Codec(derive_key(b""))
    victim = Codec(derive_key(STRONG.encode()), [derive_key(b"")])
    envelope = attacker.seal("call", "t1", b"pickle bytes")
    assert victim.open(envelope, "call", "t1")[1] == b"pickle bytes"


@pytest.mark.parametrize("setting", ["SECRET_KEY", "CELERY_SIGNING_KEY"])
@pytest.mark.parametrize(
    "secret",
    ["dev", "change-me", "secret", "Change-Me ", "demo-only-secret-change-me",
     "progress-example-only-change-me", "shop-dev", "x" * (MIN_SECRET_LENGTH - 1)],
)  # fmt: skip
def test_production_refuses_a_guessable_secret(setting: str, secret: str) -> None:
    message = refusal(**{setting: secret}, **PRODUCTION)
    why = (
        "is a well-known placeholder"
        if secret.strip().lower() in PLACEHOLDERS
        else f"is shorter than {MIN_SECRET_LENGTH} bytes"
    )
    assert message == (
        f"{setting!r} {why}. flask-execute signs the code that workers run with it:"
        " whoever guesses it and can write to the broker runs code on every worker"
        " (remote code execution, not only forged sessions). Set a long random value,"
        " e.g. python -c 'import secrets; print(secrets.token_hex(32))'."
    )
    assert repr(secret) not in message  # the value itself is never shown


def test_production_refuses_a_guessable_fallback() -> None:
    message = refusal(SECRET_KEY=STRONG, SECRET_KEY_FALLBACKS=[STRONG, "dev"], **PRODUCTION)
    assert message.startswith("'SECRET_KEY_FALLBACKS[1]' is a well-known placeholder.")
    message = refusal(
        CELERY_SIGNING_KEY=STRONG, CELERY_SIGNING_KEY_FALLBACKS=["short"], **PRODUCTION
    )
    assert message.startswith("'CELERY_SIGNING_KEY_FALLBACKS[0]' is shorter than 16 bytes.")


def test_production_ignores_a_weak_secret_key_when_a_signing_key_is_set() -> None:
    # SECRET_KEY then signs Flask's sessions only; flask-execute does not use it
    app = build(SECRET_KEY="dev", CELERY_SIGNING_KEY=STRONG, **PRODUCTION)
    assert app.extensions["celery"].runtime(app).codec.kid == Codec(STRONG.encode()).kid


@pytest.mark.parametrize(
    "mode",
    [DEVELOPMENT, {"CELERY_START_LOCAL_WORKERS": False, "TESTING": True},
     {"CELERY_START_LOCAL_WORKERS": False, "DEBUG": True}],
    ids=["local-workers", "testing", "debug"],
)  # fmt: skip
def test_development_accepts_the_quickstart_secret(mode: dict[str, object]) -> None:
    app = Flask("weak_keys_dev")
    app.config.update(SECRET_KEY="change-me", **mode)
    app.debug = bool(mode.get("DEBUG"))
    Celery(app)
    assert "celery" in app.extensions


def test_production_accepts_a_strong_secret() -> None:
    app = build(SECRET_KEY=STRONG, SECRET_KEY_FALLBACKS=[STRONG[::-1]], **PRODUCTION)
    assert app.extensions["celery"].runtime(app).codec.kid == Codec(derive_key(STRONG.encode())).kid

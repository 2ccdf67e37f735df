"""The one table of flask-execute configuration keys, their defaults and validation.

(Every other ``CELERY_*`` key is Celery's: :mod:`flask_execute.celery_conf` translates
them into Celery's own settings.)

``init_app`` calls :func:`load` exactly once per app. Errors are raised there, naming
the key, the accepted forms and the value found.
"""

from __future__ import annotations

import dataclasses
import typing as t
from collections.abc import Callable
from collections.abc import Mapping

from .errors import ConfigurationError
from .validators import boolean
from .validators import fail
from .validators import log_level
from .validators import non_empty_str
from .validators import optional_url
from .validators import path
from .validators import port
from .validators import positive_int
from .validators import positive_number
from .validators import seconds_or_zero
from .worker_options import workers

__all__ = ["DEFAULT_BROKER_URL", "KEYS", "KEY_NAMES", "Key", "Settings", "load"]

DEFAULT_BROKER_URL = "redis://localhost:6379"


def _basic_auth(key: str, value: object) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        _login_error(
            key, "an empty list" if items == [] else f"a value of type {type(value).__name__}"
        )
    for item in items:
        if not isinstance(item, str):
            _login_error(key, f"an entry of type {type(item).__name__}")
        user, colon, password = item.partition(":")
        if not (user and colon and password):
            _login_error(key, "an entry without a user, a ':' or a password")
        if "," in item:  # Flower splits its list on commas
            _login_error(key, f"a comma in the entry of user {user!r}")
    return list(items)


def _login_error(key: str, problem: str) -> t.NoReturn:
    raise ConfigurationError(
        f"{key!r} must be 'user:password' or a list of them, or None to generate a"
        f" password at each start; got {problem} (the value is not shown: it holds a"
        " password)."
    )


def _signing_keys(key: str, value: object) -> list[bytes]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        value = [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, bytes)) for v in value):
        if not all(value):
            # an empty key (often an unset environment variable) would let anyone sign
            raise ConfigurationError(
                f"{key!r} must be a non-empty key (str or bytes) or a list of non-empty keys;"
                " got an empty one."
            )
        return [v.encode() if isinstance(v, str) else v for v in value]
    # never the value: it may hold a key
    shown = (
        type(value).__name__
        if not isinstance(value, (list, tuple))
        else "a list holding " + (", ".join(sorted({type(v).__name__ for v in value})))
    )
    raise ConfigurationError(
        f"{key!r} must be a key (str or bytes) or a list of keys; got {shown}."
    )


#: Shortest dedicated CELERY_ENCRYPT key: a shorter one could be guessed.
MIN_ENCRYPTION_KEY = 16


def _encrypt(key: str, value: object) -> bool | list[bytes]:
    """``True``/``False``, a dedicated key (str or bytes), or a list of them (newest
    first). Errors never quote a key: only its length or its type."""
    if isinstance(value, bool):
        return value
    expected = (
        f"True, False, a key of at least {MIN_ENCRYPTION_KEY} bytes (str or bytes) or a"
        " list of such keys, newest first"
    )
    items = [value] if isinstance(value, (str, bytes)) else value
    if not isinstance(items, (list, tuple)) or not items:
        found = (
            "an empty list"
            if isinstance(items, (list, tuple))
            else f"a value of type {type(value).__name__!r}"
        )
        raise ConfigurationError(f"{key!r} must be {expected}; got {found}.")
    keys: list[bytes] = []
    for item in items:
        if not isinstance(item, (str, bytes)):
            raise ConfigurationError(
                f"{key!r} must be {expected}; got a list item of type {type(item).__name__!r}."
            )
        raw = item.encode() if isinstance(item, str) else item
        if len(raw) < MIN_ENCRYPTION_KEY:
            raise ConfigurationError(
                f"{key!r} must be {expected}; got a key of {len(raw)} bytes. Generate one"
                ' with python -c "import secrets; print(secrets.token_urlsafe(32))".'
            )
        keys.append(raw)
    return keys


@dataclasses.dataclass(frozen=True)
class Key:
    """One plugin configuration key: its default and its validator."""

    name: str
    default: object
    validate: Callable[[str, object], object]
    doc: str


KEYS: tuple[Key, ...] = (
    Key(
        "CELERY_BROKER_URL",
        None,
        optional_url,
        f"Broker URL. Unset: {DEFAULT_BROKER_URL}, or the embedded Redis in development",
    ),
    Key(
        "CELERY_RESULT_BACKEND",
        None,
        optional_url,
        "Result backend URL. Unset: the broker URL when it is Redis",
    ),
    Key(
        "CELERY_WORKERS",
        1,
        workers,
        "Local workers: a count, a list of names, or a dict of name -> worker options",
    ),
    Key(
        "CELERY_START_LOCAL_WORKERS",
        True,
        boolean,
        "Start the local workers (and beat, Flower) on the first submit",
    ),
    Key(
        "CELERY_START_TIMEOUT",
        10,
        positive_number,
        "Seconds to wait for local services to answer before raising",
    ),
    Key("CELERY_LOG_LEVEL", "INFO", log_level, "Log level of local services"),
    Key(
        "CELERY_LOG_DIR",
        None,
        path,
        "Directory of local services' logs and beat's schedule (default: the instance folder)",
    ),
    Key("CELERY_FLOWER", True, boolean, "Start Flower with the local workers when installed"),
    Key("CELERY_FLOWER_PORT", 5555, port, "Port of the local Flower"),
    Key("CELERY_FLOWER_ADDRESS", "127.0.0.1", non_empty_str, "Address the local Flower binds to"),
    Key(
        "CELERY_FLOWER_BASIC_AUTH",
        None,
        _basic_auth,
        "Login of the local Flower: 'user:password' or a list (default: generated, logged)",
    ),
    Key(
        "CELERY_SCHEDULER",
        True,
        boolean,
        "Start beat with the local workers when a schedule exists",
    ),
    Key(
        "CELERY_SANITIZE_ARGUMENTS",
        True,
        boolean,
        "Resolve LocalProxy arguments and send Flask-SQLAlchemy models by primary key",
    ),
    Key("CELERY_ALWAYS_EAGER", False, boolean, "Run tasks inline in the caller (tests)"),
    Key(
        "CELERY_SIGNING_KEY",
        None,
        _signing_keys,
        "Key signing task and result envelopes (default: derived from SECRET_KEY)",
    ),
    Key(
        "CELERY_SIGNING_KEY_FALLBACKS",
        None,
        _signing_keys,
        "Older signing keys still accepted for verification",
    ),
    Key(
        "CELERY_EMBEDDED_BROKER",
        True,
        boolean,
        "In development, start a private Redis when no broker is configured or reachable",
    ),
    Key(
        "CELERY_BROKER_TIMEOUT",
        3,
        positive_number,
        "Seconds submit() may spend reaching the broker before BrokerUnavailable",
    ),
    Key(
        "CELERY_MAX_DELIVERIES",
        3,
        positive_int,
        "At-least-once tasks: deliveries (worker deaths) before giving up with a failure",
    ),
    Key(
        "CELERY_EXIT_WAIT",
        60,
        seconds_or_zero,
        "At exit, seconds to wait for unfinished calls before stopping local workers",
    ),
    Key(
        "CELERY_PICKLE_BY_VALUE",
        True,
        boolean,
        "Send lambdas, closures and __main__ functions by value (cloudpickle)",
    ),
    Key(
        "CELERY_UNSAFE_ALLOW_PICKLE",
        False,
        boolean,
        "Let Celery's own serializers use pickle (UNSAFE: broker writers can run code)",
    ),
    Key(
        "CELERY_MAX_MESSAGE_SIZE",
        64 * 1024 * 1024,
        positive_int,
        "Largest signed envelope (bytes) accepted for a call or a result",
    ),
    Key(
        "CELERY_ENCRYPT",
        False,
        _encrypt,
        "Encrypt calls, results and errors (AES-GCM): True (key derived from the signing"
        " key), a dedicated key, or a list of keys (newest first)",
    ),
)
#: The plugin's own keys (never passed to Celery).
KEY_NAMES = frozenset(k.name for k in KEYS)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated plugin settings of one app (read once, at ``init_app``)."""

    broker_url: str | None
    result_backend: str | None
    workers: dict[str, dict[str, object]]
    start_local_workers: bool
    start_timeout: float
    log_level: str
    log_dir: str | None
    flower: bool
    flower_port: int
    flower_address: str
    scheduler: bool
    sanitize_arguments: bool
    always_eager: bool
    signing_keys: list[bytes]
    signing_key_fallbacks: list[bytes]
    embedded_broker: bool
    broker_timeout: float
    max_message_size: int
    pickle_by_value: bool
    unsafe_allow_pickle: bool
    max_deliveries: int
    encrypt: bool | list[bytes]
    flower_basic_auth: list[str] = dataclasses.field(default_factory=list, repr=False)
    exit_wait: float = 60.0


def load(config: Mapping[str, object]) -> Settings:
    """Validate the plugin keys of ``config`` (an ``app.config``) and return them.

    Missing keys take their defaults; ``CELERY_ALWAYS_EAGER`` is also read from the
    new-style ``CELERY_TASK_ALWAYS_EAGER`` / ``CELERY = {"task_always_eager": ...}``.
    :raises ConfigurationError: a key has a value of the wrong form.
    """
    values: dict[str, object] = {}
    for key in KEYS:
        raw = config.get(key.name, key.default)
        values[key.name] = key.validate(key.name, raw)
    nested = config.get("CELERY")
    if nested is not None and not isinstance(nested, Mapping):
        fail("CELERY", "a dict of Celery settings (lower-case names)", nested)
    eager = values["CELERY_ALWAYS_EAGER"]
    for alias in ("CELERY_TASK_ALWAYS_EAGER",):
        if alias in config:
            eager = boolean(alias, config[alias]) or eager
    if nested and "task_always_eager" in nested:
        eager = boolean("CELERY['task_always_eager']", nested["task_always_eager"]) or eager
    broker = values["CELERY_BROKER_URL"]
    backend = values["CELERY_RESULT_BACKEND"]
    broker = broker or optional_url("BROKER_URL", config.get("BROKER_URL"))  # Celery's old name
    if nested:
        broker = broker or optional_url("CELERY['broker_url']", nested.get("broker_url"))
        backend = backend or optional_url("CELERY['result_backend']", nested.get("result_backend"))
    return Settings(
        broker_url=broker,  # type: ignore[arg-type]
        result_backend=backend,  # type: ignore[arg-type]
        workers=values["CELERY_WORKERS"],  # type: ignore[arg-type]
        start_local_workers=values["CELERY_START_LOCAL_WORKERS"],  # type: ignore[arg-type]
        start_timeout=values["CELERY_START_TIMEOUT"],  # type: ignore[arg-type]
        log_level=values["CELERY_LOG_LEVEL"],  # type: ignore[arg-type]
        log_dir=values["CELERY_LOG_DIR"],  # type: ignore[arg-type]
        flower=values["CELERY_FLOWER"],  # type: ignore[arg-type]
        flower_port=values["CELERY_FLOWER_PORT"],  # type: ignore[arg-type]
        flower_address=values["CELERY_FLOWER_ADDRESS"],  # type: ignore[arg-type]
        scheduler=values["CELERY_SCHEDULER"],  # type: ignore[arg-type]
        sanitize_arguments=values["CELERY_SANITIZE_ARGUMENTS"],  # type: ignore[arg-type]
        always_eager=bool(eager),
        signing_keys=values["CELERY_SIGNING_KEY"],  # type: ignore[arg-type]
        signing_key_fallbacks=values["CELERY_SIGNING_KEY_FALLBACKS"],  # type: ignore[arg-type]
        embedded_broker=values["CELERY_EMBEDDED_BROKER"],  # type: ignore[arg-type]
        broker_timeout=values["CELERY_BROKER_TIMEOUT"],  # type: ignore[arg-type]
        max_message_size=int(values["CELERY_MAX_MESSAGE_SIZE"]),  # type: ignore[call-overload]
        pickle_by_value=values["CELERY_PICKLE_BY_VALUE"],  # type: ignore[arg-type]
        unsafe_allow_pickle=values["CELERY_UNSAFE_ALLOW_PICKLE"],  # type: ignore[arg-type]
        max_deliveries=values["CELERY_MAX_DELIVERIES"],  # type: ignore[arg-type]
        encrypt=values["CELERY_ENCRYPT"],  # type: ignore[arg-type]
        flower_basic_auth=values["CELERY_FLOWER_BASIC_AUTH"],  # type: ignore[arg-type]
        exit_wait=values["CELERY_EXIT_WAIT"],  # type: ignore[arg-type]
    )

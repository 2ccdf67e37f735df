"""The one table of flask-execute configuration keys, their defaults and validation,
and the translation of every other ``CELERY_*`` key into Celery's own settings.

``init_app`` calls :func:`load` exactly once per app. Errors are raised there, naming
the key, the accepted forms and the value found.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing as t
from collections.abc import Callable
from collections.abc import Mapping

from .errors import ConfigurationError

__all__ = ["KEYS", "WORKER_OPTIONS", "Key", "Settings", "celery_settings", "load", "worker_argv"]

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")
DEFAULT_BROKER_URL = "redis://localhost:6379"


def _fail(key: str, expected: str, value: object) -> t.NoReturn:
    raise ConfigurationError(f"{key!r} must be {expected}; got {value!r}.")


def _bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    _fail(key, "True or False", value)


def _positive_number(key: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"):
        return float(value)
    _fail(key, "a positive number of seconds", value)


def _positive_int(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    _fail(key, "a positive integer", value)


def _port(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    _fail(key, "a TCP port number (1-65535)", value)


def _optional_url(key: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, str):
        # an unset environment variable read with a default of '': Celery would quietly
        # use whatever answers on localhost
        _fail(key, "a URL such as 'redis://host:6379/0', or None (unset) for the default", value)
    _fail(key, "a URL string or None", value)


def _str(key: str, value: object) -> str:
    if isinstance(value, str) and value:
        return value
    _fail(key, "a non-empty string", value)


def _log_level(key: str, value: object) -> str:
    if isinstance(value, str) and value.upper() in _LOG_LEVELS:
        return value.upper()
    if isinstance(value, int) and not isinstance(value, bool):
        name = logging.getLevelName(value)
        if isinstance(name, str) and name in _LOG_LEVELS:
            return name
    _fail(key, "a log level name (" + ", ".join(_LOG_LEVELS[:-1]) + ")", value)


def _path(key: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    _fail(key, "a directory path or None", value)


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


# --- worker options ---------------------------------------------------------------
# Each option of a CELERY_WORKERS dict means exactly the `celery worker` flag of the
# same name; the table says how the value is rendered on the command line.
WORKER_OPTIONS: dict[str, str] = {
    "concurrency": "int",
    "loglevel": "level",
    "logfile": "str",
    "pidfile": "str",
    "queues": "list",
    "exclude_queues": "list",
    "pool": "str",
    "autoscale": "pair",
    "prefetch_multiplier": "int",
    "max_tasks_per_child": "int",
    "max_memory_per_child": "int",
    "time_limit": "number",
    "soft_time_limit": "number",
    "optimization": "str",
    "statedb": "str",
    "hostname": "str",
    "heartbeat_interval": "int",
    "task_events": "flag",
    "disable_prefetch": "flag",
    "include": "list",
    "without_gossip": "flag",
    "without_mingle": "flag",
    "without_heartbeat": "flag",
    "purge": "flag",
}


def _worker_option(worker: str, option: str, value: object) -> object:
    kind = WORKER_OPTIONS.get(option)
    key = f"CELERY_WORKERS[{worker!r}][{option!r}]"
    if kind is None:
        known = ", ".join(sorted(WORKER_OPTIONS))
        raise ConfigurationError(f"{key} is not a `celery worker` option. Known options: {known}.")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        _fail(key, "a positive integer", value)
    if kind == "number":
        return _positive_number(key, value)
    if kind == "level":
        return _log_level(key, value)
    if kind == "str":
        return _str(key, value)
    if kind == "flag":
        return _bool(key, value)
    if kind == "list":
        items = (
            [q.strip() for q in value.split(",") if q.strip()] if isinstance(value, str) else value
        )
        if (
            isinstance(items, (list, tuple))
            and items
            and all(isinstance(q, str) and q and "," not in q for q in items)
        ):
            return list(items)
        _fail(key, "a list of queue names (or a comma-separated string)", value)
    if kind == "pair":
        pair = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
        if (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(str(v).isdigit() for v in pair)
        ):
            return [int(pair[0]), int(pair[1])]
        _fail(key, "a (max, min) pair of integers", value)
    raise AssertionError(kind)  # pragma: no cover


def _workers(key: str, value: object) -> dict[str, dict[str, object]]:
    expected = "an int, a list of names or a dict of options"
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            _fail(key, expected + " (a count of 0 or more)", value)
        return {f"worker{i}": {} for i in range(1, value + 1)}
    if isinstance(value, (list, tuple)):
        if all(isinstance(n, str) and n and "@" not in n for n in value):
            if len(set(value)) != len(value):
                _fail(key, expected + " with unique names", value)
            return {name: {} for name in value}
        _fail(key, expected + " (names are strings without '@')", value)
    if isinstance(value, Mapping):
        workers: dict[str, dict[str, object]] = {}
        for name, options in value.items():
            if not isinstance(name, str) or not name or "@" in name:
                _fail(key, expected + " (names are strings without '@')", value)
            if options is None:
                options = {}
            if not isinstance(options, Mapping):
                _fail(f"{key}[{name!r}]", "a dict of `celery worker` options", options)
            workers[name] = {o: _worker_option(name, o, v) for o, v in options.items()}
        return workers
    _fail(key, expected, value)


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
        _optional_url,
        f"Broker URL. Unset: {DEFAULT_BROKER_URL}, or the embedded Redis in development",
    ),
    Key(
        "CELERY_RESULT_BACKEND",
        None,
        _optional_url,
        "Result backend URL. Unset: the broker URL when it is Redis",
    ),
    Key(
        "CELERY_WORKERS",
        1,
        _workers,
        "Local workers: a count, a list of names, or a dict of name -> worker options",
    ),
    Key(
        "CELERY_START_LOCAL_WORKERS",
        True,
        _bool,
        "Start the local workers (and beat, Flower) on the first submit",
    ),
    Key(
        "CELERY_START_TIMEOUT",
        10,
        _positive_number,
        "Seconds to wait for local services to answer before raising",
    ),
    Key("CELERY_LOG_LEVEL", "INFO", _log_level, "Log level of local services"),
    Key("CELERY_LOG_DIR", None, _path, "Directory of local services' logs (default: cwd)"),
    Key("CELERY_FLOWER", True, _bool, "Start Flower with the local workers when installed"),
    Key("CELERY_FLOWER_PORT", 5555, _port, "Port of the local Flower"),
    Key("CELERY_FLOWER_ADDRESS", "127.0.0.1", _str, "Address the local Flower binds to"),
    Key(
        "CELERY_FLOWER_BASIC_AUTH",
        None,
        _basic_auth,
        "Login of the local Flower: 'user:password' or a list (default: generated, logged)",
    ),
    Key(
        "CELERY_SCHEDULER", True, _bool, "Start beat with the local workers when a schedule exists"
    ),
    Key(
        "CELERY_SANITIZE_ARGUMENTS",
        True,
        _bool,
        "Resolve LocalProxy arguments and send Flask-SQLAlchemy models by primary key",
    ),
    Key("CELERY_ALWAYS_EAGER", False, _bool, "Run tasks inline in the caller (tests)"),
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
        _bool,
        "In development, start a private Redis when no broker is configured or reachable",
    ),
    Key(
        "CELERY_BROKER_TIMEOUT",
        3,
        _positive_number,
        "Seconds submit() may spend reaching the broker before BrokerUnavailable",
    ),
    Key(
        "CELERY_MAX_DELIVERIES",
        3,
        _positive_int,
        "At-least-once tasks: deliveries (worker deaths) before giving up with a failure",
    ),
    Key(
        "CELERY_PICKLE_BY_VALUE",
        True,
        _bool,
        "Send lambdas, closures and __main__ functions by value (cloudpickle)",
    ),
    Key(
        "CELERY_UNSAFE_ALLOW_PICKLE",
        False,
        _bool,
        "Let Celery's own serializers use pickle (UNSAFE: broker writers can run code)",
    ),
    Key(
        "CELERY_MAX_MESSAGE_SIZE",
        64 * 1024 * 1024,
        _positive_int,
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
_KEY_NAMES = frozenset(k.name for k in KEYS)


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
        _fail("CELERY", "a dict of Celery settings (lower-case names)", nested)
    eager = values["CELERY_ALWAYS_EAGER"]
    for alias in ("CELERY_TASK_ALWAYS_EAGER",):
        if alias in config:
            eager = _bool(alias, config[alias]) or eager
    if nested and "task_always_eager" in nested:
        eager = _bool("CELERY['task_always_eager']", nested["task_always_eager"]) or eager
    broker = values["CELERY_BROKER_URL"]
    backend = values["CELERY_RESULT_BACKEND"]
    broker = broker or _optional_url("BROKER_URL", config.get("BROKER_URL"))  # Celery's old name
    if nested:
        broker = broker or _optional_url("CELERY['broker_url']", nested.get("broker_url"))
        backend = backend or _optional_url("CELERY['result_backend']", nested.get("result_backend"))
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
    )


# --- CELERY_* -> Celery settings ----------------------------------------------------
# Celery serializes with JSON everywhere: calls and results travel as signed envelopes
# (strings) inside JSON messages, so nothing from the broker is unpickled by Celery.
_FORCED_JSON = {
    "task_serializer": "json",
    "result_serializer": "json",
    "event_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
}
_PICKLE_NAMES = ("pickle", "application/x-python-serialize", "yaml", "application/x-yaml")


def _celery_names() -> tuple[dict[str, str], frozenset[str]]:
    from celery.app.defaults import _TO_NEW_KEY
    from celery.app.defaults import DEFAULTS

    return dict(_TO_NEW_KEY), frozenset(DEFAULTS)


def celery_settings(config: Mapping[str, object]) -> dict[str, object]:
    """Translate Flask config into Celery settings (new lower-case names).

    Sources, later ones winning: the ``CELERY = {...}`` dict (Flask's own Celery
    recipe), then every ``CELERY_*`` / ``CELERYBEAT_*`` / ``BROKER_*`` key that is not a
    plugin key, by Celery's own old-name table or by stripping the ``CELERY_`` prefix.
    Serializers are forced to JSON.

    :raises ConfigurationError: the config asks Celery to accept pickle or YAML.
    """
    old_to_new, known = _celery_names()
    out: dict[str, object] = {}
    source: dict[str, str] = {}
    nested = config.get("CELERY")
    if isinstance(nested, Mapping):
        for name, value in nested.items():
            setting = old_to_new.get(name) or name
            out[setting] = value
            source[setting] = f"CELERY[{name!r}]"
    for key, value in config.items():
        if key in _KEY_NAMES or key == "CELERY" or not key.startswith(("CELERY", "BROKER_")):
            continue  # the app's own keys (S3_*, DATABASE_*, ...) are not Celery's
        if key in old_to_new:
            out[old_to_new[key]] = value
            source[old_to_new[key]] = key
        elif key.startswith("CELERY_") and key[7:].lower() in known:
            out[key[7:].lower()] = value
            source[key[7:].lower()] = key
    unsafe: list[str] = []
    for name in _FORCED_JSON:
        value = out.get(name)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        bad = [v for v in values if v in _PICKLE_NAMES]
        if bad and config.get("CELERY_UNSAFE_ALLOW_PICKLE") is True:
            unsafe.append(name)
        elif bad:
            raise ConfigurationError(
                f"{source.get(name, name)!r} (Celery setting {name!r}) asks for {bad[0]!r};"
                " flask-execute keeps Celery's"
                " serializers JSON-only so that nothing from the broker is unpickled before"
                f" its signature is checked. Remove the key (got {value!r})."
            )
    if unsafe:
        logging.getLogger("flask_execute.security").warning(
            "CELERY_UNSAFE_ALLOW_PICKLE is on: Celery will unpickle %s from the broker;"
            " anyone who can write to the broker can run code on the workers.",
            ", ".join(unsafe),
        )
    out.update({k: v for k, v in _FORCED_JSON.items() if k not in unsafe})
    out.pop("task_always_eager", None)  # eager mode is ours: CELERY_ALWAYS_EAGER
    return out


def worker_argv(name: str, options: Mapping[str, object], log_level: str) -> list[str]:
    """Render validated worker options as `celery worker` flags.

    ``{"concurrency": 10, "queues": ["a", "b"]}`` gives
    ``["-n", "foo@%h", "--concurrency=10", "--queues=a,b", "--loglevel=INFO"]``.
    """
    argv = ["-n", str(options.get("hostname") or f"{name}@%h")]
    options = dict(options)
    options.setdefault("loglevel", log_level)
    for option, value in options.items():
        if option == "hostname":
            continue
        kind = WORKER_OPTIONS[option]
        flag = "--" + option.replace("_", "-")
        if kind == "flag":
            if value:
                argv.append(flag)
        elif kind in ("list", "pair"):
            argv.append(f"{flag}={','.join(str(v) for v in value)}")  # type: ignore[attr-defined]
        elif kind == "number":
            number = float(value)  # type: ignore[arg-type]
            argv.append(f"{flag}={int(number) if number.is_integer() else number!r}")
        else:
            argv.append(f"{flag}={value}")
    return argv

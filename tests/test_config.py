"""``flask_execute.config``: the key table and its validators, ``CELERY_*`` keys as
Celery settings, and worker options rendered as ``celery worker`` flags (pure logic)."""

from __future__ import annotations

import logging
import math
import pathlib
import re
import subprocess
import sys
import typing as t

import pytest
from flask import Flask

from flask_execute import config
from flask_execute import ConfigurationError
from flask_execute import ExecuteError
from flask_execute.celery_conf import celery_settings
from flask_execute.config import KEYS
from flask_execute.config import load
from flask_execute.config import Settings
from flask_execute.worker_options import worker_argv
from flask_execute.worker_options import WORKER_OPTIONS

WORKERS_EXPECTED = "an int, a list of names or a dict of options"
KNOWN_OPTIONS = (
    "autoscale, concurrency, disable_prefetch, exclude_queues, heartbeat_interval, hostname,"
    " include, logfile, loglevel, max_memory_per_child, max_tasks_per_child, optimization,"
    " pidfile, pool, prefetch_multiplier, purge, queues, soft_time_limit, statedb,"
    " task_events, time_limit, without_gossip, without_heartbeat, without_mingle"
)
FORCED_JSON = {
    "task_serializer": "json",
    "result_serializer": "json",
    "event_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
}


def rejection(cfg: dict[str, object]) -> str:
    with pytest.raises(ConfigurationError) as excinfo:
        load(cfg)
    return str(excinfo.value)


def workers(value: object) -> dict[str, dict[str, object]]:
    return load({"CELERY_WORKERS": value}).workers


def worker_options(**options: object) -> dict[str, object]:
    return workers({"w": options})["w"]


# --- defaults -------------------------------------------------------------------------
def test_defaults() -> None:
    assert load({}) == Settings(
        broker_url=None,
        result_backend=None,
        workers={"worker1": {}},
        start_local_workers=True,
        start_timeout=10.0,
        log_level="INFO",
        log_dir=None,
        flower=True,
        flower_port=5555,
        flower_address="127.0.0.1",
        scheduler=True,
        sanitize_arguments=True,
        always_eager=False,
        signing_keys=[],
        signing_key_fallbacks=[],
        embedded_broker=True,
        broker_timeout=3.0,
        max_message_size=64 * 1024 * 1024,
        pickle_by_value=True,
        unsafe_allow_pickle=False,
        max_deliveries=3,
        encrypt=False,
        flower_basic_auth=[],
    )


def test_default_types() -> None:
    settings = load({})
    assert type(settings.start_timeout) is float
    assert type(settings.broker_timeout) is float
    assert type(settings.flower_port) is int
    assert type(settings.max_message_size) is int


def test_flask_default_config_gives_the_defaults() -> None:
    assert load(Flask(__name__).config) == load({})


def test_key_table_covers_the_documented_keys() -> None:
    # SPEC section 9, plus the signing, broker and message-size keys of section 10.
    defaults = {key.name: key.default for key in KEYS}
    assert defaults == {
        "CELERY_BROKER_URL": None,
        "CELERY_RESULT_BACKEND": None,
        "CELERY_WORKERS": 1,
        "CELERY_START_LOCAL_WORKERS": True,
        "CELERY_START_TIMEOUT": 10,
        "CELERY_LOG_LEVEL": "INFO",
        "CELERY_LOG_DIR": None,
        "CELERY_FLOWER": True,
        "CELERY_FLOWER_PORT": 5555,
        "CELERY_FLOWER_ADDRESS": "127.0.0.1",
        "CELERY_FLOWER_BASIC_AUTH": None,
        "CELERY_SCHEDULER": True,
        "CELERY_SANITIZE_ARGUMENTS": True,
        "CELERY_ALWAYS_EAGER": False,
        "CELERY_SIGNING_KEY": None,
        "CELERY_SIGNING_KEY_FALLBACKS": None,
        "CELERY_EMBEDDED_BROKER": True,
        "CELERY_BROKER_TIMEOUT": 3,
        "CELERY_MAX_DELIVERIES": 3,
        "CELERY_EXIT_WAIT": 60,
        "CELERY_PICKLE_BY_VALUE": True,
        "CELERY_UNSAFE_ALLOW_PICKLE": False,
        "CELERY_MAX_MESSAGE_SIZE": 64 * 1024 * 1024,
        "CELERY_ENCRYPT": False,
    }
    assert all(key.doc for key in KEYS)


@pytest.mark.parametrize("key", KEYS, ids=lambda key: key.name)
def test_every_default_is_valid(key: config.Key) -> None:
    key.validate(key.name, key.default)


# --- accepted values ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, {}),
        (1, {"worker1": {}}),
        (2, {"worker1": {}, "worker2": {}}),
        ([], {}),
        (["web", "mail"], {"web": {}, "mail": {}}),
        (("web",), {"web": {}}),
        ({"web": None, "mail": {}}, {"web": {}, "mail": {}}),
        ({"web": {"concurrency": 2}}, {"web": {"concurrency": 2}}),
    ],
)
def test_workers_forms(value: object, expected: dict[str, dict[str, object]]) -> None:
    assert workers(value) == expected


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"concurrency": 10}, {"concurrency": 10}),
        ({"loglevel": "error"}, {"loglevel": "ERROR"}),
        ({"loglevel": "Warning"}, {"loglevel": "WARNING"}),
        ({"loglevel": logging.DEBUG}, {"loglevel": "DEBUG"}),
        (
            {"queues": ["low-priority", "high-priority"]},
            {"queues": ["low-priority", "high-priority"]},
        ),
        ({"queues": ("a", "b")}, {"queues": ["a", "b"]}),
        ({"queues": "a, b,,c "}, {"queues": ["a", "b", "c"]}),
        ({"exclude_queues": "slow"}, {"exclude_queues": ["slow"]}),
        ({"include": ["app.tasks"]}, {"include": ["app.tasks"]}),
        ({"autoscale": (10, 3)}, {"autoscale": [10, 3]}),
        ({"autoscale": "10, 3"}, {"autoscale": [10, 3]}),
        ({"autoscale": ["10", "3"]}, {"autoscale": [10, 3]}),
        ({"time_limit": 30}, {"time_limit": 30.0}),
        ({"soft_time_limit": 2.5}, {"soft_time_limit": 2.5}),
        ({"task_events": True, "purge": False}, {"task_events": True, "purge": False}),
        ({"pool": "solo", "hostname": "w@example"}, {"pool": "solo", "hostname": "w@example"}),
    ],
)
def test_worker_options_are_normalized(
    options: dict[str, object], expected: dict[str, object]
) -> None:
    assert worker_options(**options) == expected


@pytest.mark.parametrize(
    ("key", "value", "field", "expected"),
    [
        ("CELERY_BROKER_URL", "redis://broker:6379/2", "broker_url", "redis://broker:6379/2"),
        ("CELERY_RESULT_BACKEND", "rpc://", "result_backend", "rpc://"),
        ("CELERY_START_LOCAL_WORKERS", False, "start_local_workers", False),
        ("CELERY_START_TIMEOUT", 0.5, "start_timeout", 0.5),
        ("CELERY_START_TIMEOUT", 30, "start_timeout", 30.0),
        ("CELERY_LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("CELERY_LOG_LEVEL", "fatal", "log_level", "FATAL"),
        ("CELERY_LOG_LEVEL", logging.WARNING, "log_level", "WARNING"),
        ("CELERY_LOG_LEVEL", logging.CRITICAL, "log_level", "CRITICAL"),
        ("CELERY_LOG_DIR", "/var/log/app", "log_dir", "/var/log/app"),
        ("CELERY_LOG_DIR", pathlib.Path("/var/log/app"), "log_dir", "/var/log/app"),
        ("CELERY_FLOWER", False, "flower", False),
        ("CELERY_FLOWER_PORT", 1, "flower_port", 1),
        ("CELERY_FLOWER_PORT", 65535, "flower_port", 65535),
        ("CELERY_FLOWER_ADDRESS", "0.0.0.0", "flower_address", "0.0.0.0"),
        ("CELERY_FLOWER_BASIC_AUTH", "ops:s3cret", "flower_basic_auth", ["ops:s3cret"]),
        ("CELERY_FLOWER_BASIC_AUTH", ("a:b", "c:d:e"), "flower_basic_auth", ["a:b", "c:d:e"]),
        ("CELERY_SCHEDULER", False, "scheduler", False),
        ("CELERY_SANITIZE_ARGUMENTS", False, "sanitize_arguments", False),
        ("CELERY_ALWAYS_EAGER", True, "always_eager", True),
        ("CELERY_SIGNING_KEY", "s3cret", "signing_keys", [b"s3cret"]),
        ("CELERY_SIGNING_KEY", b"\x00raw", "signing_keys", [b"\x00raw"]),
        ("CELERY_SIGNING_KEY", ["new", b"old"], "signing_keys", [b"new", b"old"]),
        ("CELERY_SIGNING_KEY_FALLBACKS", ("a", "b"), "signing_key_fallbacks", [b"a", b"b"]),
        ("CELERY_EMBEDDED_BROKER", False, "embedded_broker", False),
        ("CELERY_BROKER_TIMEOUT", 0.25, "broker_timeout", 0.25),
        ("CELERY_MAX_MESSAGE_SIZE", 1024, "max_message_size", 1024),
    ],
)
def test_accepted_values(key: str, value: object, field: str, expected: object) -> None:
    result = getattr(load({key: value}), field)
    assert result == expected
    assert type(result) is type(expected)


def test_eager_from_new_style_names() -> None:
    assert load({"CELERY_TASK_ALWAYS_EAGER": True}).always_eager is True
    assert load({"CELERY": {"task_always_eager": True}}).always_eager is True
    # any of the spellings turns eager mode on
    assert load({"CELERY_ALWAYS_EAGER": True, "CELERY_TASK_ALWAYS_EAGER": False}).always_eager
    assert load({"CELERY_TASK_ALWAYS_EAGER": False}).always_eager is False


def test_urls_from_the_celery_dict() -> None:
    nested = {"broker_url": "redis://a/1", "result_backend": "redis://a/2"}
    settings = load({"CELERY": nested})
    assert (settings.broker_url, settings.result_backend) == ("redis://a/1", "redis://a/2")
    # the plugin key wins over the dict
    settings = load({"CELERY": nested, "CELERY_BROKER_URL": "redis://b/1"})
    assert (settings.broker_url, settings.result_backend) == ("redis://b/1", "redis://a/2")


# --- rejected values ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"CELERY_WORKERS": "two"},
            "'CELERY_WORKERS' must be an int, a list of names or a dict of options; got 'two'.",
        ),
        ({"CELERY_WORKERS": True}, f"'CELERY_WORKERS' must be {WORKERS_EXPECTED}; got True."),
        ({"CELERY_WORKERS": 2.0}, f"'CELERY_WORKERS' must be {WORKERS_EXPECTED}; got 2.0."),
        (
            {"CELERY_WORKERS": -1},
            f"'CELERY_WORKERS' must be {WORKERS_EXPECTED} (a count of 0 or more); got -1.",
        ),
        (
            {"CELERY_WORKERS": ["web@host"]},
            f"'CELERY_WORKERS' must be {WORKERS_EXPECTED} (names are strings without '@');"
            " got ['web@host'].",
        ),
        (
            {"CELERY_WORKERS": ["web", ""]},
            f"'CELERY_WORKERS' must be {WORKERS_EXPECTED} (names are strings without '@');"
            " got ['web', ''].",
        ),
        (
            {"CELERY_WORKERS": ["web", 2]},
            f"'CELERY_WORKERS' must be {WORKERS_EXPECTED} (names are strings without '@');"
            " got ['web', 2].",
        ),
        (
            {"CELERY_WORKERS": ["web", "mail", "web"]},
            f"'CELERY_WORKERS' must be {WORKERS_EXPECTED} with unique names;"
            " got ['web', 'mail', 'web'].",
        ),
        (
            {"CELERY_WORKERS": {"web@host": {}}},
            f"'CELERY_WORKERS' must be {WORKERS_EXPECTED} (names are strings without '@');"
            " got {'web@host': {}}.",
        ),
        (
            {"CELERY_WORKERS": {"web": 3}},
            "\"CELERY_WORKERS['web']\" must be a dict of `celery worker` options; got 3.",
        ),
        (
            {"CELERY_WORKERS": {"web": {"colour": "red"}}},
            "CELERY_WORKERS['web']['colour'] is not a `celery worker` option."
            f" Known options: {KNOWN_OPTIONS}.",
        ),
        (
            {"CELERY_WORKERS": {"web": {"concurrency": 0}}},
            "\"CELERY_WORKERS['web']['concurrency']\" must be a positive integer; got 0.",
        ),
        (
            {"CELERY_WORKERS": {"web": {"concurrency": "4"}}},
            "\"CELERY_WORKERS['web']['concurrency']\" must be a positive integer; got '4'.",
        ),
        (
            {"CELERY_WORKERS": {"web": {"prefetch_multiplier": True}}},
            "\"CELERY_WORKERS['web']['prefetch_multiplier']\" must be a positive integer;"
            " got True.",
        ),
        (
            {"CELERY_WORKERS": {"web": {"loglevel": "verbose"}}},
            "\"CELERY_WORKERS['web']['loglevel']\" must be a log level name"
            " (DEBUG, INFO, WARNING, ERROR, CRITICAL); got 'verbose'.",
        ),
        (
            {"CELERY_WORKERS": {"web": {"queues": []}}},
            "\"CELERY_WORKERS['web']['queues']\" must be a list of queue names"
            " (or a comma-separated string); got [].",
        ),
        (
            {"CELERY_WORKERS": {"web": {"queues": ["a,b"]}}},
            "\"CELERY_WORKERS['web']['queues']\" must be a list of queue names"
            " (or a comma-separated string); got ['a,b'].",
        ),
        (
            {"CELERY_WORKERS": {"web": {"autoscale": (10,)}}},
            "\"CELERY_WORKERS['web']['autoscale']\" must be a (max, min) pair of integers;"
            " got (10,).",
        ),
        (
            {"CELERY_WORKERS": {"web": {"autoscale": (10, -1)}}},
            "\"CELERY_WORKERS['web']['autoscale']\" must be a (max, min) pair of integers;"
            " got (10, -1).",
        ),
        (
            {"CELERY_WORKERS": {"web": {"time_limit": 0}}},
            "\"CELERY_WORKERS['web']['time_limit']\" must be a positive number of seconds; got 0.",
        ),
        (
            {"CELERY_WORKERS": {"web": {"task_events": "yes"}}},
            "\"CELERY_WORKERS['web']['task_events']\" must be True or False; got 'yes'.",
        ),
        (
            {"CELERY_WORKERS": {"web": {"pool": ""}}},
            "\"CELERY_WORKERS['web']['pool']\" must be a non-empty string; got ''.",
        ),
        (
            {"CELERY_START_LOCAL_WORKERS": "yes"},
            "'CELERY_START_LOCAL_WORKERS' must be True or False; got 'yes'.",
        ),
        ({"CELERY_FLOWER": 1}, "'CELERY_FLOWER' must be True or False; got 1."),
        ({"CELERY_SCHEDULER": "no"}, "'CELERY_SCHEDULER' must be True or False; got 'no'."),
        (
            {"CELERY_SANITIZE_ARGUMENTS": None},
            "'CELERY_SANITIZE_ARGUMENTS' must be True or False; got None.",
        ),
        ({"CELERY_ALWAYS_EAGER": "yes"}, "'CELERY_ALWAYS_EAGER' must be True or False; got 'yes'."),
        ({"CELERY_EMBEDDED_BROKER": 0}, "'CELERY_EMBEDDED_BROKER' must be True or False; got 0."),
        (
            {"CELERY_FLOWER_PORT": 70000},
            "'CELERY_FLOWER_PORT' must be a TCP port number (1-65535); got 70000.",
        ),
        (
            {"CELERY_FLOWER_PORT": 0},
            "'CELERY_FLOWER_PORT' must be a TCP port number (1-65535); got 0.",
        ),
        (
            {"CELERY_FLOWER_PORT": "5555"},
            "'CELERY_FLOWER_PORT' must be a TCP port number (1-65535); got '5555'.",
        ),
        (
            {"CELERY_FLOWER_PORT": True},
            "'CELERY_FLOWER_PORT' must be a TCP port number (1-65535); got True.",
        ),
        (
            {"CELERY_START_TIMEOUT": -1},
            "'CELERY_START_TIMEOUT' must be a positive number of seconds; got -1.",
        ),
        (
            {"CELERY_START_TIMEOUT": 0},
            "'CELERY_START_TIMEOUT' must be a positive number of seconds; got 0.",
        ),
        (
            {"CELERY_START_TIMEOUT": "10"},
            "'CELERY_START_TIMEOUT' must be a positive number of seconds; got '10'.",
        ),
        (
            {"CELERY_START_TIMEOUT": math.nan},
            "'CELERY_START_TIMEOUT' must be a positive number of seconds; got nan.",
        ),
        (
            {"CELERY_BROKER_TIMEOUT": False},
            "'CELERY_BROKER_TIMEOUT' must be a positive number of seconds; got False.",
        ),
        (
            {"CELERY_MAX_MESSAGE_SIZE": -5},
            "'CELERY_MAX_MESSAGE_SIZE' must be a positive integer; got -5.",
        ),
        (
            {"CELERY_LOG_LEVEL": "loud"},
            "'CELERY_LOG_LEVEL' must be a log level name (DEBUG, INFO, WARNING, ERROR, CRITICAL);"
            " got 'loud'.",
        ),
        (
            {"CELERY_LOG_LEVEL": 5},
            "'CELERY_LOG_LEVEL' must be a log level name (DEBUG, INFO, WARNING, ERROR, CRITICAL);"
            " got 5.",
        ),
        ({"CELERY_LOG_DIR": 3}, "'CELERY_LOG_DIR' must be a directory path or None; got 3."),
        (
            {"CELERY_BROKER_URL": 6379},
            "'CELERY_BROKER_URL' must be a URL string or None; got 6379.",
        ),
        (
            {"CELERY_RESULT_BACKEND": b"rpc://"},
            "'CELERY_RESULT_BACKEND' must be a URL string or None; got b'rpc://'.",
        ),
        (
            {"CELERY_FLOWER_ADDRESS": ""},
            "'CELERY_FLOWER_ADDRESS' must be a non-empty string; got ''.",
        ),
        (
            {"CELERY_SIGNING_KEY": 123},
            "'CELERY_SIGNING_KEY' must be a key (str or bytes) or a list of keys; got int.",
        ),
        (
            {"CELERY_SIGNING_KEY_FALLBACKS": ["old", 1]},
            "'CELERY_SIGNING_KEY_FALLBACKS' must be a key (str or bytes) or a list of keys;"
            " got a list holding int, str.",
        ),
        (
            {"CELERY": "broker_url=redis://"},
            "'CELERY' must be a dict of Celery settings (lower-case names);"
            " got 'broker_url=redis://'.",
        ),
        (
            {"CELERY_TASK_ALWAYS_EAGER": "yes"},
            "'CELERY_TASK_ALWAYS_EAGER' must be True or False; got 'yes'.",
        ),
        (
            {"CELERY": {"task_always_eager": "yes"}},
            "\"CELERY['task_always_eager']\" must be True or False; got 'yes'.",
        ),
        (
            {"CELERY": {"broker_url": 1}},
            "\"CELERY['broker_url']\" must be a URL string or None; got 1.",
        ),
    ],
    ids=lambda v: repr(v)[:60] if isinstance(v, dict) else "",
)
def test_rejected_values(cfg: dict[str, object], message: str) -> None:
    assert rejection(cfg) == message


_LOGIN = (
    "'CELERY_FLOWER_BASIC_AUTH' must be 'user:password' or a list of them, or None to"
    " generate a password at each start; got {} (the value is not shown: it holds a"
    " password)."
)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("s3cret", "an entry without a user, a ':' or a password"),
        ("ops:", "an entry without a user, a ':' or a password"),
        (":s3cret", "an entry without a user, a ':' or a password"),
        (["ops:s3cret", "s3cret2"], "an entry without a user, a ':' or a password"),
        ("ops:s3c,ret", "a comma in the entry of user 'ops'"),
        (["ops:s3cret", 7], "an entry of type int"),
        ([], "an empty list"),
        ({"ops": "s3cret"}, "a value of type dict"),
        (12345, "a value of type int"),
    ],
)
def test_flower_login_errors_never_quote_the_password(value: object, problem: str) -> None:
    message = rejection({"CELERY_FLOWER_BASIC_AUTH": value})
    assert message == _LOGIN.format(problem)
    assert "s3c" not in message and "12345" not in message


def test_flower_login_is_not_in_the_settings_repr() -> None:
    assert "s3cret" not in repr(load({"CELERY_FLOWER_BASIC_AUTH": "ops:s3cret"}))


def test_pytest_raises_match_form() -> None:
    with pytest.raises(
        ConfigurationError,
        match=re.escape(
            "'CELERY_WORKERS' must be an int, a list of names or a dict of options; got 'two'."
        ),
    ):
        load({"CELERY_WORKERS": "two"})


def test_configuration_error_hierarchy() -> None:
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(ConfigurationError, ExecuteError)
    with pytest.raises(ValueError):
        load({"CELERY_FLOWER_PORT": 70000})
    with pytest.raises(ExecuteError):
        load({"CELERY_FLOWER_PORT": 70000})


def test_infinite_message_size_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="CELERY_MAX_MESSAGE_SIZE"):
        load({"CELERY_MAX_MESSAGE_SIZE": math.inf})


@pytest.mark.parametrize("key", ["CELERY_SIGNING_KEY", "CELERY_SIGNING_KEY_FALLBACKS"])
def test_empty_signing_key_is_not_a_key(key: str) -> None:
    try:
        settings = load({key: ""})
    except ConfigurationError:
        return
    assert settings.signing_keys == [] and settings.signing_key_fallbacks == []


@pytest.mark.parametrize(
    ("option", "value"), [("queues", ""), ("queues", " , "), ("autoscale", "10")]
)
def test_worker_option_errors_quote_the_value_found(option: str, value: str) -> None:
    message = rejection({"CELERY_WORKERS": {"web": {option: value}}})
    assert message.endswith(f"; got {value!r}.")


# --- CELERY_* -> Celery settings ------------------------------------------------------
def test_only_forced_json_by_default() -> None:
    assert celery_settings({}) == FORCED_JSON


def test_non_celery_flask_keys_are_not_passed() -> None:
    cfg = dict(Flask(__name__).config)
    cfg.update(
        SECRET_KEY="s3cret",
        DEBUG=True,
        SQLALCHEMY_DATABASE_URI="sqlite://",
        MAIL_SERVER="smtp.example.com",
        CELERY_NOT_A_SETTING=1,
    )
    assert celery_settings(cfg) == FORCED_JSON


def test_plugin_keys_are_not_passed() -> None:
    cfg: dict[str, object] = {key.name: key.default for key in KEYS}
    cfg.update(
        CELERY_BROKER_URL="redis://h/1",
        CELERY_RESULT_BACKEND="redis://h/2",
        CELERY_WORKERS=["web"],
        CELERY_ALWAYS_EAGER=True,
        CELERY_SIGNING_KEY="k",
        CELERY_LOG_LEVEL="DEBUG",
    )
    assert celery_settings(cfg) == FORCED_JSON


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("CELERY_TIMEZONE", "timezone"),
        ("CELERYBEAT_SCHEDULE", "beat_schedule"),
        ("CELERY_ACKS_LATE", "task_acks_late"),
        ("CELERY_DEFAULT_QUEUE", "task_default_queue"),
        ("CELERY_ROUTES", "task_routes"),
        ("CELERY_TASK_RESULT_EXPIRES", "result_expires"),
        ("CELERYD_CONCURRENCY", "worker_concurrency"),
        ("CELERYD_PREFETCH_MULTIPLIER", "worker_prefetch_multiplier"),
        ("BROKER_TRANSPORT_OPTIONS", "broker_transport_options"),
        ("BROKER_POOL_LIMIT", "broker_pool_limit"),
    ],
)
def test_old_names_map_to_new_names(key: str, name: str) -> None:
    out = celery_settings({key: "value"})
    assert out == {**FORCED_JSON, name: "value"}


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("CELERY_TASK_ACKS_LATE", "task_acks_late"),
        ("CELERY_TASK_DEFAULT_QUEUE", "task_default_queue"),
        ("CELERY_BEAT_SCHEDULE", "beat_schedule"),
        ("CELERY_WORKER_PREFETCH_MULTIPLIER", "worker_prefetch_multiplier"),
        ("CELERY_RESULT_EXPIRES", "result_expires"),
        ("CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP", "broker_connection_retry_on_startup"),
    ],
)
def test_prefixed_new_names_map_to_lower_case(key: str, name: str) -> None:
    assert celery_settings({key: 7}) == {**FORCED_JSON, name: 7}


def test_celery_dict_is_honoured() -> None:
    cfg = {
        "CELERY": {
            "task_default_queue": "hipri",
            "task_ignore_result": True,
            "CELERY_TIMEZONE": "Europe/Paris",  # old names inside the dict too
            "CELERYBEAT_SCHEDULE": {"every": "minute"},
        }
    }
    assert celery_settings(cfg) == {
        **FORCED_JSON,
        "task_default_queue": "hipri",
        "task_ignore_result": True,
        "timezone": "Europe/Paris",
        "beat_schedule": {"every": "minute"},
    }


def test_top_level_keys_win_over_the_celery_dict() -> None:
    cfg = {"CELERY": {"timezone": "UTC"}, "CELERY_TIMEZONE": "Asia/Tokyo"}
    assert celery_settings(cfg)["timezone"] == "Asia/Tokyo"


def test_eager_is_not_passed_to_celery() -> None:
    assert "task_always_eager" not in celery_settings({"CELERY_TASK_ALWAYS_EAGER": True})
    assert "task_always_eager" not in celery_settings({"CELERY": {"task_always_eager": True}})


@pytest.mark.parametrize(
    "cfg",
    [
        {"CELERY_TASK_SERIALIZER": "json"},
        {"CELERY_TASK_SERIALIZER": "msgpack"},
        {"CELERY_ACCEPT_CONTENT": ["json", "msgpack"]},
        {"CELERY": {"result_serializer": "json", "accept_content": ["application/json"]}},
    ],
)
def test_serializers_are_forced_to_json(cfg: dict[str, object]) -> None:
    out = celery_settings(cfg)
    assert {name: out[name] for name in FORCED_JSON} == FORCED_JSON


@pytest.mark.parametrize(
    ("cfg", "name", "bad", "got"),
    [
        (
            {"CELERY_ACCEPT_CONTENT": ["json", "pickle"]},
            "accept_content",
            "pickle",
            ["json", "pickle"],
        ),
        ({"CELERY_TASK_SERIALIZER": "pickle"}, "task_serializer", "pickle", "pickle"),
        ({"CELERY": {"result_serializer": "pickle"}}, "result_serializer", "pickle", "pickle"),
        ({"CELERY_EVENT_SERIALIZER": "yaml"}, "event_serializer", "yaml", "yaml"),
        (
            {"CELERY_RESULT_ACCEPT_CONTENT": ["application/x-python-serialize"]},
            "result_accept_content",
            "application/x-python-serialize",
            ["application/x-python-serialize"],
        ),
        (
            {"CELERY": {"CELERY_ACCEPT_CONTENT": ("json", "application/x-yaml")}},
            "accept_content",
            "application/x-yaml",
            ("json", "application/x-yaml"),
        ),
    ],
)
def test_pickle_and_yaml_are_refused(
    cfg: dict[str, object], name: str, bad: str, got: object
) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        celery_settings(cfg)
    key = next(iter(cfg))
    source = f"CELERY[{next(iter(cfg['CELERY']))!r}]" if key == "CELERY" else key
    assert str(excinfo.value) == (
        f"{source} = {got!r}: no longer needed, delete it. flask-execute pickles calls and"
        " results itself and signs them before they travel, and keeps Celery's own"
        " serializers JSON-only, so that nothing from the broker is unpickled before its"
        " signature is checked (Flask-Execute 0.1.6 needed Celery to pickle; see"
        " docs/migrating.md)."
    )


def test_app_keys_that_look_like_old_celery_names_are_not_passed() -> None:
    cfg = {"S3_BUCKET": "user-uploads", "S3_SECRET_ACCESS_KEY": "x", "GCS_PROJECT": "p"}
    assert celery_settings(cfg) == FORCED_JSON


# --- worker argv ----------------------------------------------------------------------
def test_worker_argv_renders_options_in_order() -> None:
    options = workers(
        {
            "foo": {
                "concurrency": 10,
                "loglevel": "error",
                "queues": ["low-priority", "high-priority"],
            }
        }
    )["foo"]
    assert worker_argv("foo", options, "INFO") == [
        "-n",
        "foo@%h",
        "--concurrency=10",
        "--loglevel=ERROR",
        "--queues=low-priority,high-priority",
    ]


def test_worker_argv_defaults_the_log_level() -> None:
    options = worker_options(concurrency=2, queues="a,b")
    assert worker_argv("w", options, "WARNING") == [
        "-n",
        "w@%h",
        "--concurrency=2",
        "--queues=a,b",
        "--loglevel=WARNING",
    ]
    assert worker_argv("worker1", {}, "INFO") == ["-n", "worker1@%h", "--loglevel=INFO"]


def test_worker_argv_flags_only_when_true() -> None:
    options = worker_options(
        task_events=True, purge=False, without_gossip=True, without_mingle=False
    )
    assert worker_argv("w", options, "INFO") == [
        "-n",
        "w@%h",
        "--task-events",
        "--without-gossip",
        "--loglevel=INFO",
    ]


def test_worker_argv_hostname_override() -> None:
    options = worker_options(hostname="mail@example.com", concurrency=1)
    assert worker_argv("w", options, "INFO") == [
        "-n",
        "mail@example.com",
        "--concurrency=1",
        "--loglevel=INFO",
    ]


def test_worker_argv_values() -> None:
    options = worker_options(
        autoscale="10,3",
        time_limit=30,
        soft_time_limit=2.5,
        exclude_queues=["slow"],
        max_memory_per_child=100_000,
    )
    assert worker_argv("w", options, "INFO") == [
        "-n",
        "w@%h",
        "--autoscale=10,3",
        "--time-limit=30",
        "--soft-time-limit=2.5",
        "--exclude-queues=slow",
        "--max-memory-per-child=100000",
        "--loglevel=INFO",
    ]


def test_worker_flags_exist_in_celery_worker_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    missing = [
        option
        for option in WORKER_OPTIONS
        if not re.search(rf"(?<![\w-])--{option.replace('_', '-')}(?![\w-])", proc.stdout)
    ]
    assert not missing, proc.stdout


def _parse_worker_argv(argv: list[str]) -> dict[str, t.Any]:
    """Parse ``argv`` with the real ``celery worker`` command (no worker is started)."""
    from celery import Celery as CeleryApp
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker

    obj = CLIContext(app=CeleryApp(set_as_current=False), no_color=True, workdir=None)
    ctx = worker.make_context("worker", list(argv), obj=obj)
    return dict(ctx.params)


@pytest.mark.parametrize(
    ("option", "value", "parsed"),
    [
        ("concurrency", 3, 3),
        ("loglevel", "error", logging.ERROR),
        ("logfile", "/tmp/w.log", "/tmp/w.log"),
        ("pidfile", "/tmp/w.pid", "/tmp/w.pid"),
        ("queues", "a,b", ["a", "b"]),
        ("exclude_queues", ["c"], ["c"]),
        ("include", ["app.tasks", "app.more"], ["app.tasks", "app.more"]),
        ("autoscale", (10, 3), (10, 3)),
        ("prefetch_multiplier", 8, 8),
        ("max_tasks_per_child", 100, 100),
        ("max_memory_per_child", 12000, 12000),
        ("time_limit", 30, 30.0),
        ("soft_time_limit", 2.5, 2.5),
        ("optimization", "fair", "fair"),
        ("statedb", "/tmp/w.db", "/tmp/w.db"),
        ("heartbeat_interval", 2, 2),
        ("task_events", True, True),
        ("disable_prefetch", True, True),
        ("without_gossip", True, True),
        ("without_mingle", True, True),
        ("without_heartbeat", True, True),
        ("purge", True, True),
        pytest.param(
            "time_limit",
            1234567,
            1234567.0,
            id="time_limit-precision",
        ),
    ],
)
def test_rendered_flags_mean_the_same_to_celery(option: str, value: object, parsed: object) -> None:
    argv = worker_argv("w", worker_options(**{option: value}), "INFO")
    params = _parse_worker_argv(argv)
    assert params[option] == parsed
    assert params["hostname"].startswith("w@")


def test_rendered_pool_and_hostname_mean_the_same_to_celery() -> None:
    argv = worker_argv("w", worker_options(pool="solo", hostname="mail@example.com"), "DEBUG")
    params = _parse_worker_argv(argv)
    assert params["pool"].__module__ == "celery.concurrency.solo"
    assert params["hostname"] == "mail@example.com"
    assert params["loglevel"] == logging.DEBUG


def test_worker_heartbeat_interval_must_be_an_integer() -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        load({"CELERY_WORKERS": {"w": {"heartbeat_interval": 2.5}}})
    assert str(excinfo.value) == (
        "\"CELERY_WORKERS['w']['heartbeat_interval']\" must be a positive integer; got 2.5."
    )

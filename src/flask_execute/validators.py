"""Validators of configuration values: each takes the key's name and the value found,
and returns the value in its normal form or raises :class:`ConfigurationError` naming
the key, the accepted forms and the value."""

from __future__ import annotations

import logging
import os
import typing as t

from .errors import ConfigurationError

__all__ = [
    "LOG_LEVELS",
    "boolean",
    "fail",
    "log_level",
    "non_empty_str",
    "optional_url",
    "path",
    "port",
    "positive_int",
    "positive_number",
    "seconds_or_zero",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")


def fail(key: str, expected: str, value: object) -> t.NoReturn:
    raise ConfigurationError(f"{key!r} must be {expected}; got {value!r}.")


def boolean(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    fail(key, "True or False", value)


def positive_number(key: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"):
        return float(value)
    fail(key, "a positive number of seconds", value)


def positive_int(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    fail(key, "a positive integer", value)


def port(key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    fail(key, "a TCP port number (1-65535)", value)


def optional_url(key: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, str):
        # an unset environment variable read with a default of '': Celery would quietly
        # use whatever answers on localhost
        fail(key, "a URL such as 'redis://host:6379/0', or None (unset) for the default", value)
    fail(key, "a URL string or None", value)


def non_empty_str(key: str, value: object) -> str:
    if isinstance(value, str) and value:
        return value
    fail(key, "a non-empty string", value)


def log_level(key: str, value: object) -> str:
    if isinstance(value, str) and value.upper() in LOG_LEVELS:
        return value.upper()
    if isinstance(value, int) and not isinstance(value, bool):
        name = logging.getLevelName(value)
        if isinstance(name, str) and name in LOG_LEVELS:
            return name
    fail(key, "a log level name (" + ", ".join(LOG_LEVELS[:-1]) + ")", value)


def path(key: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    fail(key, "a directory path or None", value)


def seconds_or_zero(key: str, value: object) -> float:
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and 0 <= value < float("inf")
    ):
        return float(value)
    fail(key, "a number of seconds (0 or more)", value)

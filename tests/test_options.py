"""Celery options of submit/map/apply are checked in the caller, naming the option
(issue 10.11), and the extension's state never shows the broker password."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
from flask import Flask

from flask_execute import Celery
from flask_execute import ConfigurationError
from flask_execute.options import REFUSED_OPTIONS
from tests.apps import tasks


@pytest.fixture
def celery(broker_url: str) -> Iterator[Celery]:
    app = Flask("options_app")
    app.config.update(
        SECRET_KEY="options-secret-for-tests",
        CELERY_BROKER_URL=broker_url,
        CELERY_START_LOCAL_WORKERS=False,
    )
    with app.app_context():  # the extension holds its apps weakly: keep this one
        yield Celery(app)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("countdown", "soon", "a number of seconds"),
        ("countdown", float("nan"), "a number of seconds"),
        ("queue", 123, "a queue name (a non-empty string) or a kombu.Queue"),
        ("queue", "", "a queue name (a non-empty string) or a kombu.Queue"),
        ("eta", "tomorrow", "a datetime.datetime"),
        ("expires", "later", "a number of seconds, a datetime.datetime or an ISO 8601 string"),
        ("priority", 300, "an integer from 0 to 255"),
        ("priority", True, "an integer from 0 to 255"),
        ("retry", "yes", "True or False"),
        ("retry_policy", 3, "a dict (max_retries, interval_start, ...)"),
        ("time_limit", 0, "a positive number of seconds"),
        ("soft_time_limit", -1, "a positive number of seconds"),
        ("acks_late", "yes", "True, False or None"),
    ],
)
@pytest.mark.parametrize("verb", ["submit", "map"])
def test_a_wrong_option_value_names_the_option(
    celery: Celery, verb: str, option: str, value: object, expected: str
) -> None:
    with pytest.raises(ValueError) as info:
        if verb == "submit":
            celery.submit(tasks.add, 1, 2, **{option: value})
        else:
            celery.map(tasks.add, (1, 2), **{option: value})
    assert str(info.value) == f"Option {option!r} must be {expected}; got {value!r}."


# ("args" and "kwargs" are apply()'s own parameters)
@pytest.mark.parametrize("option", sorted(set(REFUSED_OPTIONS) - {"args", "kwargs"}))
def test_options_workers_would_refuse_are_refused_at_submit(celery: Celery, option: str) -> None:
    with pytest.raises(TypeError) as info:
        celery.apply(tasks.add, (1, 2), **{option: None})
    assert str(info.value).startswith(f"Option {option!r} cannot be set: ")


@pytest.mark.parametrize(
    "options",
    [
        {"countdown": 0.5, "queue": "q", "priority": 3, "retry": False},
        {"eta": datetime.datetime.now(datetime.timezone.utc), "expires": 30},
        {"expires": "2030-01-01T00:00:00+00:00", "time_limit": 5, "soft_time_limit": 4.5},
    ],
)
def test_valid_options_pass(celery: Celery, options: dict[str, object]) -> None:
    from flask_execute.options import check_options

    check_options(options)


@pytest.mark.parametrize("key", ["CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "BROKER_URL"])
def test_an_empty_broker_url_is_refused(key: str) -> None:
    app = Flask("empty_url")
    app.config.update({key: "", "CELERY_ALWAYS_EAGER": True})
    with pytest.raises(ConfigurationError) as info:
        Celery(app)
    assert str(info.value) == (
        f"{key!r} must be a URL such as 'redis://host:6379/0', or None (unset) for the"
        " default; got ''."
    )


def test_the_state_never_shows_the_broker_password() -> None:
    app = Flask("password_app")
    app.config.update(
        CELERY_ALWAYS_EAGER=True, CELERY_BROKER_URL="redis://:hunter2-secret@broker.example:6379/0"
    )
    Celery(app)
    text = repr(app.extensions["celery"].runtime(app))
    assert "hunter2-secret" not in text
    assert "broker.example:6379/0" in text

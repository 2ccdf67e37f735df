"""The Celery options a caller gives ``submit``/``map``/``apply``: which names are
reserved, which are refused, and what each one's value must be.

Options are checked in the caller, at submit time, with an error that names the
option, the value found and what is expected: a ``countdown='soon'`` must not travel
to the broker and fail there (or worse, be ignored).
"""

from __future__ import annotations

import datetime
import math
import typing as t
from collections.abc import Mapping

__all__ = ["REFUSED_OPTIONS", "RESERVED_OPTIONS", "check_options", "not_before"]

#: Keyword names ``submit`` and ``map`` take as Celery options, not as arguments of
#: the function. Use ``apply(func, args, kwargs, **options)`` when a function itself
#: has a parameter of one of these names.
RESERVED_OPTIONS = frozenset(
    {
        "queue", "countdown", "eta", "expires", "priority", "retry", "retry_policy",
        "time_limit", "soft_time_limit", "acks_late",
    }
)  # fmt: skip

#: ``apply_async`` options a submitted call cannot take, and why.
REFUSED_OPTIONS: dict[str, str] = {
    **dict.fromkeys(
        ("serializer", "args", "kwargs", "shadow", "argsrepr", "kwargsrepr", "task_id"),
        "flask-execute controls how calls travel.",
    ),
    **dict.fromkeys(
        ("link", "link_error", "chain", "chord", "group_id", "group_index"),
        "a submitted call carries no Celery callbacks, chains or groups (workers refuse"
        " such messages); use future.add_done_callback(), or submit the next call from"
        " the function itself.",
    ),
    **dict.fromkeys(
        ("root_id", "parent_id", "stamped_headers", "replaced_task_nesting"),
        "flask-execute sets it and signs it with the call.",
    ),
    "ignore_result": "a Future needs the result; a call whose result nobody reads costs"
    " one small key in the result backend until it expires.",
}


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object) -> bool:
    return _number(value) and t.cast(float, value) > 0


def _iso(value: object) -> bool:
    try:
        datetime.datetime.fromisoformat(t.cast(str, value))
    except (TypeError, ValueError):
        return False
    return True


_CHECKS: dict[str, tuple[t.Callable[[object], bool], str]] = {
    "queue": (lambda v: (isinstance(v, str) and bool(v)) or hasattr(v, "routing_key"),
              "a queue name (a non-empty string) or a kombu.Queue"),
    "countdown": (_number, "a number of seconds"),
    "eta": (lambda v: isinstance(v, datetime.datetime), "a datetime.datetime"),
    "expires": (lambda v: _number(v) or isinstance(v, datetime.datetime) or _iso(v),
                "a number of seconds, a datetime.datetime or an ISO 8601 string"),
    "priority": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255,
                 "an integer from 0 to 255"),
    "retry": (lambda v: isinstance(v, bool), "True or False"),
    "retry_policy": (lambda v: isinstance(v, Mapping), "a dict (max_retries, interval_start, ...)"),
    "time_limit": (_positive, "a positive number of seconds"),
    "soft_time_limit": (_positive, "a positive number of seconds"),
    "acks_late": (lambda v: v is None or isinstance(v, bool), "True, False or None"),
}  # fmt: skip


def check_options(options: Mapping[str, object]) -> None:
    """Refuse options a submitted call cannot take, and values of the wrong form.

    :raises TypeError: an option that flask-execute controls or workers refuse.
    :raises ValueError: an option whose value has the wrong type or range; the message
        names the option, the value found and what is expected.
    """
    for name in sorted(options):
        why = REFUSED_OPTIONS.get(name)
        if why is not None:
            raise TypeError(f"Option {name!r} cannot be set: {why}")
    for name, value in options.items():
        check = _CHECKS.get(name)
        if check is not None and not check[0](value):
            raise ValueError(f"Option {name!r} must be {check[1]}; got {value!r}.")


def not_before(options: Mapping[str, t.Any]) -> float | None:
    """When a call may run at the earliest (its ``eta`` or ``countdown``), as a
    timestamp; None: at once."""
    eta = options.get("eta")
    if isinstance(eta, datetime.datetime):
        return eta.timestamp()
    countdown = options.get("countdown")
    if isinstance(countdown, (int, float)):
        return datetime.datetime.now().timestamp() + countdown
    return None

"""``CELERY_WORKERS``: the local workers of an app and their ``celery worker`` options.

Each option of a ``CELERY_WORKERS`` dict means exactly the ``celery worker`` flag of the
same name (:data:`WORKER_OPTIONS` says how the value is rendered on the command line);
:func:`workers` validates the setting, :func:`worker_argv` renders one worker's options.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import ConfigurationError
from .validators import boolean
from .validators import fail
from .validators import log_level
from .validators import non_empty_str
from .validators import positive_number

__all__ = ["WORKER_OPTIONS", "worker_argv", "workers"]

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


def worker_option(worker: str, option: str, value: object) -> object:
    kind = WORKER_OPTIONS.get(option)
    key = f"CELERY_WORKERS[{worker!r}][{option!r}]"
    if kind is None:
        known = ", ".join(sorted(WORKER_OPTIONS))
        raise ConfigurationError(f"{key} is not a `celery worker` option. Known options: {known}.")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        fail(key, "a positive integer", value)
    if kind == "number":
        return positive_number(key, value)
    if kind == "level":
        return log_level(key, value)
    if kind == "str":
        return non_empty_str(key, value)
    if kind == "flag":
        return boolean(key, value)
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
        fail(key, "a list of queue names (or a comma-separated string)", value)
    if kind == "pair":
        pair = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
        if (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(str(v).isdigit() for v in pair)
        ):
            return [int(pair[0]), int(pair[1])]
        fail(key, "a (max, min) pair of integers", value)
    raise AssertionError(kind)  # pragma: no cover


def workers(key: str, value: object) -> dict[str, dict[str, object]]:
    expected = "an int, a list of names or a dict of options"
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            fail(key, expected + " (a count of 0 or more)", value)
        return {f"worker{i}": {} for i in range(1, value + 1)}
    if isinstance(value, (list, tuple)):
        if all(isinstance(n, str) and n and "@" not in n for n in value):
            if len(set(value)) != len(value):
                fail(key, expected + " with unique names", value)
            return {name: {} for name in value}
        fail(key, expected + " (names are strings without '@')", value)
    if isinstance(value, Mapping):
        workers: dict[str, dict[str, object]] = {}
        for name, options in value.items():
            if not isinstance(name, str) or not name or "@" in name:
                fail(key, expected + " (names are strings without '@')", value)
            if options is None:
                options = {}
            if not isinstance(options, Mapping):
                fail(f"{key}[{name!r}]", "a dict of `celery worker` options", options)
            workers[name] = {o: worker_option(name, o, v) for o, v in options.items()}
        return workers
    fail(key, expected, value)


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

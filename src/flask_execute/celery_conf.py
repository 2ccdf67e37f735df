"""The ``celery.Celery`` app of one Flask app: its settings, translated from
``app.config``, and its two dispatch tasks.

Every ``CELERY_*`` key that is not one of flask-execute's own reaches Celery, by
Celery's own table of old names or by dropping the ``CELERY_`` prefix; serializers are
forced to JSON. On top come the settings flask-execute needs (bounded broker retries for the web
process's ``submit``, prompt redelivery for at-least-once calls, a retried result
store), our worker consumer and transports (:mod:`flask_execute.admission`) and our
result backend (:mod:`flask_execute.backend`).

Broker retries, two policies: a web process publishing a call fails fast (two quick
retries, then :class:`~flask_execute.errors.BrokerUnavailable`), while a worker or beat
reconnects for as long as plain Celery does (``broker_connection_max_retries``, 100
tries with a growing pause: about 50 minutes). The fast policy is the default of every
process; :func:`serve_long` drops it when a worker or beat of this app starts
(``worker_init`` / ``beat_init``), however it was started.
"""

from __future__ import annotations

import dataclasses
import logging
import typing as t
import weakref
from collections.abc import Mapping

import celery as celery_module
from celery import Task
from flask import Flask

from .admission import install as install_admission
from .capacity import Advertise
from .config import KEY_NAMES
from .config import Settings
from .context import make_task_class
from .dispatch import DISPATCH
from .dispatch import dispatch_base
from .dispatch import dispatch_entry
from .dispatch import DISPATCH_LATE
from .dispatch import SafeRequest
from .errors import ConfigurationError
from .leases import LeaseTerm
from .running import Worker

__all__ = ["FAIL_FAST", "VISIBILITY_TIMEOUT", "CeleryApp", "build", "celery_settings", "serve_long"]


@dataclasses.dataclass
class CeleryApp:
    """The Celery side of one Flask app."""

    #: the ``celery.Celery`` app
    controller: celery_module.Celery
    #: the dispatch task (at most once) and its at-least-once variant
    dispatch: Task
    dispatch_late: Task
    #: Redis redelivers a message not acknowledged within this many seconds (None:
    #: another broker)
    visibility_timeout: float | None
    #: the queue ``base_task`` routes every task to, if it names one
    base_queue: str | None


def build(
    app: Flask,
    settings: Settings,
    translated: dict[str, object],
    broker_url: str,
    backend_url: str,
    base_task: type[Task] | None,
    worker: t.Callable[[], Worker],
) -> CeleryApp:
    """Build the Celery app of ``app`` from its plugin ``settings`` and the Celery
    settings ``translated`` from its config (:func:`celery_settings`), and register its
    dispatch tasks, whose body runs with ``worker()`` (called on each run: the codec and
    claims it gives are built once, by the caller, after this app exists).

    :raises ConfigurationError: the config asks Celery for pickle.
    """
    task_class = make_task_class(app, base_task)
    controller = celery_module.Celery(app.import_name, task_cls=task_class, set_as_current=False)
    controller.steps["worker"].add(Advertise)  # what map's automatic chunk size reads
    controller.steps["worker"].add(LeaseTerm)  # how long its Redis leases last
    timeout = settings.broker_timeout
    conf: dict[str, object] = {
        "broker_url": broker_url,
        "result_backend": backend_url,
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": timeout,
        # kombu scans for unacknowledged messages to redeliver only every 100 s by
        # default; every 10 s makes at-least-once recovery prompt. Workers renew the
        # leases of the messages they hold on each scan (leases.py), so a visibility
        # timeout of minutes bounds how long a dead worker's messages wait without
        # limiting how long a task may run.
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "socket_connect_timeout": timeout,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            **FAIL_FAST,
        },
        "task_publish_retry_policy": FAIL_FAST,
        "redis_socket_connect_timeout": timeout,
        # a result backend blip while a worker stores a result: retry, bounded
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        "worker_hijack_root_logger": True,
    }
    translated = dict(translated)
    user_transport = translated.pop("broker_transport_options", None) or {}
    conf["broker_transport_options"] = {
        **t.cast(dict[str, t.Any], conf["broker_transport_options"]),
        **t.cast(dict[str, t.Any], user_transport),
    }
    conf.update(translated)
    # eager mode is ours (CELERY_ALWAYS_EAGER); registered tasks' delay() follows it
    conf["task_always_eager"] = settings.always_eager
    # the URLs decided by the caller win over a CELERY={"broker_url": ...} also set
    conf.update(broker_url=broker_url, result_backend=backend_url)
    controller.conf.update(conf)
    install_admission(controller, settings.max_message_size)
    # our watcher follows our tasks: no per-task subscription by Celery's backend
    quiet = "flask_execute.backend:QuietRedisBackend"
    controller.loader.override_backends = {"redis": quiet, "rediss": quiet}
    controller.flask_app = app
    base = dispatch_base(task_class)
    dispatch = _register(controller, base, worker, DISPATCH, acks_late=False)
    dispatch_late = _register(
        controller, base, worker, DISPATCH_LATE, acks_late=True, reject_on_worker_lost=True
    )
    visibility = _visibility_timeout(controller, broker_url)
    serve_long(controller, set(t.cast(dict[str, t.Any], user_transport)))
    return CeleryApp(
        controller, dispatch, dispatch_late, visibility, getattr(base_task, "queue", None)
    )


#: Seconds after which Redis gives back a message whose worker stopped renewing its
#: lease (kombu's default is 3600).
VISIBILITY_TIMEOUT = 300

#: The web process's retry policy for publishing (and for any broker connection it
#: opens): two quick retries, then the caller gets ``BrokerUnavailable``.
FAIL_FAST: dict[str, float] = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}


def serve_long(controller: celery_module.Celery, user_keys: set[str]) -> None:
    """When a worker or beat of ``controller`` starts, give up the web process's
    fail-fast broker retries (those of :data:`FAIL_FAST` the user did not set in
    ``CELERY_BROKER_TRANSPORT_OPTIONS``): it then reconnects as plain Celery does.
    (Publishing from inside a task keeps the fast policy: the task reports it.)"""
    from celery import signals

    # the signal must not keep an app alive
    ref: weakref.ref[celery_module.Celery] = weakref.ref(controller)

    def long_lived(sender: t.Any = None, **_: t.Any) -> None:
        owner = ref()
        if owner is None or getattr(sender, "app", None) is not owner:
            return
        conf = t.cast(t.Any, owner).conf
        options = dict(conf.broker_transport_options or {})
        for key in FAIL_FAST:
            if key not in user_keys:
                options.pop(key, None)
        conf.broker_transport_options = options

    # held by the controller itself: the connection is weak and dies with the app
    controller.flask_execute_long_lived = long_lived
    signals.worker_init.connect(long_lived)
    signals.beat_init.connect(long_lived)


def _register(
    controller: celery_module.Celery,
    base: type[Task],
    worker: t.Callable[[], Worker],
    name: str,
    **options: t.Any,
) -> Task:
    """Register one dispatch task (the default one, or the at-least-once one)."""

    # track_started off: execute() reports STARTED itself, after the envelope checked
    # out, so nothing is ever written under an unauthenticated task id.
    @controller.task(  # type: ignore[untyped-decorator]
        name=name,
        bind=True,
        shared=False,
        typing=False,
        track_started=False,
        base=base,
        Request=SafeRequest,
        **options,
    )
    def dispatch(task: Task, *args: t.Any, **kwargs: t.Any) -> t.Any:
        return dispatch_entry(task, worker(), args, kwargs)

    return t.cast(Task, dispatch)


def _visibility_timeout(controller: t.Any, broker_url: str) -> float | None:
    """Redis redelivers a message not acknowledged within this many seconds."""
    if not broker_url.startswith(("redis", "rediss")):
        return None
    options = controller.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", VISIBILITY_TIMEOUT))


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


def _pickle_refusal(refused: list[str]) -> str:
    """Why Celery may not (un)pickle, and that the keys can simply go: 0.1.6 needed
    them, we do not (its documented defaults are the usual reason they are there)."""
    keys = " and ".join([", ".join(refused[:-1]), refused[-1]] if len(refused) > 1 else refused)
    them = "them" if len(refused) > 1 else "it"
    return (
        f"{keys}: no longer needed, delete {them}. flask-execute pickles calls and"
        " results itself and signs them before they travel, and keeps Celery's own"
        " serializers JSON-only, so that nothing from the broker is unpickled before"
        " its signature is checked (Flask-Execute 0.1.6 needed Celery to pickle; see"
        " docs/migrating.md)."
    )


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
        if key in KEY_NAMES or key == "CELERY" or not key.startswith(("CELERY", "BROKER_")):
            continue  # the app's own keys (S3_*, DATABASE_*, ...) are not Celery's
        if key in old_to_new:
            out[old_to_new[key]] = value
            source[old_to_new[key]] = key
        elif key.startswith("CELERY_") and key[7:].lower() in known:
            out[key[7:].lower()] = value
            source[key[7:].lower()] = key
    unsafe: list[str] = []
    refused: list[str] = []
    for name in _FORCED_JSON:
        value = out.get(name)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
        bad = [v for v in values if v in _PICKLE_NAMES]
        if bad and config.get("CELERY_UNSAFE_ALLOW_PICKLE") is True:
            unsafe.append(name)
        elif bad:
            refused.append(f"{source.get(name, name)} = {value!r}")
    if refused:
        raise ConfigurationError(_pickle_refusal(refused))
    if unsafe:
        logging.getLogger("flask_execute.security").warning(
            "CELERY_UNSAFE_ALLOW_PICKLE is on: Celery will unpickle %s from the broker;"
            " anyone who can write to the broker can run code on the workers.",
            ", ".join(unsafe),
        )
    out.update({k: v for k, v in _FORCED_JSON.items() if k not in unsafe})
    out.pop("task_always_eager", None)  # eager mode is ours: CELERY_ALWAYS_EAGER
    return out

"""Which queues a worker consumes when it is not told (no ``-Q``/``-X``).

Plain Celery consumes only the default queue, so a worker started as
``celery -A flask_execute.celery worker`` (the production command) or
``flask celery worker`` left every call routed to a queue of ``CELERY_WORKERS`` (or
to the base task's queue) pending forever, with no word on either side. Such a
worker now consumes:

- with ``-n NAME@host`` naming a worker of ``CELERY_WORKERS``: that worker's queues,
  as the local worker ``NAME`` does;
- otherwise: every queue the app routes to (the default queue, the base task's,
  and each queue named in ``CELERY_WORKERS``), and says so in its log.

Local workers are given their queues on their command line and are left alone, as
is any worker given ``-Q`` or ``-X``.
"""

from __future__ import annotations

import logging
import typing as t
import weakref

from celery import signals

__all__ = ["install", "queues_for", "routed_queues"]

log = logging.getLogger(__name__)

# worker instance -> the queues chosen for it at celeryd_init, applied once Celery
# selected its own (celeryd_after_setup)
_chosen: weakref.WeakKeyDictionary[t.Any, tuple[list[str], str]] = weakref.WeakKeyDictionary()


def routed_queues(runtime: t.Any) -> list[str]:
    """Every queue ``runtime``'s app routes to: the default queue, the base task's
    queue, then each queue of ``CELERY_WORKERS`` (in order, once each)."""
    names = [runtime.controller.conf.task_default_queue]
    if runtime.base_queue:
        names.append(runtime.base_queue)
    for name in runtime.settings.workers:
        names += list(runtime.worker_options(name, local=False).get("queues") or ())
    return list(dict.fromkeys(names))


def queues_for(runtime: t.Any, hostname: str) -> tuple[list[str], str]:
    """The queues a worker named ``hostname`` consumes when not told, and why."""
    name = hostname.split("@", 1)[0]
    if name in runtime.settings.workers:
        options = runtime.worker_options(name, local=False)
        queues = list(options.get("queues") or [runtime.controller.conf.task_default_queue])
        return queues, f"the queues of worker {name!r} in CELERY_WORKERS"
    return routed_queues(runtime), (
        "every queue this app routes to: the default queue, the base task's and those of"
        " CELERY_WORKERS; -n NAME@%h runs one worker of CELERY_WORKERS with its queues"
    )


def _choose(
    sender: t.Any = None, instance: t.Any = None, options: t.Any = None, **_: t.Any
) -> None:
    runtime = getattr(getattr(instance, "app", None), "flask_execute", None)
    if runtime is None or runtime.is_child or not isinstance(options, dict):
        return  # not our app, or a local worker (its queues are on its command line)
    if options.get("queues") or options.get("exclude_queues"):
        return  # -Q / -X: the user chose
    queues, why = queues_for(runtime, str(instance.hostname))
    if queues != [runtime.controller.conf.task_default_queue]:
        _chosen[instance] = (queues, why)


def _apply(sender: t.Any = None, instance: t.Any = None, **_: t.Any) -> None:
    chosen = _chosen.pop(instance, None)
    if chosen is None:
        return
    queues, why = chosen
    instance.app.amqp.queues.select(queues)
    # logging is set up by now (it was not at celeryd_init)
    log.warning(
        "flask-execute: worker %s consumes %s (%s; -Q chooses others)",
        instance.hostname,
        ", ".join(queues),
        why,
    )


def install() -> None:
    """Connect the worker hooks (once per process; idempotent)."""
    signals.celeryd_init.connect(_choose, weak=False, dispatch_uid="flask-execute-queues-choose")
    signals.celeryd_after_setup.connect(
        _apply, weak=False, dispatch_uid="flask-execute-queues-apply"
    )

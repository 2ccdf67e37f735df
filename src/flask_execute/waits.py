"""Why a call is not done yet: what a timeout error says beyond its state."""

from __future__ import annotations

import typing as t

from kombu.utils.url import maybe_sanitize_url

from .control import Inspect
from .futures import Future

__all__ = ["describe_running", "describe_wait"]

_FINAL = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
_FATE = "a call with acks_late=True runs again when redelivered, any other is not run again."


def describe_wait(
    controller: t.Any,
    future: Future[t.Any],
    base_queue: str | None,
    local_workers: bool,
    broker_url: str,
) -> str:
    """For a future still ``PENDING``: whether any worker consumes its queue (the
    workers of ``controller``'s broker are asked, for at most 0.3 s), and what to check
    when none does. For a task that started: whether the worker that runs it still
    answers and still runs it (:func:`describe_running`)."""
    if future.state in _FINAL:
        return ""
    if future.state != "PENDING":
        return describe_running(controller, future)
    if future.name is None:  # from celery.get(): we never saw it sent
        return (
            " The result backend knows nothing of this task id: it is still queued,"
            " was never submitted, or its result expired before any worker ran it."
        )
    queue = future.queue or base_queue or controller.conf.task_default_queue
    try:
        replies = Inspect(controller).active_queues(timeout=0.3)
    except Exception as exc:
        return f" The broker could not be asked which workers run ({exc})."
    seen = ", ".join(
        f"{node} [{', '.join(q['name'] for q in queues)}]"
        for node, queues in sorted(replies.items())
    )
    consumers = [
        node for node, queues in replies.items() if any(q["name"] == queue for q in queues)
    ]
    if consumers:
        return f" Workers consuming {queue!r}: {', '.join(sorted(consumers))} (busy?)."
    hint = ""
    if not local_workers:
        hint = (
            " Local workers are off (CELERY_START_LOCAL_WORKERS=False): is a worker"
            f" running for this app on broker {maybe_sanitize_url(broker_url)}?"
        )
    return f" No worker consumes queue {queue!r} (workers seen: {seen or 'none'}).{hint}"


def describe_running(controller: t.Any, future: Future[t.Any]) -> str:
    """For a task that started: which worker runs it, or that the worker which started
    it stopped answering (killed, stopped, cut off from the broker) or runs it no more
    (it was restarted). The worker (else every worker) is asked for at most 0.5 s."""
    message = future.chunk.task_id if future.chunk is not None else future.id
    worker = future.worker
    destination = [worker] if worker else None
    try:
        replies = Inspect(controller).query_task(message, timeout=0.5, destination=destination)
    except Exception as exc:
        return f" The broker could not be asked which worker runs it ({exc})."
    running = sorted(node for node, tasks in replies.items() if tasks and message in tasks)
    if running:
        return f" It runs on worker {', '.join(running)}."
    if worker is None:
        seen = ", ".join(sorted(replies)) or "none"
        return f" No worker reports running it (workers seen: {seen})."
    if worker not in replies:
        return (
            f" Worker {worker}, which started it, stopped answering (killed, stopped or cut"
            f" off from the broker): {_FATE}"
        )
    return f" Worker {worker} started it but runs it no more (the worker was restarted): {_FATE}"

"""Why a call is not done yet: what a timeout error says beyond its state."""

from __future__ import annotations

import typing as t

from kombu.utils.url import maybe_sanitize_url

from .control import Inspect
from .futures import Future

__all__ = ["describe_wait"]


def describe_wait(
    controller: t.Any,
    future: Future[t.Any],
    base_queue: str | None,
    local_workers: bool,
    broker_url: str,
) -> str:
    """For a future still ``PENDING``: whether any worker consumes its queue (the
    workers of ``controller``'s broker are asked, for at most 0.3 s), and what to check
    when none does. ``''`` for a task that started."""
    if future.state != "PENDING":
        return ""
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

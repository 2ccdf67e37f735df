"""Which queue a call goes to, as the caller can tell it: what its timeout names."""

from __future__ import annotations

import typing as t
from collections.abc import Mapping

from celery import Task

__all__ = ["Routes"]


class Routes:
    """The queue of a call: its ``queue`` option, else its task's ``queue`` (the base
    task's), else Celery's routing (``task_routes``, the default queue)."""

    def __init__(self, controller: t.Any) -> None:
        self._controller = controller
        self._routed: dict[str, str] = {}  # task name -> the queue Celery routes it to

    def queue_of(self, task: Task, options: Mapping[str, t.Any]) -> str:
        queue = options.get("queue") or getattr(task, "queue", None)
        if queue:
            return str(getattr(queue, "name", queue))
        routed = self._routed.get(task.name)
        if routed is None:  # the same for every call of the task: asked once
            router = self._controller.amqp.router
            queue = router.route({}, task.name, (), {}, task).get("queue")
            routed = self._routed[task.name] = str(getattr(queue, "name", queue))
        return routed

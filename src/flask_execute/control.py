"""``celery.inspect``: Celery's inspect commands, in process (no CLI subprocess)."""

from __future__ import annotations

import typing as t
from collections.abc import Callable

__all__ = ["Inspect"]


class Inspect:
    """``celery.inspect.<command>(*args, timeout=1.0, destination=None)``.

    Each command broadcasts Celery's inspect request and returns ``{node: reply}``
    (``{}`` when no worker answered within ``timeout`` seconds).
    """

    def __init__(self, controller: t.Any, limit: int | None = None) -> None:
        self._controller = controller
        self._limit = limit  # expected local workers: stop waiting once all replied

    def __getattr__(self, command: str) -> Callable[..., dict[str, t.Any]]:
        if command.startswith("_"):
            raise AttributeError(command)
        from celery.app.control import Inspect as CeleryInspect

        if not callable(getattr(CeleryInspect, command, None)):
            raise AttributeError(f"Celery has no inspect command {command!r}.")

        def call(
            *args: t.Any,
            timeout: float = 1.0,
            destination: list[str] | None = None,
            **kwargs: t.Any,
        ) -> dict[str, t.Any]:
            limit = len(destination) if destination else self._limit
            inspect = self._controller.control.inspect(
                timeout=timeout, destination=destination, limit=limit
            )
            return getattr(inspect, command)(*args, **kwargs) or {}

        call.__name__ = command
        return call


class Control:
    """``celery.control.<command>(*args, timeout=1.0, destination=None, reply=True)``.

    Celery's remote-control commands with their real arguments (``pool_grow(n)``,
    ``pool_shrink(n)``, ``autoscale(max, min)``, ``rate_limit(task_name, rate)``,
    ``time_limit(task_name, soft, hard)``, ``add_consumer(queue)``, ``shutdown()``,
    ``pool_restart()``, ``revoke(task_id)``, ``ping()``, ...). Returns the workers'
    replies as ``{node: reply}`` (``{}`` with ``reply=False``).
    """

    def __init__(self, controller: t.Any, limit: int | None = None) -> None:
        self._controller = controller
        self._limit = limit

    def __getattr__(self, command: str) -> Callable[..., t.Any]:
        if command.startswith("_"):
            raise AttributeError(command)
        control = self._controller.control
        method = getattr(control, command, None)
        if not callable(method):
            raise AttributeError(f"Celery has no control command {command!r}.")
        if command in ("inspect", "broadcast", "purge", "discard_all", "election"):
            return t.cast(Callable[..., t.Any], method)

        def call(
            *args: t.Any,
            timeout: float = 1.0,
            destination: list[str] | None = None,
            reply: bool = True,
            **kwargs: t.Any,
        ) -> t.Any:
            limit = len(destination) if destination else self._limit
            if command == "shutdown":
                reply = False  # a worker shutting down never answers
            if command != "ping":  # ping always asks for replies
                kwargs["reply"] = reply
            replies = method(*args, destination=destination, timeout=timeout, limit=limit, **kwargs)
            if not reply:
                return {}
            merged: dict[str, t.Any] = {}
            for item in replies or ():
                if isinstance(item, dict):
                    merged.update(item)
            return merged

        call.__name__ = command
        return call

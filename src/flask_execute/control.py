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

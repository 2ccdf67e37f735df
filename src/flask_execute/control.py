"""``celery.inspect``: Celery's inspect commands, in process (no CLI subprocess)."""

from __future__ import annotations

import inspect
import typing as t
from collections.abc import Callable

from .outage import Endpoints

__all__ = ["Control", "Inspect", "commands_help"]

# keyword arguments every command takes from us, not shown per command
_OURS = {"self", "destination", "timeout", "reply", "limit", "callback", "connection", "kwargs"}


def commands_help(kind: str, celery_class: type, extra: str) -> str:
    """The commands of ``celery.<kind>``, one line each: name, arguments, what it does
    (from Celery's own command table, for the commands this Celery version has)."""
    from celery.worker.control import Panel

    lines = [f"celery.{kind}.<command>(...){extra}", ""]
    for name, info in sorted(Panel.meta.items()):
        method = getattr(celery_class, name, None)
        if info.type != kind or not info.visible or not callable(method):
            continue
        try:
            params = [
                str(p)
                for p in inspect.signature(method).parameters.values()
                if p.name not in _OURS and p.kind is not p.VAR_KEYWORD
            ]
        except (TypeError, ValueError):  # pragma: no cover - a builtin without signature
            params = []
        lines.append(f"  {name}({', '.join(params)}): {info.help or ''}".rstrip(": "))
    return "\n".join(lines)


def _endpoints(controller: t.Any) -> Endpoints:
    conf = controller.conf
    return Endpoints(str(conf.broker_url), str(conf.result_backend or conf.broker_url))


class Inspect:
    """``celery.inspect.<command>(*args, timeout=1.0, destination=None)``.

    Each command broadcasts Celery's inspect request and returns ``{node: reply}``
    (``{}`` when no worker answered within ``timeout`` seconds).
    """

    def __init__(
        self, controller: t.Any, limit: int | None = None, endpoints: Endpoints | None = None
    ) -> None:
        self._controller = controller
        self._limit = limit  # expected local workers: stop waiting once all replied
        # errors of an unreachable broker become BrokerUnavailable naming it
        self._endpoints = endpoints or _endpoints(controller)

    def help(self) -> str:
        """The inspect commands, their arguments and what each returns, one per line
        (``print(celery.inspect.help())``)."""
        from celery.app.control import Inspect as CeleryInspect

        return commands_help(
            "inspect", CeleryInspect, "  ->  {node: reply}; timeout=1.0, destination=None"
        )

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
            action = getattr(inspect, command)
            return self._endpoints.call("broker", lambda: action(*args, **kwargs)) or {}

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

    def __init__(
        self, controller: t.Any, limit: int | None = None, endpoints: Endpoints | None = None
    ) -> None:
        self._controller = controller
        self._limit = limit
        self._endpoints = endpoints or _endpoints(controller)

    def help(self) -> str:
        """The remote-control commands, their arguments and what each does, one per
        line (``print(celery.control.help())``)."""
        from celery.app.control import Control as CeleryControl

        return commands_help(
            "control",
            CeleryControl,
            "  ->  {node: reply}; timeout=1.0, destination=None, reply=True",
        )

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
            replies = self._endpoints.call(
                "broker",
                lambda: method(
                    *args, destination=destination, timeout=timeout, limit=limit, **kwargs
                ),
            )
            if not reply:
                return {}
            merged: dict[str, t.Any] = {}
            for item in replies or ():
                if isinstance(item, dict):
                    merged.update(item)
            return merged

        call.__name__ = command
        return call

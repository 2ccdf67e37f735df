"""``@celery.task`` and ``@celery.schedule``: declarations usable before and after
``init_app``.

A declaration lives on the extension object (it is not app-specific) and is
registered on the Celery app of every Flask app the extension serves, now and later.
The decorator returns a :class:`TaskProxy`: called, it runs the function locally;
``.delay``/``.apply_async``/``.s``/... go to the task of the current app, so
``add.delay(1, 2)`` works in the direct *and* the factory setup, and so does
``celery.task.add.delay(1, 2)``.

Task names are ``module.qualname``; a function of a script run as ``python app.py``
(module ``__main__``) is named after the script (``app.add``), which is the module
name local workers import the script under, so both sides agree.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import typing as t
from collections.abc import Callable
from collections.abc import Iterator

if t.TYPE_CHECKING:
    from celery import Task

__all__ = ["AppTarget", "ScheduleRegistry", "Source", "TaskProxy", "TaskRegistry", "task_name"]


class AppTarget(t.Protocol):
    """What a declaration needs of one app: its Celery app, and a way to start its
    local services (``delay`` starts them, like ``submit``)."""

    controller: t.Any

    def ensure_started(self) -> None: ...


class Source(t.Protocol):
    """Where the registries find the apps to register on: every app served so far,
    and the current one."""

    def runtimes(self) -> list[t.Any]: ...

    def runtime(self, app: t.Any = None) -> t.Any: ...


F = t.TypeVar("F", bound=Callable[..., t.Any])


def module_name(func: Callable[..., t.Any]) -> str:
    """The module a function will be imported from on a worker."""
    module = func.__module__
    if module == "__main__":
        path = getattr(sys.modules["__main__"], "__file__", None)
        if path:
            return str(os.path.splitext(os.path.basename(path))[0])
    return str(module)


def task_name(func: Callable[..., t.Any]) -> str:
    """Default registered name: ``module.qualname`` (script-stem for ``__main__``)."""
    return f"{module_name(func)}.{func.__qualname__}"


@dataclasses.dataclass
class Declaration:
    func: Callable[..., t.Any]
    name: str
    options: dict[str, t.Any]


class TaskProxy:
    """What ``@celery.task`` returns: the function, plus Celery's task API routed to
    the task of the current app."""

    def __init__(self, registry: TaskRegistry, declaration: Declaration) -> None:
        self._registry = registry
        self._declaration = declaration
        self.__wrapped__ = declaration.func
        self.__name__ = declaration.func.__name__
        self.__qualname__ = declaration.func.__qualname__
        self.__doc__ = declaration.func.__doc__
        self.__module__ = declaration.func.__module__

    def __repr__(self) -> str:
        return f"<@task {self._declaration.name}>"

    @property
    def name(self) -> str:
        return self._declaration.name

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        """Run the function here, like calling a Celery task object does."""
        return self.task(*args, **kwargs)

    @property
    def task(self) -> Task:
        """The registered Celery task of the current app."""
        state: AppTarget = self._registry.source.runtime()
        return state.controller.tasks[self._declaration.name]

    def __getattr__(self, name: str) -> t.Any:
        # delay, apply_async, s, si, signature, map, starmap, chunks, AsyncResult, ...
        state: AppTarget = self._registry.source.runtime()
        if name in ("delay", "apply_async"):
            state.ensure_started()  # like submit(): local workers start on first use
        return getattr(state.controller.tasks[self._declaration.name], name)

    def __reduce__(self) -> tuple[t.Any, ...]:
        # by reference: a worker finds the same proxy by importing the module
        return (_import_attr, (module_name(self.__wrapped__), self.__qualname__))


def _import_attr(module: str, qualname: str) -> t.Any:
    import importlib

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or ""
    if module not in sys.modules and os.path.splitext(os.path.basename(path))[0] == module:
        obj: t.Any = main  # the script itself, in the process that runs it
    else:
        obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class TaskRegistry:
    """``celery.task``: a decorator, and the registered tasks by attribute or key."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._declarations: dict[str, Declaration] = {}
        self._proxies: dict[str, TaskProxy] = {}

    @t.overload
    def __call__(self, func: F, /) -> TaskProxy: ...
    @t.overload
    def __call__(self, /, **options: t.Any) -> Callable[[F], TaskProxy]: ...
    def __call__(
        self, func: F | None = None, /, **options: t.Any
    ) -> TaskProxy | Callable[[F], TaskProxy]:
        """``@celery.task`` or ``@celery.task(bind=True, max_retries=3, name=...)``:
        Celery's task options pass through."""
        if func is not None:
            if not callable(func):
                raise TypeError(f"@celery.task decorates a function; got {func!r}.")
            return self.declare(func, options)

        def decorator(f: F) -> TaskProxy:
            return self.declare(f, options)

        return decorator

    def declare(self, func: Callable[..., t.Any], options: dict[str, t.Any]) -> TaskProxy:
        options = dict(options)
        name = options.pop("name", None) or task_name(func)
        declaration = Declaration(func, name, options)
        self._declarations[name] = declaration
        proxy = TaskProxy(self, declaration)
        self._proxies[name] = proxy
        self._proxies.setdefault(func.__name__, proxy)
        for state in self.source.runtimes():
            register(state, declaration)
        return proxy

    def __getattr__(self, name: str) -> TaskProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._proxies[name]
        except KeyError:
            raise AttributeError(
                f"No task {name!r} is registered with @celery.task"
                f" (known: {', '.join(sorted(self._proxies)) or 'none'})."
            ) from None

    def __getitem__(self, name: str) -> TaskProxy:
        return self._proxies[name]

    def __contains__(self, name: object) -> bool:
        return name in self._proxies

    def __iter__(self) -> Iterator[str]:
        return iter(self._declarations)

    def declarations(self) -> list[Declaration]:
        return list(self._declarations.values())


def register(state: AppTarget, declaration: Declaration) -> None:
    """Register one declaration on one app's Celery app (idempotent)."""
    controller = state.controller
    if declaration.name in controller.tasks:
        return
    controller.task(name=declaration.name, shared=False, **declaration.options)(declaration.func)
    module = module_name(declaration.func)
    if module not in ("__main__",) and module not in controller.conf.include:
        # workers import it at start, so they know the task even when the app's own
        # module does not import it
        controller.conf.include = [*controller.conf.include, module]


@dataclasses.dataclass
class Entry:
    name: str
    task: str
    schedule: t.Any
    args: tuple[t.Any, ...]
    kwargs: dict[str, t.Any]
    options: dict[str, t.Any]

    def as_beat(self) -> dict[str, t.Any]:
        entry: dict[str, t.Any] = {"task": self.task, "schedule": self.schedule}
        if self.args:
            entry["args"] = self.args
        if self.kwargs:
            entry["kwargs"] = self.kwargs
        if self.options:
            entry["options"] = self.options
        return entry


_CRONTAB_KEYS = frozenset({"minute", "hour", "day_of_week", "day_of_month", "month_of_year"})


class ScheduleRegistry:
    """``celery.schedule``: declare a periodic task."""

    def __init__(self, source: Source, tasks: TaskRegistry) -> None:
        self._source = source
        self._tasks = tasks
        self._entries: dict[str, Entry] = {}

    def __call__(
        self,
        schedule: t.Any = None,
        *,
        args: tuple[t.Any, ...] | list[t.Any] = (),
        kwargs: dict[str, t.Any] | None = None,
        options: dict[str, t.Any] | None = None,
        name: str | None = None,
        **crontab: t.Any,
    ) -> Callable[[F], TaskProxy]:
        """``@celery.schedule(30)`` (seconds), ``(timedelta(...))``, crontab keywords
        (``hour=0, minute=0``), or any Celery schedule object (``solar(...)``).

        :raises TypeError: unknown keywords, or both a schedule and crontab keywords.
        """
        unknown = set(crontab) - _CRONTAB_KEYS
        if unknown:
            raise TypeError(
                f"@celery.schedule got unexpected keyword {sorted(unknown)[0]!r}; crontab"
                f" keywords are {', '.join(sorted(_CRONTAB_KEYS))}."
            )
        if schedule is not None and crontab:
            raise TypeError("Give either a schedule or crontab keywords, not both.")
        if schedule is None and not crontab:
            raise TypeError(
                "@celery.schedule needs a schedule: seconds, a timedelta,"
                " crontab keywords or a Celery schedule object."
            )
        resolved = _resolve(schedule, crontab)

        def decorator(func: F) -> TaskProxy:
            proxy = func if isinstance(func, TaskProxy) else self._tasks(func)
            entry = Entry(
                name=name or proxy.name,
                task=proxy.name,
                schedule=resolved,
                args=tuple(args),
                kwargs=dict(kwargs or {}),
                options=dict(options or {}),
            )
            self._entries[entry.name] = entry
            for state in self._source.runtimes():
                apply_schedule(state, entry)
            return proxy

        return decorator

    def __getattr__(self, name: str) -> TaskProxy:
        """The task a schedule runs, by the schedule's name, the task's registered
        name or the function's name: ``celery.schedule.nightly.delay()`` runs it
        now, ``celery.schedule.nightly()`` here (as in Flask-Execute 0.1.6).

        :raises AttributeError: no schedule runs a task of that name.
        """
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"No schedule or scheduled task is named {name!r}"
                f" (schedules: {', '.join(sorted(self._entries)) or 'none'})."
            ) from None

    def __getitem__(self, name: str) -> TaskProxy:
        entry = self._entries.get(name)
        if entry is not None:
            return self._tasks[entry.task]
        for entry in self._entries.values():
            proxy = self._tasks[entry.task]
            if name in (entry.task, proxy.__name__):
                return proxy
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())


def _resolve(schedule: t.Any, crontab: dict[str, t.Any]) -> t.Any:
    from celery.schedules import crontab as make_crontab

    if crontab:
        return make_crontab(**crontab)
    if isinstance(schedule, bool):
        raise TypeError(f"Not a schedule: {schedule!r}.")
    if isinstance(schedule, (int, float)):
        if schedule <= 0:
            raise ValueError(f"A schedule interval must be positive; got {schedule!r}.")
        return float(schedule)
    if isinstance(schedule, datetime.timedelta):
        return schedule
    if hasattr(schedule, "is_due"):
        return schedule
    raise TypeError(
        f"Not a schedule: {schedule!r}. Give seconds, a timedelta, crontab keywords or a"
        " Celery schedule object."
    )


def apply_schedule(state: AppTarget, entry: Entry) -> None:
    conf = state.controller.conf
    conf.beat_schedule = {**(conf.beat_schedule or {}), entry.name: entry.as_beat()}

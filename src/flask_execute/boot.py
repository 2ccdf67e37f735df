"""The worker's entry point (``flask_execute.celery``): build the same Flask app as the
process that started it, and report readiness to it.

At ``init_app`` the web process recorded a *locator* for the app
(:mod:`flask_execute.locator`). At start-up it writes a private, signed boot file
(:mod:`.bootfile`) with the locator, its ``sys.path`` and a snapshot of the app's
effective config; the worker verifies it, then rebuilds the app through the locator
while that snapshot is *pinned* (config writes of the factory to those keys are
ignored), so the worker sees the same effective config as the web process — including
overrides a test applied after ``create_app``.

Without a boot file (``celery -A flask_execute.celery worker`` by hand), the app is
found like ``flask`` finds it: ``FLASK_APP`` or ``app.py`` / ``wsgi.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import os
import signal
import sys
import threading
import time
import types
import typing as t
from collections.abc import Iterator

from flask import Config
from flask import Flask

from . import bootfile
from .flower import stop_on_sigterm
from .importguard import refuse_calls_while_importing
from .local import BOOT_ENV
from .local import BOOT_KEY_ENV
from .local import CHILD_ENV
from .local import LIFELINE_FD_ENV
from .plugin import Celery
from .processes import READY_FD_ENV

__all__ = ["build", "celery_app"]

log = logging.getLogger(__name__)
_PARENT_GRACE = 10.0


# --- config pinning ------------------------------------------------------------------
class _PinnedConfig(Config):
    """A Config whose pinned keys ignore writes while the worker rebuilds the app."""

    pinned: dict[str, t.Any]

    def __setitem__(self, key: str, value: t.Any) -> None:
        if key in self.__dict__.get("pinned", {}):
            return
        super().__setitem__(key, value)

    def update(self, *args: t.Any, **kwargs: t.Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


@contextlib.contextmanager
def _pinned(snapshot: dict[str, t.Any]) -> Iterator[list[Flask]]:
    original = Flask.make_config
    created: list[Flask] = []

    def make_config(self: Flask, instance_relative: bool = False) -> Config:
        config = original(self, instance_relative)
        pinned = _PinnedConfig(config.root_path, dict(config))
        dict.update(pinned, snapshot)
        pinned.pinned = snapshot
        created.append(self)
        return pinned

    Flask.make_config = make_config  # type: ignore[method-assign,assignment]
    try:
        yield created
    finally:
        Flask.make_config = original  # type: ignore[method-assign]
        for app in created:
            if isinstance(app.config, _PinnedConfig):
                app.config.pinned = {}


def _import_script(name: str, path: str) -> types.ModuleType:
    """Import the script the web process ran (``python app.py``) as module ``name``;
    a source loader, so a script without a ``.py`` suffix imports too."""
    if not os.path.isfile(path):
        raise RuntimeError(
            f"The script {path} that built the Flask app in the web process is gone, so"
            " this worker cannot build the same app. Start the workers again."
        )
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def _call_factory(factory: t.Callable[[], object], locator: tuple[t.Any, ...]) -> object:
    """Call the app factory as the worker must: without arguments."""
    try:
        inspect.signature(factory).bind()
    except TypeError:
        name = getattr(factory, "__name__", "create_app")
        raise RuntimeError(
            f"The app factory {locator[1]}:{name} needs arguments, but a worker builds"
            " the app by calling it without any (the web process's config reaches the"
            f" worker anyway). Give its parameters defaults: def {name}(config=None)."
        ) from None
    except ValueError:  # pragma: no cover - no signature to check (a builtin)
        pass
    return factory()


def build(boot: dict[str, t.Any]) -> Flask:
    """Rebuild the app described by a boot file's content."""
    for path in reversed(boot["sys_path"]):
        if path not in sys.path:
            sys.path.insert(0, path)
    locator = boot["locator"]
    with _pinned(boot["config"]):
        kind = locator[0]
        if kind == "module":
            _, module_name, attr, factory = locator
            obj = getattr(importlib.import_module(module_name), attr)
        elif kind == "file":
            _, path, attr, factory = locator
            name = os.path.splitext(os.path.basename(path))[0]
            module = sys.modules.get(name)
            if getattr(module, "__file__", None) != path:
                module = _import_script(name, path)
            obj = getattr(module, attr)
        else:
            factory = False
            obj = Flask(
                boot["import_name"],
                root_path=boot["root_path"],
                instance_path=boot["instance_path"],
            )
            Celery(obj, base_task=boot.get("base_task"))
        app = _call_factory(obj, locator) if factory else obj
    if not isinstance(app, Flask):
        raise RuntimeError(f"The app locator {locator!r} did not give a Flask app.")
    return app


# --- the worker's entry point: flask_execute.celery --------------------------------
_lock = threading.Lock()
_celery_app: t.Any = None


def celery_app() -> t.Any:
    """The Celery app of the Flask app this process serves (``flask_execute.celery``)."""
    global _celery_app
    with _lock:
        if _celery_app is None:
            boot_path = os.environ.pop(BOOT_ENV, None)
            boot_key = os.environ.pop(BOOT_KEY_ENV, None)  # nothing we start gets it
            # the user's code must not send tasks while we import it (importguard.py)
            with refuse_calls_while_importing():
                if boot_path:
                    # verified before it is unpickled; raising makes the worker exit
                    app = build(bootfile.read(boot_path, boot_key))
                else:
                    from flask.cli import ScriptInfo

                    app = ScriptInfo(app_import_path=os.environ.get("FLASK_APP")).load_app()
            extension = app.extensions.get("celery")
            if not isinstance(extension, Celery):
                raise RuntimeError(
                    f"The Flask app {app.import_name!r} does not use flask-execute: call"
                    " Celery(app) or celery.init_app(app) where the app is built."
                )
            if os.environ.get(CHILD_ENV):
                _install_child_hooks()
            if "flower" in sys.argv[1:]:  # `celery -A flask_execute.celery flower`
                stop_on_sigterm()
            _celery_app = extension.runtime(app).controller
        return _celery_app


def _install_child_hooks() -> None:
    """Report readiness through the ready pipe; shut down when the parent dies."""
    from celery import signals

    ready_fd = os.environ.pop(READY_FD_ENV, None)
    lifeline_fd = os.environ.pop(LIFELINE_FD_ENV, None)

    if ready_fd is not None:

        def _ready(**_: t.Any) -> None:
            try:
                os.write(int(ready_fd), b"R")
                os.close(int(ready_fd))
            except OSError:  # pragma: no cover - parent gone, or already reported
                pass

        signals.worker_ready.connect(_ready, weak=False)
        signals.beat_init.connect(_ready, weak=False)

    if lifeline_fd is not None:

        def watch() -> None:
            fd = int(lifeline_fd)
            while True:
                try:
                    if not os.read(fd, 1):
                        break
                except InterruptedError:  # pragma: no cover
                    continue
                except OSError:
                    break
            log.warning(
                "flask-execute: the process that started this worker is gone; shutting down"
            )
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(_PARENT_GRACE)
            os.kill(os.getpid(), signal.SIGQUIT)
            time.sleep(5)
            os._exit(1)

        # started now, in the main process (a prefork pool forks later, without it)
        threading.Thread(target=watch, name="flask-execute-lifeline", daemon=True).start()

"""flask-execute: Celery for Flask, effortless.

``celery = Celery(app)``; ``celery.submit(any_function, *args)`` returns a real
``concurrent.futures.Future``.
"""

from __future__ import annotations

import typing as t

from .context import current_task
from .errors import BrokerUnavailable
from .errors import ConfigurationError
from .errors import ExecuteError
from .errors import RemoteError
from .errors import RemoteTraceback
from .errors import ResultExpired
from .errors import SerializationError
from .errors import ServiceStartError
from .errors import SignatureError
from .errors import TaskTimeoutError
from .errors import UnsafePathError
from .executor import CeleryExecutor
from .futures import Future
from .plugin import Celery
from .plugin import RESERVED_OPTIONS
from .pool import FuturePool
from .progress import progress
from .stream import stream

__all__ = [
    "RESERVED_OPTIONS",
    "BrokerUnavailable",
    "Celery",
    "CeleryExecutor",
    "ConfigurationError",
    "ExecuteError",
    "Future",
    "FuturePool",
    "RemoteError",
    "RemoteTraceback",
    "ResultExpired",
    "SerializationError",
    "ServiceStartError",
    "SignatureError",
    "TaskTimeoutError",
    "UnsafePathError",
    "current_task",
    "progress",
    "stream",
]


def __getattr__(name: str) -> t.Any:
    # `celery -A flask_execute.celery worker`: the Celery app of the Flask app found
    # through FLASK_APP (factories included) or a boot file written by the web process.
    if name == "celery":
        from .boot import celery_app

        return celery_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

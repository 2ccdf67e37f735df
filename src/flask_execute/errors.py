"""The few errors callers of flask-execute catch.

Every error raised on purpose by the extension derives from :class:`ExecuteError`.
Where the standard library already has a meaning for the condition, the error also
derives from that builtin (``ValueError`` for configuration, ``TypeError`` for
serialization, ``ConnectionError`` for the broker, ``TimeoutError`` for waits), so
``except TimeoutError`` keeps working for code written against ``concurrent.futures``.
"""

from __future__ import annotations

import concurrent.futures

__all__ = [
    "BrokerUnavailable",
    "ConfigurationError",
    "DependencyError",
    "ExecuteError",
    "RemoteError",
    "RemoteTraceback",
    "ResultExpired",
    "SerializationError",
    "ServiceStartError",
    "SignatureError",
    "TaskTimeoutError",
    "UnsafePathError",
]


class ExecuteError(Exception):
    """Base class of every error flask-execute raises on purpose."""


class ConfigurationError(ExecuteError, ValueError):
    """A configuration key has a wrong value. Raised by ``init_app``; the message
    names the key, the accepted forms and the value found."""


class SerializationError(ExecuteError, TypeError):
    """A function, an argument or a return value cannot travel to or from a worker.

    Raised by ``submit``/``map``/``apply`` in the caller (naming the argument) and,
    for return values, raised by ``Future.result()``.
    """


class BrokerUnavailable(ExecuteError, ConnectionError):
    """The Celery broker could not be reached within the configured bound."""


class ServiceStartError(ExecuteError, RuntimeError):
    """A local worker, beat, Flower or the embedded Redis failed to start.

    The message quotes the tail of the service's log file.
    """


class UnsafePathError(ExecuteError, PermissionError):
    """A directory or file where flask-execute keeps per-user secrets (its runtime
    directory, the development signing key, a lock or boot file) is not private: it
    is a symbolic link, belongs to another user, or others can write to it. Nothing
    was read from it; the message names the path, what is wrong and the fix."""


class SignatureError(ExecuteError):
    """A message or result failed verification and was not deserialized.

    ``reason`` is a short machine-readable word (``bad_mac``, ``expired``,
    ``malformed``, ``unknown_key``, ``binding_mismatch``, ``python_mismatch``,
    ``too_large``, ``encryption_mismatch``: ``CELERY_ENCRYPT`` differs between the
    process that sealed the envelope and this one). ``header`` is the envelope's header
    when the signature itself checked out (``python_mismatch``,
    ``encryption_mismatch``: a genuine envelope this process cannot open), else None.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        self.header: dict[str, object] | None = None
        super().__init__(message or f"Signed envelope rejected: {reason}.")


class TaskTimeoutError(ExecuteError, concurrent.futures.TimeoutError):
    """``Future.result(timeout)`` ran out of time; the message says what was seen
    (task state, target queue, workers that answered)."""


class ResultExpired(ExecuteError, LookupError):
    """``celery.get(task_id)`` for a task that ran, whose result the backend no longer
    has (``CELERY_RESULT_EXPIRES``, one day by default)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(
            f"Task {task_id} ran, but its result has expired from the result backend"
            " (CELERY_RESULT_EXPIRES)."
        )


class RemoteError(ExecuteError):
    """A task failed with an exception that could not be rebuilt in the caller.

    ``type_name`` is the ``module.qualname`` of the original exception and
    ``remote_traceback`` the traceback text from the worker.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}")

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.remote_message, self.remote_traceback))


class DependencyError(ExecuteError):
    """A call was not run because a future given as one of its arguments failed or was
    cancelled (``submit(g, f)`` where ``f`` did not succeed).

    ``task_id`` is the dependency's task id; ``__cause__`` is the dependency's own
    exception (a :class:`concurrent.futures.CancelledError` when it was cancelled).
    """

    def __init__(self, message: str, task_id: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.__cause__ = cause

    def __reduce__(
        self,
    ) -> tuple[type[DependencyError], tuple[str, str, BaseException | None]]:
        # the cause travels with the error (pickle keeps no __cause__ by itself)
        return (type(self), (str(self.args[0]), self.task_id, self.__cause__))


class RemoteTraceback(Exception):
    """The worker-side traceback, attached as ``__cause__`` of a task's exception
    (as :class:`concurrent.futures.ProcessPoolExecutor` does)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'

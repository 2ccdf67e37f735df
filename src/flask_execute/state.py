"""The per-app state of the extension (``app.extensions["celery"]``): the Celery app,
the codec, the dispatch tasks, the result watcher and the local services of one Flask
app, and how outcomes, claims and cancellations work for it.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import sys
import threading
import time
import typing as t
import weakref
from collections.abc import Mapping

import celery as celery_module
import cloudpickle
from celery import Task
from flask import Flask
from kombu.exceptions import OperationalError

from . import config as config_module
from . import redaction
from . import rundir
from ._boot import locate
from .admission import install as install_admission
from .claims import Claims
from .context import _eager_listeners
from .context import make_task_class
from .control import Inspect
from .dispatch import DISPATCH
from .dispatch import dispatch_base
from .dispatch import dispatch_entry
from .dispatch import DISPATCH_LATE
from .dispatch import SafeRequest
from .errors import BrokerUnavailable
from .errors import ConfigurationError
from .errors import RemoteTraceback
from .futures import _Chunk
from .futures import Future
from .futures import READY
from .keys import signing_keys
from .local import CHILD_ENV
from .local import EmbeddedRedis
from .local import LocalServices
from .local import redis_answers
from .message_fields import lineage
from .outcomes import contained
from .outcomes import Outcome
from .outcomes import Outcomes

if t.TYPE_CHECKING:
    from .plugin import Celery
from .envelopes import Codec
from .watcher import make_watcher
from .watcher import Watcher

if t.TYPE_CHECKING:
    from .plugin import Celery

__all__ = ["RemoteTraceback"]

log = logging.getLogger(__name__)


class _State:
    """Everything flask-execute keeps for one app (``app.extensions["celery"]``)."""

    def __init__(self, ext: Celery, app: Flask) -> None:
        self.extension = ext
        self.app = app
        self.settings = config_module.load(app.config)
        redaction.install()  # Celery logs no envelope in this process (worker or not)
        celery_settings = config_module.celery_settings(app.config)
        self.is_child = bool(os.environ.get(CHILD_ENV))
        self.eager = self.settings.always_eager
        self.embedded_broker: EmbeddedRedis | None = None
        self.broker_url, self.backend_url = self._urls()
        self.codec = Codec(
            *signing_keys(app, self.settings, lambda: self.runtime_dir),
            max_size=self.settings.max_message_size,
            encrypt=self.settings.encrypt,
        )
        self.outcomes = Outcomes(self.codec)
        self.locator = locate(app)
        self.pickling: dict[str, t.Any] = {
            "models": "requery" if self.settings.sanitize_arguments else "refuse",
            "by_value": self.settings.pickle_by_value,
        }
        self.task_class = make_task_class(app, ext.base_task)
        self.base_queue: str | None = getattr(ext.base_task, "queue", None)
        self.controller = celery_module.Celery(
            app.import_name, task_cls=self.task_class, set_as_current=False
        )
        timeout = self.settings.broker_timeout
        retry = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
        conf: dict[str, object] = {
            "broker_url": self.broker_url,
            "result_backend": self.backend_url,
            "task_track_started": True,
            "broker_connection_retry_on_startup": True,
            "broker_connection_timeout": timeout,
            "broker_connection_max_retries": 2,
            # kombu scans for unacknowledged messages to redeliver only every 100 s by
            # default; every 10 s makes at-least-once recovery prompt
            "broker_transport_options": {
                "socket_connect_timeout": timeout,
                "unacked_restore_interval": 10,
                "unacked_restore_throttle": 1,
                **retry,
            },
            "task_publish_retry_policy": retry,
            "redis_socket_connect_timeout": timeout,
            # a result backend blip while a worker stores a result: retry, bounded
            "result_backend_always_retry": True,
            "result_backend_max_retries": 10,
            "worker_hijack_root_logger": True,
        }
        user_transport = celery_settings.pop("broker_transport_options", None) or {}
        conf["broker_transport_options"] = {
            **t.cast(dict[str, t.Any], conf["broker_transport_options"]),
            **t.cast(dict[str, t.Any], user_transport),
        }
        conf.update(celery_settings)
        # eager mode is ours (CELERY_ALWAYS_EAGER); registered tasks' delay() follows it
        conf["task_always_eager"] = self.eager
        # the URLs decided above win over a CELERY={"broker_url": ...} the user also set
        conf.update(broker_url=self.broker_url, result_backend=self.backend_url)
        self.controller.conf.update(conf)
        install_admission(self.controller, self.settings.max_message_size)
        # our watcher follows our tasks: no per-task subscription by Celery's backend
        quiet = "flask_execute.backend:QuietRedisBackend"
        self.controller.loader.override_backends = {"redis": quiet, "rediss": quiet}
        self.controller.flask_app = app
        self.controller.flask_execute = self
        self.dispatch = self._register_dispatch(DISPATCH, acks_late=False)
        self.dispatch_late = self._register_dispatch(
            DISPATCH_LATE, acks_late=True, reject_on_worker_lost=True
        )
        self.visibility_timeout = _visibility_timeout(self.controller, self.broker_url)
        _check_time_limit(self.controller, self.visibility_timeout)
        self._watcher: Watcher | None = None
        self._watcher_lock = threading.Lock()
        self.services = LocalServices(self)
        self.claims = Claims(self)
        self._started = False
        self._start_lock = threading.Lock()
        # eager mode has no result store: get() finds futures still referenced here
        self.eager_futures: weakref.WeakValueDictionary[str, Future[t.Any]] = (
            weakref.WeakValueDictionary()
        )

    def __repr__(self) -> str:
        broker = _safe_url(self.broker_url)  # never the password
        return f"<flask-execute state of {self.app.import_name!r} broker={broker!r}>"

    @functools.cached_property
    def runtime_dir(self) -> str:
        """This app's private directory (:mod:`.rundir`), created and verified on first
        use: only the development key and the local services need one, so a
        production web process never touches the disk for it."""
        return rundir.runtime_dir(f"{self.app.instance_path}|{self.app.import_name}")

    def _register_dispatch(self, name: str, **options: t.Any) -> Task:
        """Register one dispatch task (the default one, or the at-least-once one)."""
        state = self

        # track_started off: execute() reports STARTED itself, after the envelope checked
        # out, so nothing is ever written under an unauthenticated task id.
        @self.controller.task(  # type: ignore[untyped-decorator]
            name=name,
            bind=True,
            shared=False,
            typing=False,
            track_started=False,
            base=dispatch_base(self.task_class),
            Request=SafeRequest,
            **options,
        )
        def dispatch(task: Task, *args: t.Any, **kwargs: t.Any) -> t.Any:
            return dispatch_entry(task, state, args, kwargs)

        return t.cast(Task, dispatch)

    # --- configuration -------------------------------------------------------------
    def _urls(self) -> tuple[str, str]:
        s = self.settings
        broker = s.broker_url
        if broker is None:
            local = s.start_local_workers and not self.eager and s.embedded_broker
            if local and not self.is_child and not redis_answers():
                self.embedded_broker = EmbeddedRedis(
                    os.path.join(self.runtime_dir, "redis"),
                    unix_socket=os.path.join(self.runtime_dir, "redis.sock"),
                    log_path=os.path.join(s.log_dir or os.getcwd(), "redis.log"),
                )
                broker = self.embedded_broker.url
            else:
                broker = config_module.DEFAULT_BROKER_URL
        backend = s.result_backend
        if backend is None:
            backend = broker if broker.startswith(("redis", "rediss")) else "rpc://"
        return broker, backend

    @property
    def watcher(self) -> Watcher:
        if self._watcher is None:
            with self._watcher_lock:
                if self._watcher is None:
                    self._watcher = make_watcher(
                        self.controller.backend, self.settings.broker_timeout
                    )
        return self._watcher

    def boot_content(self) -> dict[str, object]:
        """What a local worker needs to rebuild this app (written to private files)."""
        snapshot: dict[str, object] = {}
        for key, value in self.app.config.items():
            try:
                cloudpickle.dumps(value)
            except Exception:
                log.debug("flask-execute: config key %s is not picklable; not pinned", key)
                continue
            snapshot[key] = value
        snapshot["CELERY_BROKER_URL"] = self.broker_url
        snapshot["CELERY_RESULT_BACKEND"] = self.backend_url
        snapshot["CELERY_SIGNING_KEY"] = self.codec_keys[0]
        snapshot["CELERY_SIGNING_KEY_FALLBACKS"] = self.codec_keys[1]
        return {
            "locator": self.locator,
            "config": snapshot,
            "sys_path": [p or os.getcwd() for p in sys.path],
            "import_name": self.app.import_name,
            "root_path": self.app.root_path,
            "instance_path": self.app.instance_path,
            "base_task": self.extension.base_task,
        }

    @property
    def codec_keys(self) -> tuple[bytes, list[bytes]]:
        return signing_keys(self.app, self.settings, lambda: self.runtime_dir)

    # --- local services -------------------------------------------------------------
    def worker_options(self, name: str, local: bool = True) -> dict[str, object]:
        """The `celery worker` options of one configured worker, with our defaults."""
        options = dict(self.settings.workers[name])
        if local:
            # mingle only syncs revokes between workers at boot (we keep cancels in the
            # result backend); skipping it saves a second of start-up
            options = {"without_mingle": True, **options}
        if "queues" not in options and self.base_queue:
            # a base_task with `queue = ...` routes every task there: consume it too
            default = self.controller.conf.task_default_queue
            options["queues"] = list(dict.fromkeys([default, self.base_queue]))
        return options

    def ensure_started(self) -> None:
        """Start local services on first use, once, unless disabled."""
        if self._started:
            return
        with self._start_lock:
            if self._started:
                return
            if self.settings.start_local_workers and not self.eager and not self.is_child:
                self.services.start()
            self._started = True

    def stop(self, timeout: float = 10.0) -> None:
        with self._start_lock:
            self.services.stop(timeout)
            self._started = False

    # --- publishing ------------------------------------------------------------------
    def seal_call(
        self,
        task_id: str,
        payload: bytes,
        by_value: bool,
        label: str,
        options: Mapping[str, t.Any],
        kind: str = "call",
        task: Task | None = None,
    ) -> str:
        root, parent = lineage(task_id, self.controller.current_worker_task)
        extra: dict[str, object] = {
            "fn": label,
            "task": (task or self.dispatch).name,
            "root": root,
            "parent": parent,
        }
        if kind != "call":
            extra["k"] = kind
        return self.codec.seal(
            "call",
            task_id,
            payload,
            by_value=by_value,
            not_before=_not_before(options),
            extra=extra,
        )

    def publish(
        self,
        items: list[tuple[str, str, Future[t.Any] | _Chunk]],
        label: str,
        options: dict[str, t.Any],
        task: Task | None = None,
    ) -> None:
        """Publish envelopes (one producer connection for all of them)."""
        task = task or self.dispatch
        watcher = self.watcher_or_error()
        for task_id, _, handler in items:
            watcher.watch(task_id, handler)
        try:
            parent = self.controller.current_worker_task
            with self.controller.producer_or_acquire() as producer:
                for task_id, envelope, _ in items:
                    root_id, parent_id = lineage(task_id, parent)  # as sealed
                    task.apply_async(
                        (envelope,),
                        task_id=task_id,
                        root_id=root_id,
                        parent_id=parent_id,
                        shadow=label,
                        argsrepr=f"<{label}>",
                        kwargsrepr="{}",
                        producer=producer,
                        **options,
                    )
        except (OperationalError, OSError) as exc:
            for task_id, _, _ in items:
                watcher.forget(task_id)
            raise BrokerUnavailable(
                f"Cannot reach the Celery broker at {_safe_url(self.broker_url)}: {exc}."
                " Is it running? (CELERY_BROKER_URL)"
            ) from exc

    def watcher_or_error(self) -> Watcher:
        try:
            watcher = self.watcher
            watcher._ensure_running()
            return watcher
        except (ConnectionError, OSError) as exc:
            raise BrokerUnavailable(
                f"Cannot reach the result backend at {_safe_url(self.backend_url)}: {exc}."
                " Is it running? (CELERY_RESULT_BACKEND)"
            ) from exc

    def dispatch_for(self, options: dict[str, t.Any]) -> Task:
        """Pick the dispatch task for these options (``acks_late`` is popped) and refuse
        what would run an at-least-once task twice by design.

        :raises ConfigurationError: a countdown, ETA or time limit reaches the Redis
            visibility timeout.
        """
        late = options.pop("acks_late", None)
        if late is None:
            late = bool(self.controller.conf.task_acks_late)
        if not late:
            return self.dispatch
        limit = self.visibility_timeout
        if limit is not None:
            wait = _not_before(options)
            ahead = (wait - time.time()) if wait else 0.0
            run = options.get("time_limit") or self.controller.conf.task_time_limit or 0
            if ahead + run >= limit:
                raise ConfigurationError(
                    f"An at-least-once task starting in {ahead:.0f} s with a time limit of"
                    f" {run} s would outlive the Redis visibility timeout ({limit} s): Redis"
                    " would deliver it again while it waits or runs, and it would run twice."
                    " Raise CELERY_BROKER_TRANSPORT_OPTIONS['visibility_timeout'] or shorten"
                    " the countdown/ETA/time limit."
                )
        return self.dispatch_late

    def run_eager(
        self,
        handler: Future[t.Any] | _Chunk,
        task_id: str,
        envelope: str,
        task: Task | None = None,
    ) -> None:
        members = handler.members if isinstance(handler, _Chunk) else [handler]
        if isinstance(handler, Future):
            self.eager_futures[task_id] = handler

        def listener(state: str, meta: object) -> None:
            for member in members:
                member._on_state(state, meta)

        token = _eager_listeners.set(listener)
        try:
            for member in members:
                member._on_state("STARTED")
            result = (task or self.dispatch).apply((envelope,), task_id=task_id, throw=False)
        finally:
            _eager_listeners.reset(token)
        if result.state == "SUCCESS":
            meta = {"status": "SUCCESS", "result": redaction.unwrap(result.result)}
        else:
            exc = result.result
            args = list(getattr(exc, "args", ()))
            meta = {
                "status": "FAILURE",
                "result": {
                    "exc_message": args,
                    "exc_type": type(exc).__qualname__,
                    "exc_module": type(exc).__module__,
                },
                "traceback": result.traceback,
            }
            if not getattr(exc, "flask_execute_carrier", False):
                failure = contained(exc, result.traceback or "")
                self._finish_all(members, "FAILURE", exc=_with_traceback(failure, result.traceback))
                return
        handler._on_meta(meta)

    # --- outcomes (called by the watcher) ---------------------------------------------
    def apply_meta(self, future: Future[t.Any], meta: dict[str, t.Any]) -> None:
        outcome = self.outcomes.read(future.id, meta)
        if outcome.status not in READY:
            future._on_state(outcome.status, outcome.value)
        else:
            future._finish(outcome.status, outcome.value, exc=outcome.exc)

    def apply_chunk_meta(self, chunk: _Chunk, meta: dict[str, t.Any]) -> None:
        members = chunk.members
        outcome = self.outcomes.read(chunk.task_id, meta, calls=len(members))
        if outcome.status not in READY:
            for member in members:
                member._on_state(outcome.status, outcome.value)
        elif outcome.status == "SUCCESS":
            calls = t.cast(list[Outcome], outcome.value)
            for member, call in zip(members, calls, strict=True):
                member._finish(call.status, call.value, exc=call.exc)
        else:
            self._finish_all(members, outcome.status, exc=outcome.exc)

    @staticmethod
    def _finish_all(
        members: list[Future[t.Any]], state: str, exc: BaseException | None = None
    ) -> None:
        for member in members:
            member._finish(state, exc=exc)

    def open_result(self, task_id: str, envelope: object) -> t.Any:
        """Verify and unpickle a result envelope.

        :raises SignatureError: the result was not sealed by a worker holding our key
            for this task id (nothing was unpickled).
        """
        return self.outcomes.value(task_id, envelope)

    # --- cancellation ------------------------------------------------------------------
    def cancel_task(self, future: Future[t.Any], terminate: bool) -> bool:
        """Caller side of ``Future.cancel``: True when the task will never run (or, with
        ``terminate``, has been stopped)."""
        if self.eager:
            return False
        if not self.claims.cancel(future.id) and not terminate:
            return False  # a worker claimed it first: it started
        self.controller.control.revoke(future.id, terminate=terminate, signal="SIGTERM")
        return True

    def hold(self, future: Future[t.Any]) -> None:
        if future._chunk is not None:
            self.watcher.hold(future._chunk.task_id, future._chunk)
        elif not self.eager:
            self.watcher.hold(future.id, future)

    def describe_wait(self, future: Future[t.Any]) -> str:
        """Why a future is still pending, for its timeout error: which workers answer,
        and whether any consumes its queue (asks them, for at most 0.3 s)."""
        if future.state != "PENDING":
            return ""
        if future.name is None:  # from celery.get(): we never saw it sent
            return (
                " The result backend knows nothing of this task id: it is still queued,"
                " was never submitted, or its result expired before any worker ran it."
            )
        queue = future._queue or self.base_queue or self.controller.conf.task_default_queue
        try:
            replies = Inspect(self.controller).active_queues(timeout=0.3)
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
        if not self.settings.start_local_workers:
            hint = (
                " Local workers are off (CELERY_START_LOCAL_WORKERS=False): is a worker"
                f" running for this app on broker {_safe_url(self.broker_url)}?"
            )
        return f" No worker consumes queue {queue!r} (workers seen: {seen or 'none'}).{hint}"

    # --- operating ---------------------------------------------------------------------
    def ping(self, timeout: float = 1.0, limit: int | None = None) -> dict[str, str]:
        replies = self.controller.control.broadcast(
            "ping", reply=True, timeout=timeout, limit=limit
        )
        out: dict[str, str] = {}
        for reply in replies or ():
            for name, answer in reply.items():
                ok = isinstance(answer, Mapping) and answer.get("ok") == "pong"
                out[name] = "OK" if ok else str(answer)
        return out


def _visibility_timeout(controller: t.Any, broker_url: str) -> float | None:
    """Redis redelivers a message not acknowledged within this many seconds."""
    if not broker_url.startswith(("redis", "rediss")):
        return None
    options = controller.conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", 3600))


def _check_time_limit(controller: t.Any, visibility: float | None) -> None:
    conf = controller.conf
    limit = conf.task_time_limit
    if visibility is not None and conf.task_acks_late and limit and limit >= visibility:
        raise ConfigurationError(
            f"'CELERY_TASK_TIME_LIMIT' ({limit} s) must be shorter than the Redis visibility"
            f" timeout ({visibility:g} s, CELERY_BROKER_TRANSPORT_OPTIONS['visibility_timeout'])"
            " when tasks are acknowledged late: a task still running when it expires is"
            " delivered again and runs twice."
        )


def _with_traceback(exc: BaseException, tb_text: str | None) -> BaseException:
    if tb_text and exc.__cause__ is None:
        exc.__cause__ = RemoteTraceback(tb_text)
    return exc


def _not_before(options: Mapping[str, t.Any]) -> float | None:
    eta = options.get("eta")
    if isinstance(eta, datetime.datetime):
        return eta.timestamp()
    countdown = options.get("countdown")
    if isinstance(countdown, (int, float)):
        return datetime.datetime.now().timestamp() + countdown
    return None


def _safe_url(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))

"""The runtime of one Flask app: wires its settings, codec, Celery app, claims, client,
result watcher and local services together, once, at ``init_app``.

Nothing here sends, receives or decides anything itself: :mod:`~flask_execute.client`
sends calls, :mod:`~flask_execute.dispatch` runs them on workers,
:mod:`~flask_execute.watcher` and :mod:`~flask_execute.outcomes` bring outcomes back to
the futures, :mod:`~flask_execute.local` runs the local services. Each part gets the
narrow things it needs from here.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping

import celery as celery_module
import cloudpickle
from celery import Task
from celery.backends.redis import RedisBackend
from flask import Flask

from . import celery_conf
from . import config as config_module
from . import consumption
from . import devserver
from . import redaction
from . import rundir
from .capacity import Capacity
from .claims import Claims
from .client import at_interpreter_exit
from .client import Client
from .envelopes import Codec
from .keys import signing_keys
from .leases import give_back
from .leases import LeasedQoS
from .leases import ORPHAN_AFTER
from .local import CHILD_ENV
from .local import EmbeddedRedis
from .local import LocalServices
from .local import redis_answers
from .locator import locate
from .outage import CONNECTION_ERRORS
from .outage import Endpoints
from .outage import reason
from .outage import safe_url
from .outbox import drain_at_start
from .outbox import Outbox
from .outcomes import Outcomes
from .redis_watcher import RedisWatcher
from .running import Worker
from .watcher import PollingWatcher
from .watcher import Watcher

__all__ = ["Runtime"]

log = logging.getLogger(__name__)


class Runtime:
    """Everything flask-execute keeps for one app."""

    def __init__(self, app: Flask, base_task: type[Task] | None) -> None:
        self.app = app
        self.base_task = base_task
        self.settings = config_module.load(app.config)
        redaction.install()  # Celery logs no envelope in this process (worker or not)
        translated = celery_conf.celery_settings(app.config)
        self.is_child = bool(os.environ.get(CHILD_ENV))
        self.embedded_broker: EmbeddedRedis | None = None
        self.broker_url, self.backend_url = self._urls()
        #: how errors name the broker and the backend (:mod:`.outage`)
        self.endpoints = Endpoints(
            self.broker_url, self.backend_url, self.settings.result_backend is not None
        )
        self.codec = Codec(
            *signing_keys(app, self.settings, lambda: self.runtime_dir),
            max_size=self.settings.max_message_size,
            encrypt=self.settings.encrypt,
        )
        self.outcomes = Outcomes(self.codec)
        self.locator = locate(app)
        self.celery_app = celery_conf.build(
            app,
            self.settings,
            translated,
            self.broker_url,
            self.backend_url,
            base_task,
            lambda: self.worker,
        )
        self.controller: celery_module.Celery = self.celery_app.controller
        # the result backend seals failures with this runtime's codec (backend.py)
        self.controller.flask_execute = self
        # a worker run without -Q consumes the queues this app routes to
        consumption.install()
        self.claims = Claims(
            self.controller, int(self.codec.max_age) + 60, self.settings.max_deliveries
        )
        dispatch_tasks = (self.celery_app.dispatch, self.celery_app.dispatch_late)
        outbox = Outbox(self.codec, self.controller, {task.name: task for task in dispatch_tasks})
        self.worker = Worker(self.codec, self.claims, self.settings.max_deliveries, outbox=outbox)
        drain_at_start(self.controller, lambda: self.worker.outbox)
        self._watcher: Watcher | None = None
        self._watcher_pid = 0
        self._watcher_lock = threading.Lock()
        self.client = Client(
            self.celery_app,
            self.codec,
            self.claims,
            self.outcomes,
            self.settings,
            lambda: self.watcher,
            self.ensure_started,
            self.endpoints,
            app.app_context,
            Capacity(lambda: self.controller.backend),
        )
        self.services = LocalServices(self)
        self._started = False
        self._exit_hook = False
        self._start_lock = threading.Lock()

    def __repr__(self) -> str:
        broker = safe_url(self.broker_url)  # never the password
        return f"<flask-execute state of {self.app.import_name!r} broker={broker!r}>"

    @property
    def eager(self) -> bool:
        """Whether calls run inline (``CELERY_ALWAYS_EAGER``, or the eager fixture)."""
        return self.client.eager

    @eager.setter
    def eager(self, value: bool) -> None:
        self.client.eager = value
        self.controller.conf.task_always_eager = value  # registered tasks' delay()

    @property
    def dispatch(self) -> Task:
        return self.celery_app.dispatch

    @property
    def dispatch_late(self) -> Task:
        return self.celery_app.dispatch_late

    @property
    def base_queue(self) -> str | None:
        return self.celery_app.base_queue

    @property
    def log_dir(self) -> str:
        """Where the local services log and beat keeps its schedule file:
        ``CELERY_LOG_DIR``, else the app's instance folder (never the project's)."""
        return self.settings.log_dir or self.app.instance_path

    @functools.cached_property
    def runtime_dir(self) -> str:
        """This app's private directory (:mod:`.rundir`), created and verified on first
        use: only the development key and the local services need one, so a
        production web process never touches the disk for it."""
        return rundir.runtime_dir(f"{self.app.instance_path}|{self.app.import_name}")

    # --- configuration -------------------------------------------------------------
    def _urls(self) -> tuple[str, str]:
        s = self.settings
        broker = s.broker_url
        if broker is None:
            local = s.start_local_workers and not s.always_eager and s.embedded_broker
            if local and not self.is_child and not redis_answers():
                self.embedded_broker = EmbeddedRedis(
                    os.path.join(self.runtime_dir, "redis"),
                    unix_socket=os.path.join(self.runtime_dir, "redis.sock"),
                    log_path=os.path.join(self.log_dir, "redis.log"),
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
        """The result watcher of this app in this process (created on first use; a
        forked child, such as a gunicorn worker of a preloaded app, gets its own, with
        its own reply channel)."""
        if self._watcher is None or self._watcher_pid != os.getpid():
            with self._watcher_lock:
                if self._watcher is None or self._watcher_pid != os.getpid():
                    backend = self.controller.backend
                    self._watcher = (
                        RedisWatcher(backend, self.outcomes.deliver, self.settings.broker_timeout)
                        if isinstance(backend, RedisBackend)
                        else PollingWatcher(backend, self.outcomes.deliver)
                    )
                    self._watcher_pid = os.getpid()
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
            "base_task": self.base_task,
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

    def start_in_dev_server(self) -> None:
        """In the serving process of ``flask run --debug``: start the local services
        as soon as the app is loaded when it has a schedule (beat runs it without
        waiting for a first ``submit``)."""
        s = self.settings
        wanted = s.start_local_workers and s.scheduler and not self.eager and not self.is_child
        if wanted and devserver.serving_with_reloader():
            devserver.start_schedules(self.app.import_name, self.has_schedule, self.ensure_started)

    def has_schedule(self) -> bool:
        """Does beat have anything to run for this app?"""
        return bool(self.controller.conf.beat_schedule)

    def ensure_started(self) -> None:
        """Start local services on first use, once, unless disabled."""
        if self._started:
            return
        with self._start_lock:
            if self._started:
                return
            if self.settings.start_local_workers and not self.eager and not self.is_child:
                self._start_services()
            self._started = True

    def start(self) -> None:
        """Start the local services now (``celery.start()``)."""
        if self.is_child or self.eager:
            return
        with self._start_lock:
            self._start_services()
            self._started = True

    def _start_services(self) -> None:
        if self.embedded_broker is None:
            self.check_broker()
        owner = self.services.owner
        self.services.start()
        if self.app.debug and self.services.owner and not owner:
            devserver.announce(self.services.children, self.services.flower_url)
        if self.services.owner and not self._exit_hook:
            self._exit_hook = True
            at_interpreter_exit(self._finish_calls)

    def check_broker(self) -> None:
        """Connect to the broker once, within ``CELERY_BROKER_TIMEOUT``.

        Local workers given a wrong broker URL would retry it until their start
        timeout ran out (a ``ServiceStartError`` with kombu's retries in the log);
        asked first, the caller gets what is wrong at once.

        :raises BrokerUnavailable: the broker does not answer.
        """
        timeout = self.settings.broker_timeout

        def reach() -> None:
            with self.controller.connection_for_write() as connection:
                connection.ensure_connection(
                    max_retries=1, interval_start=0, interval_step=0, timeout=timeout
                )

        self.endpoints.call("broker", reach, retry=False)

    def _finish_calls(self) -> None:
        """At interpreter exit, before the local workers stop: wait (at most
        ``CELERY_EXIT_WAIT`` seconds) for the calls this process submitted, as
        ``concurrent.futures`` waits for its pending futures; say loudly what is left."""
        if not self.services.owner or self._watcher is None or self._watcher_pid != os.getpid():
            return
        if devserver.serving_with_reloader():
            return  # a reload: queued calls wait in the broker for the next generation
        watcher = self._watcher
        left = watcher.in_flight()
        if not left:
            return
        bound = self.settings.exit_wait
        log.warning(
            "flask-execute: waiting up to %g s for %d unfinished call(s) before the local"
            " workers stop (CELERY_EXIT_WAIT)",
            bound,
            len(left),
        )
        deadline = time.monotonic() + bound
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = watcher.in_flight()
        if not left:
            return
        fate = (
            "lost with the embedded broker, which stops too"
            if self.embedded_broker is not None
            else "still queued in the broker: they run when a worker for this app starts"
        )
        log.error(
            "flask-execute: %d call(s) submitted here did not finish before exit, %s: %s",
            len(left),
            fate,
            ", ".join(sorted(left)[:20]) + (" ..." if len(left) > 20 else ""),
        )

    def stop(self, timeout: float = 10.0) -> None:
        with self._start_lock:
            self.services.stop(timeout)
            self._started = False

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

    def give_back(self, pid: int, name: str) -> int:
        """Give the messages held by the dead local worker ``name`` (process ``pid``)
        back to their queues at once (Redis; RabbitMQ does it by itself when the
        connection drops), and log it; return how many it held. With the broker
        unreachable, say so and return 0: they come back as orphans once its leases
        lapse (:data:`~flask_execute.leases.ORPHAN_AFTER`)."""
        try:
            with self.controller.connection_for_write() as connection:
                channel = connection.default_channel
                if not isinstance(channel.qos, LeasedQoS):
                    return 0
                count = give_back(channel, socket.gethostname(), pid)
        except CONNECTION_ERRORS as exc:
            log.warning(
                "flask-execute: could not give the messages held by the dead worker %s back"
                " (broker unreachable: %s); they come back within %g s of its return",
                name, reason(exc), ORPHAN_AFTER + 10,
            )  # fmt: skip
            return 0
        if count:
            log.warning(
                "flask-execute: gave %d message(s) held by the dead worker %s back to the broker",
                count, name,
            )  # fmt: skip
        return count

    def status(self, timeout: float = 1.0) -> dict[str, str]:
        """``{"name@host": "OK"}`` for every worker answering a broadcast ping; returns
        as soon as every expected local worker answered, else after ``timeout``.

        :raises BrokerUnavailable: the broker cannot be reached (a connection left
            stale by a broker restart is retried once first).
        """
        expected = set(self.services.expected_nodes()) if self.services.running else set()
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while True:
            # A worker that just started may miss one broadcast (its pidbox
            # subscription is asynchronous): ask again until all answered.
            left = deadline - time.monotonic()
            wait = max(min(left, 0.3) if expected else left, 0.01)
            ask = functools.partial(self.ping, wait, len(expected) or None)
            seen.update(self.endpoints.call("broker", ask))
            if not expected or expected <= set(seen) or time.monotonic() >= deadline:
                return seen

"""The ``concurrent.futures`` contract as a state machine, against real workers.

Hypothesis drives random sequences of: submitting a quick, a failing or a blocking
call; more handles on a task (``celery.get``); ``cancel``; ``add_done_callback``;
``result(timeout)``; releasing a blocking call; dropping the result watcher's
connection (it reconnects and catches up); and killing the worker process that runs a
call. After every step, and at the end of each run once everything is released, the
invariants of the standard library's futures hold:

- a future is ``PENDING`` → ``RUNNING`` → ``FINISHED`` (or cancelled before it ran);
  ``cancelled()`` implies ``done()``; a cancelled call never ran;
- every done-callback is called exactly once, after ``done()``;
- ``result(timeout)`` returns within its timeout (plus scheduling slack), with the
  call's value or exception, ``CancelledError`` only for a cancelled call and
  ``TimeoutError`` only while it is not done;
- every handle on one task ends with the same outcome.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle
from hypothesis.stateful import invariant
from hypothesis.stateful import rule
from hypothesis.stateful import RuleBasedStateMachine
from hypothesis.stateful import run_state_machine_as_test

from tests.apps import tasks

#: time a result(timeout) may overrun its timeout on a loaded 2-core machine
SLACK = 1.5
#: how long the end of a run waits for everything to settle
SETTLE = 20.0


class Call:
    """One submitted call, its handles and what it may end as."""

    def __init__(self, kind: str, directory: Path) -> None:
        self.kind = kind
        self.key = uuid.uuid4().hex[:8]
        self.mark = directory / f"{self.key}.ran"
        self.release = directory / f"{self.key}.release"
        self.handles: list[concurrent.futures.Future[object]] = []
        self.cancel_won = False  # some cancel() returned True
        self.killed = False

    def ran(self) -> bool:
        return self.mark.exists()

    def check_outcome(self, future: concurrent.futures.Future[object]) -> None:
        """The outcome of a done handle is one this call may end with."""
        assert future.done()
        if future.cancelled():
            assert not self.ran(), "a cancelled call ran"
            return
        assert not self.cancel_won, "cancel() said True but the call did not end cancelled"
        exc = future.exception(timeout=0)
        if self.kind == "fail":
            assert isinstance(exc, ValueError) and str(exc) == f"boom-{self.key}", repr(exc)
        elif exc is not None:
            assert self.killed, f"{self.kind} call failed: {exc!r}"
        elif self.kind == "quick":
            assert future.result(timeout=0) == str(self.mark)
        else:
            assert future.result(timeout=0) == "released"

    def outcome(self, future: concurrent.futures.Future[object]) -> tuple[str, object]:
        if future.cancelled():
            return ("cancelled", None)
        exc = future.exception(timeout=0)
        if exc is not None:
            return ("error", type(exc).__name__)
        return ("value", future.result(timeout=0))


class Futures(RuleBasedStateMachine):
    celery: object = None
    app: object = None
    directory: Path = Path()

    calls = Bundle("calls")

    def __init__(self) -> None:
        super().__init__()
        self.all: list[Call] = []
        self.callbacks: dict[int, list[object]] = {}  # id(handle) -> callback calls
        self.registered: dict[int, int] = {}  # id(handle) -> callbacks added

    # --- actions ---------------------------------------------------------------------
    @rule(target=calls, kind=st.sampled_from(["quick", "fail", "block"]))
    def submit(self, kind: str) -> Call:
        call = Call(kind, self.directory)
        celery = self.celery
        if kind == "quick":
            future = celery.submit(tasks.touch, str(call.mark))  # type: ignore[attr-defined]
        elif kind == "fail":
            future = celery.submit(tasks.fail_after_touch, str(call.mark), f"boom-{call.key}")  # type: ignore[attr-defined]
        else:
            future = celery.submit(tasks.mark_and_wait, str(call.mark), str(call.release))  # type: ignore[attr-defined]
        call.handles.append(future)
        self.all.append(call)
        return call

    @rule(call=calls)
    def get(self, call: Call) -> None:
        call.handles.append(self.celery.get(call.handles[0].id))  # type: ignore[attr-defined]

    @rule(call=calls, which=st.integers(0, 5))
    def cancel(self, call: Call, which: int) -> None:
        handle = call.handles[which % len(call.handles)]
        was_done = handle.done()
        won = handle.cancel()
        if won:
            assert not was_done or handle.cancelled()
            assert handle.cancelled() and handle.done()
            call.cancel_won = True
        else:
            assert not handle.cancelled() or was_done

    @rule(call=calls, which=st.integers(0, 5))
    def add_done_callback(self, call: Call, which: int) -> None:
        handle = call.handles[which % len(call.handles)]
        seen = self.callbacks.setdefault(id(handle), [])

        def callback(f: concurrent.futures.Future[object]) -> None:
            assert f is handle and f.done()
            seen.append(f)

        self.registered[id(handle)] = self.registered.get(id(handle), 0) + 1
        handle.add_done_callback(callback)

    @rule(call=calls, which=st.integers(0, 5), timeout=st.sampled_from([0, 0.05, 0.3]))
    def result(self, call: Call, which: int, timeout: float) -> None:
        handle = call.handles[which % len(call.handles)]
        start = time.monotonic()
        try:
            handle.result(timeout=timeout)
        except concurrent.futures.CancelledError:
            assert handle.cancelled()
        except TimeoutError:
            assert not handle.done() or time.monotonic() - start >= timeout
        except Exception:  # the call's own exception: checked below
            pass
        assert time.monotonic() - start <= timeout + SLACK, "result() overran its timeout"
        if handle.done():
            call.check_outcome(handle)

    @rule(call=calls)
    def release(self, call: Call) -> None:
        call.release.touch()

    @rule()
    def drop_watcher_connection(self) -> None:
        """Close the result watcher's sockets: it reconnects and fetches what it missed."""
        backend = self.app.extensions["celery"].runtime(self.app).controller.backend  # type: ignore[attr-defined]
        backend.client.connection_pool.disconnect()

    @rule(call=calls)
    def kill_its_worker_process(self, call: Call) -> None:
        """SIGKILL the pool process running a blocking call (Celery replaces it and
        fails the call with WorkerLostError)."""
        if call.kind != "block" or call.release.exists() or not call.ran():
            return
        if any(h.done() for h in call.handles):
            return
        pid = int(call.mark.read_text().split()[0])
        call.killed = True
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # --- invariants ------------------------------------------------------------------
    @invariant()
    def states_are_consistent(self) -> None:
        for call in self.all:
            for handle in call.handles:
                if handle.cancelled():
                    assert handle.done() and not handle.running()
                if handle.done():
                    assert not handle.running()
                calls = len(self.callbacks.get(id(handle), []))
                assert calls <= self.registered.get(id(handle), 0)

    def teardown(self) -> None:
        for call in self.all:
            call.release.touch()
        deadline = time.monotonic() + SETTLE
        for call in self.all:
            for handle in call.handles:
                remaining = max(0.1, deadline - time.monotonic())
                done, _ = concurrent.futures.wait([handle], timeout=remaining)
                assert done, f"{call.kind} call {handle!r} not done after {SETTLE} s"
                call.check_outcome(handle)
            outcomes = {call.outcome(h) for h in call.handles}
            assert len(outcomes) == 1, f"handles of one {call.kind} call disagree: {outcomes}"
        registered = self.registered
        for call in self.all:
            for handle in call.handles:
                expected = registered.get(id(handle), 0)
                seen = self.callbacks.get(id(handle), [])
                while len(seen) < expected and time.monotonic() < deadline + 2:
                    time.sleep(0.01)
                assert len(seen) == expected, "a done-callback was not called exactly once"
        time.sleep(0.05)  # a second call of a callback would show now
        for call in self.all:
            for handle in call.handles:
                assert len(self.callbacks.get(id(handle), [])) == registered.get(id(handle), 0)


@pytest.mark.timeout(600)
def test_futures_keep_the_standard_contract(direct_app: object, tmp_path: Path) -> None:
    from tests.apps import direct

    Futures.celery, Futures.app, Futures.directory = direct.celery, direct_app, tmp_path
    with direct_app.app_context():  # type: ignore[attr-defined]
        run_state_machine_as_test(
            Futures,
            settings=settings(
                max_examples=int(os.environ.get("FUTURES_MACHINE_EXAMPLES", "30")),
                stateful_step_count=15,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=False,
            ),
        )

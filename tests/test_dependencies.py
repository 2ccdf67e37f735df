"""Futures as arguments: ``submit(g, f)`` runs ``g`` with ``f``'s result once ``f``
succeeded, started by the workers, against real workers (direct and factory setup)."""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from flask import Flask

from flask_execute import Celery
from flask_execute import DependencyError
from flask_execute import SignatureError
from flask_execute.claims import claim_key
from flask_execute.dependencies import dependents_key
from flask_execute.dependencies import frame
from flask_execute.dependencies import waiting_key
from flask_execute.envelopes import Codec
from flask_execute.outbox import RELEASE
from tests.apps import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runtime(app, celery):
    return celery.runtime(app)


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_chain_returns_at_once_and_runs_on_the_workers(setup, tmp_path):
    app, celery = setup
    release = str(tmp_path / "release")
    first = celery.submit(tasks.wait_for_file, release)
    started = time.monotonic()
    second = celery.submit(tasks.add, first, "!")
    third = celery.submit(tasks.add, second, "?")
    assert time.monotonic() - started < 1.0
    time.sleep(0.3)
    assert not second.done() and second.state == "PENDING" and third.state == "PENDING"
    open(release, "w").close()
    assert third.result(timeout=20) == "released!?"
    assert second.result(0) == "released!"


def test_many_chains_while_their_first_link_finishes(setup):
    # the dependency finishes while the dependent registers, in either order
    app, celery = setup
    pairs = []
    for i in range(40):
        first = celery.submit(tasks.add, i, 1)
        pairs.append((i, celery.submit(tasks.add, first, 1)))
    assert [f.result(timeout=30) for _, f in pairs] == [i + 2 for i, _ in pairs]


def test_diamond_and_containers(setup):
    app, celery = setup
    top = celery.submit(tasks.add, 1, 1)
    left = celery.submit(tasks.add, top, 10)
    right = celery.submit(tasks.add, top, 100)
    bottom = celery.submit(tasks.add, left, right)
    assert bottom.result(timeout=20) == 114
    nested = celery.submit(tasks.gather, [top, (left, {"r": right})], k={"b": bottom})
    assert nested.result(timeout=20) == (([2, (12, {"r": 102})],), {"k": {"b": 114}})


def test_fan_in_of_a_thousand_futures(direct_app):
    from tests.apps.direct import celery

    with direct_app.app_context():
        futures = [celery.submit(tasks.add, i, 1) for i in range(1000)]
    with direct_app.app_context():
        total = celery.submit(sum, futures)
        assert total.result(timeout=120) == sum(range(1, 1001))


def test_a_pool_and_map_chunk_members_as_dependencies(setup):
    app, celery = setup
    pool = celery.map(tasks.add, *[(i, 1) for i in range(300)], chunksize=50)
    total = celery.submit(sum, pool)
    assert total.result(timeout=60) == sum(range(1, 301))
    assert celery.map(tasks.add, [pool[0], 1], [pool[1], 2]).result(timeout=20) == [2, 4]
    # map chooses its own chunksize: one message per call when futures are arguments
    assert celery.map(tasks.add, *[(f, 1) for f in pool[:100]]).result(timeout=30) == [
        i + 2 for i in range(100)
    ]


def test_a_failed_dependency_fails_its_dependents(setup):
    app, celery = setup
    bad = celery.submit(tasks.fail, "bad thing")
    middle = celery.submit(tasks.add, bad, 1)
    last = celery.submit(tasks.add, middle, 1)
    with pytest.raises(DependencyError) as info:
        middle.result(timeout=20)
    assert str(info.value) == (
        f"tests.apps.tasks:add[{middle.id}] did not run: its dependency, task {bad.id},"
        " failed (ValueError: bad thing)."
    )
    assert info.value.task_id == bad.id
    assert type(info.value.__cause__) is ValueError
    assert str(info.value.__cause__) == "bad thing"
    error = last.exception(timeout=20)
    assert isinstance(error, DependencyError) and error.task_id == middle.id
    assert isinstance(error.__cause__, DependencyError)
    # a dependency that failed before its dependent was submitted fails it at once
    late = celery.submit(tasks.add, bad, 1)
    assert isinstance(late.exception(timeout=20).__cause__, ValueError)


def test_cancel_before_start_is_honoured(setup, tmp_path):
    app, celery = setup
    release = str(tmp_path / "release")
    first = celery.submit(tasks.wait_for_file, release)
    dependent = celery.submit(tasks.touch_named, str(tmp_path), first)
    after = celery.submit(tasks.add, dependent, "!")
    assert dependent.cancel() and dependent.cancelled()
    open(release, "w").close()
    assert first.result(timeout=20) == "released"
    # in any other process, the cancelled call ends REVOKED once its turn came
    seen = celery.get(dependent.id)
    assert concurrent.futures.wait([seen], timeout=20).done == {seen}
    assert seen.cancelled()
    error = after.exception(timeout=20)
    assert isinstance(error, DependencyError)
    assert isinstance(error.__cause__, concurrent.futures.CancelledError)
    assert not os.path.exists(tmp_path / "released")


def test_cancelled_dependency_fails_its_dependent(setup, tmp_path):
    app, celery = setup
    release = str(tmp_path / "release")
    blocker = celery.submit(tasks.wait_for_file, release)
    blockers = [celery.submit(tasks.wait_for_file, release) for _ in range(3)]
    queued = celery.submit(tasks.add, 1, 1)  # behind the blockers (two worker processes)
    dependent = celery.submit(tasks.add, queued, 1)
    assert queued.cancel()
    open(release, "w").close()
    error = dependent.exception(timeout=20)
    assert isinstance(error, DependencyError)
    assert isinstance(error.__cause__, concurrent.futures.CancelledError)
    assert [f.result(timeout=20) for f in [blocker, *blockers]] == ["released"] * 4


SCRIPT = textwrap.dedent(
    """
    import sys
    from tests.apps import direct, tasks

    with direct.app.app_context():
        first = direct.celery.submit(tasks.wait_for_file, sys.argv[1])
        second = direct.celery.submit(tasks.add, first, "!")
        third = direct.celery.submit(tasks.add, second, "?")
        print(third.id, flush=True)
    """
)


def test_a_chain_outlives_the_web_process_and_get_finds_its_last_link(direct_app, tmp_path):
    from tests.apps import direct

    release = str(tmp_path / "release")
    script = tmp_path / "submit_chain.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, str(script), release],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    last_id = done.stdout.split()[-1]
    # the web process is gone before the first link finished
    open(release, "w").close()
    with direct_app.app_context():
        assert direct.celery.get(last_id).result(timeout=30) == "released!?"


def test_eager_mode_resolves_inline():
    app = Flask("eager_deps")
    app.config.update(CELERY_ALWAYS_EAGER=True)
    celery = Celery(app)
    with app.app_context():
        first = celery.submit(tasks.add, 1, 2)
        pool = celery.map(tasks.add, [1, 1], [2, 2])
        assert celery.submit(tasks.gather, first, pool, k=[first]).result() == (
            (3, [2, 4]),
            {"k": [3]},
        )
        bad = celery.submit(tasks.fail, "eager bad")
        dependent = celery.submit(tasks.add, bad, 1)
        assert dependent.done()
        error = dependent.exception()
        assert isinstance(error, DependencyError) and isinstance(error.__cause__, ValueError)


def test_what_cannot_be_a_dependency_is_refused_at_submit(setup):
    app, celery = setup
    other = Flask("other_deps")
    other.config.update(CELERY_ALWAYS_EAGER=True)
    foreign = Celery(other)
    with other.app_context():
        theirs = foreign.submit(tasks.add, 1, 1)
    with pytest.raises(ValueError, match=f"The future of task {theirs.id} belongs to another app"):
        celery.submit(tasks.add, theirs, 1)
    first = celery.submit(tasks.add, 1, 1)
    with pytest.raises(ValueError, match=r"map\(\) with chunksize=2 cannot take futures"):
        celery.map(tasks.add, [first, 1], [2, 3], chunksize=2)
    from kombu import Queue

    with pytest.raises(
        ValueError, match="Option 'queue' cannot be used on a call that has futures"
    ):
        celery.submit(tasks.add, first, 1, queue=Queue("celery"))
    assert first.result(timeout=10) == 2


def _forged_call(codec, task_id, directory, name, after):
    """A call envelope of ``touch_named(directory, name)`` sealed by ``codec``."""
    payload = frame(after, pickle.dumps((tasks.touch_named, (directory, name), {})))
    extra = {"fn": "forged", "task": "flask_execute.dispatch", "root": task_id,
             "parent": after[0], "after": 1, "send": {}}  # fmt: skip
    return codec.seal("call", task_id, payload, extra=extra)


def test_forged_dependents_never_run_nor_substitute_a_value(setup, tmp_path, log_dir):
    app, celery = setup
    state = runtime(app, celery)
    client = state.controller.backend.client
    release = str(tmp_path / "release")
    first = celery.submit(tasks.wait_for_file, release)
    genuine = celery.submit(tasks.add, first, "!")
    # attached to someone's task: an envelope sealed with another key, and a genuine
    # envelope of this app stored under another task id
    stranger, copied = str(uuid.uuid4()), str(uuid.uuid4())
    forged = _forged_call(Codec(b"not the app's key" * 2), stranger, str(tmp_path), "a", [first.id])
    real = _forged_call(state.codec, str(uuid.uuid4()), str(tmp_path), "b", [first.id])
    for task_id, envelope in ((stranger, forged), (copied, real)):
        client.sadd(dependents_key(first.id), task_id)
        client.set(waiting_key(task_id), envelope)
    log = os.path.join(
        log_dir, "direct.log" if app.import_name.endswith("direct") else "factory.log"
    )
    offset = os.path.getsize(log) if os.path.exists(log) else 0
    open(release, "w").close()
    assert genuine.result(timeout=20) == "released!"

    def refused():
        with open(log) as f:
            f.seek(offset)
            text = f.read()
        return all(f"rejected task {tid}" in text for tid in (stranger, copied))

    assert wait_for(refused), "the forged entries were not refused"
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
    assert not client.exists(waiting_key(stranger), waiting_key(copied))
    # a forged outcome of a dependency is never its value
    fake = str(uuid.uuid4())
    sealed = Codec(b"not the app's key" * 2).seal("result", fake, pickle.dumps("forged"))
    backend = state.controller.backend
    meta = {"status": "SUCCESS", "result": sealed, "task_id": fake}
    client.set(backend.get_key_for_task(fake), backend.encode(meta))
    client.set(claim_key(fake), "done")
    victim = celery.submit(tasks.add, celery.get(fake), "!")
    error = victim.exception(timeout=20)
    assert isinstance(error, DependencyError)
    assert isinstance(error.__cause__, SignatureError)


def test_a_waiting_call_published_early_is_dropped_and_still_runs_later(setup, tmp_path, log_dir):
    app, celery = setup
    state = runtime(app, celery)
    client = state.controller.backend.client
    release = str(tmp_path / "release")
    first = celery.submit(tasks.wait_for_file, release)
    dependent = celery.submit(tasks.add, first, "!")
    envelope = client.get(waiting_key(dependent.id)).decode()
    header, _ = state.codec.open(envelope, "call", dependent.id)
    log = os.path.join(
        log_dir, "direct.log" if app.import_name.endswith("direct") else "factory.log"
    )
    offset = os.path.getsize(log)
    # someone who can read Redis and write to the broker sends it before its time
    state.celery_app.dispatch.apply_async(
        (envelope,), task_id=dependent.id, root_id=header["root"], parent_id=header["parent"]
    )

    def dropped():
        with open(log) as f:
            f.seek(offset)
            return f"[{dependent.id}] arrived before its dependencies" in f.read()

    assert wait_for(dropped)
    assert dependent.state == "PENDING"
    open(release, "w").close()
    assert dependent.result(timeout=20) == "released!"


def test_a_released_call_left_in_the_outbox_is_published_by_the_next_worker(broker_url, log_dir):
    app = Flask("deps_outbox")
    app.config.update(
        SECRET_KEY="deps-outbox-secret", CELERY_BROKER_URL=broker_url, CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS={"deps-outbox": {"concurrency": 1}}, CELERY_FLOWER=False,
    )  # fmt: skip
    celery = Celery(app)
    with app.app_context():
        state = celery.runtime(app)
        backend = state.controller.backend
        client = backend.client
        try:
            celery.start()
            upstream = str(uuid.uuid4())  # a call that ran elsewhere
            waiting = celery.submit(tasks.add, celery.get(upstream), "!")
            assert client.exists(waiting_key(waiting.id))
            celery.stop()
            # the worker that ran `upstream` stored its outcome, releasing `waiting`, and
            # was killed before it published it
            sealed = state.codec.seal("result", upstream, pickle.dumps("stored"))
            meta = backend.encode({"status": "SUCCESS", "result": sealed, "task_id": upstream})
            client.set(backend.get_key_for_task(upstream), meta)
            client.set(claim_key(upstream), "done")
            release = RELEASE + "return fe_release(KEYS[1], ARGV[1], ARGV[2])"
            outbox = state.worker.outbox.key
            assert client.eval(release, 1, claim_key(upstream), meta, outbox) == 1
            assert client.zscore(outbox, waiting.id) is not None
            celery.start()  # its first act: drain the outbox
            assert waiting.result(timeout=20) == "stored!"
            assert wait_for(lambda: not client.exists(waiting_key(waiting.id)))
            assert client.zscore(outbox, waiting.id) is None
        finally:
            celery.stop()

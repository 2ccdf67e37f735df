"""Issue 10.2: unsigned fields of a Celery message decide nothing.

Our signature covers the envelope (the one argument of the dispatch task); Celery turns
the message headers and the third part of the body (``embed``) into the task's request,
``embed`` winning. Seen on main with a captured, genuine message and ``{"is_eager":
true}`` in ``embed``: the worker skipped the replay claim, so a captured call ran four
times, a *cancelled* call ran, and a finished at-least-once call ran three more times.

Each test below plays that attacker on the real worker of the shared direct app and
checks the canary (a line per run in a file), the CRITICAL line, that the message was
acknowledged, and that the worker still serves.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from flask_execute.dispatch import DISPATCH_LATE
from tests.apps import tasks
from tests.test_security import direct  # noqa: F401  (the fixture)
from tests.test_security import forge
from tests.test_security import read
from tests.test_security import serves
from tests.test_security import size
from tests.test_security import Target
from tests.test_security import wait_for


def with_body(message: dict, *, embed: dict | None = None, **headers: object) -> dict:
    """A forged copy of ``message`` whose body's third part is ``embed``."""
    forged = forge(message, **headers)
    args, kwargs, original = json.loads(base64.b64decode(forged["body"]))
    body = [args, kwargs, original if embed is None else embed]
    forged["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return forged


def unsigned_rejections(target: Target, task_id: str, offset: int = 0) -> list[str]:
    """The worker's main process refused the message: as not Celery's protocol
    (``malformed``, the admission check) or as fields we never send (``unsigned_field``,
    the dispatch tasks' own check), whichever saw it first."""
    return [
        line
        for line in read(target.log, offset).splitlines()
        if f"rejected task {task_id} (unsigned_field)" in line
        or f"rejected task {task_id} (malformed)" in line
    ]


def runs(counter: object) -> int:
    return read(str(counter)).count("\n")


GENUINE_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_a_captured_call_replayed_with_is_eager_runs_once(direct, tmp_path):  # noqa: F811
    counter = tmp_path / "count"
    task_id, envelope = direct.envelope(tasks.touch, str(counter))
    captured = direct.message(task_id, envelope)
    direct.inject(forge(captured))
    assert direct.celery.get(task_id).result(timeout=10) == str(counter)
    offset = size(direct.log)
    for _ in range(3):
        direct.inject(with_body(captured, embed={**GENUINE_EMBED, "is_eager": True}))
    assert wait_for(lambda: len(unsigned_rejections(direct, task_id, offset)) == 3)
    assert serves(direct.celery)
    assert runs(counter) == 1
    for line in unsigned_rejections(direct, task_id, offset):
        assert "CRITICAL/MainProcess" in line
        assert "is_eager" in line
        assert line.endswith(" The message was dropped unexecuted.")
    direct.assert_acknowledged()


def test_a_cancelled_call_never_runs_under_another_header_id(direct, tmp_path):  # noqa: F811
    counter = tmp_path / "count"
    task_id, envelope = direct.envelope(tasks.touch, str(counter))
    future = direct.celery.get(task_id)
    assert future.cancel()  # the caller claimed the id as cancelled: it must never run
    captured = direct.message(task_id, envelope)
    offset = size(direct.log)
    attempts = {
        str(uuid.uuid4()): {**GENUINE_EMBED, "id": task_id, "is_eager": True},
        str(uuid.uuid4()): {**GENUINE_EMBED, "id": task_id},
    }
    for header_id, embed in attempts.items():
        direct.inject(with_body(captured, embed=embed, id=header_id))
    assert wait_for(
        lambda: all(unsigned_rejections(direct, h, offset) for h in attempts), timeout=10
    )
    assert serves(direct.celery)
    assert runs(counter) == 0
    assert future.cancelled()
    direct.assert_acknowledged()


def test_a_finished_at_least_once_call_never_runs_again(direct, tmp_path):  # noqa: F811
    counter = tmp_path / "count"
    task_id, envelope = direct.envelope(tasks.touch, str(counter), task=DISPATCH_LATE)
    captured = direct.message(task_id, envelope, late=True)
    direct.inject(forge(captured))
    assert direct.celery.get(task_id).result(timeout=10) == str(counter)
    offset = size(direct.log)
    for redelivered in (False, True, True):
        embed = {**GENUINE_EMBED, "is_eager": True}
        direct.inject(with_body(captured, embed=embed, redelivered=redelivered))
    assert wait_for(lambda: len(unsigned_rejections(direct, task_id, offset)) == 3)
    assert serves(direct.celery)
    assert runs(counter) == 1
    direct.assert_acknowledged()


@pytest.mark.parametrize(
    ("headers", "embed", "named"),
    [
        ({"is_eager": True}, None, "'is_eager'"),
        ({"called_directly": True}, None, "'called_directly'"),
        ({"delivery_info": {"redelivered": True}}, None, "'delivery_info'"),
        ({"_protected": 1}, None, "'_protected'"),
        ({"group": "g-1", "group_index": 0}, None, "'group'"),
        ({"ignore_result": True}, None, "'ignore_result'"),
        ({"stamped_headers": ["x"], "stamps": {"x": "y"}}, None, "'stamped_headers'"),
        ({"replaced_task_nesting": 2}, None, "'replaced_task_nesting'"),
        ({}, {**GENUINE_EMBED, "callbacks": [{"task": "celery.ping", "args": []}]},
         "['callbacks']"),
        ({}, {**GENUINE_EMBED, "chord": {"task": "celery.ping"}}, "['chord']"),
        ({}, {**GENUINE_EMBED, "retries": 1}, "'retries'"),
        ({}, ["not", "a", "dict"], "list"),
    ],
    ids=[
        "header-is_eager", "header-called_directly", "header-delivery_info",
        "header-private", "header-group", "header-ignore_result", "header-stamps",
        "header-replaced", "embed-callbacks", "embed-chord", "embed-retries", "embed-list",
    ],
)  # fmt: skip
def test_fields_we_never_send_are_refused_before_anything_runs(
    direct,  # noqa: F811
    tmp_path,
    headers: dict,
    embed: object,
    named: str,
):
    counter = tmp_path / "count"
    task_id, envelope = direct.envelope(tasks.touch, str(counter))
    captured = direct.message(task_id, envelope)
    direct.inject(with_body(captured, embed=embed, **headers))
    assert wait_for(lambda: unsigned_rejections(direct, task_id))
    assert serves(direct.celery)
    (line,) = unsigned_rejections(direct, task_id)
    assert named in line
    assert runs(counter) == 0
    assert not direct.client.keys(f"*{task_id}*")  # no claim, no result, nothing
    direct.assert_acknowledged()


@pytest.mark.parametrize(
    "headers",
    [{"root_id": "someone-else"}, {"parent_id": "someone-else"}],
    ids=["root_id", "parent_id"],
)
def test_a_rewritten_lineage_is_a_binding_mismatch(direct, tmp_path, headers):  # noqa: F811
    counter = tmp_path / "count"
    task_id, envelope = direct.envelope(tasks.touch, str(counter))
    direct.inject(forge(direct.message(task_id, envelope), **headers))
    direct.assert_rejected({task_id: "binding_mismatch"})
    assert runs(counter) == 0


def test_a_task_id_with_a_newline_cannot_forge_a_log_line(direct):  # noqa: F811
    task_id = "forged\nCRITICAL/MainProcess] all clear"
    direct.inject(forge(direct.message(str(uuid.uuid4())), args=["fe1.a.b.c"], id=task_id))
    escaped = "forged\\nCRITICAL/MainProcess] all clear"
    assert wait_for(lambda: f"rejected task {escaped} (malformed)" in read(direct.log))
    assert serves(direct.celery)
    (line,) = [x for x in read(direct.log).splitlines() if "rejected task forged" in x]
    assert line.endswith(" The message was dropped unexecuted.")  # one line, not two
    # refused before Celery logs it as received (its own line would carry the newline)
    assert not [x for x in read(direct.log).splitlines() if x.startswith("CRITICAL/MainProc")]


def submit_from_a_task() -> str:
    """Runs on a worker: a call submitted from inside a call (its parent)."""
    from tests.apps.direct import celery

    return celery.submit(tasks.add, 20, 22).id


def test_a_call_submitted_from_inside_a_task_is_signed_with_its_lineage(direct):  # noqa: F811
    outer = direct.celery.submit(submit_from_a_task)
    inner_id = outer.result(timeout=10)
    assert direct.celery.get(inner_id).result(timeout=10) == 42


def test_a_retried_call_runs_to_its_result(direct, tmp_path):  # noqa: F811
    # Celery publishes the retry with the call itself as parent: still the call's lineage
    counter = tmp_path / "count"
    future = direct.celery.submit(tasks.retry_until, str(counter), 3)
    assert future.result(timeout=15) == 3
    assert runs(counter) == 3
    assert not rejections_of(direct, future.id)


def test_a_retried_call_submitted_from_a_task_runs_to_its_result(direct, tmp_path):  # noqa: F811
    counter = tmp_path / "count"
    outer = direct.celery.submit(submit_retrying_from_a_task, str(counter))
    inner = direct.celery.get(outer.result(timeout=10))
    assert inner.result(timeout=15) == 2
    assert not rejections_of(direct, inner.id)


def submit_retrying_from_a_task(path: str) -> str:
    from tests.apps.direct import celery

    return celery.submit(tasks.retry_until, path, 2).id


def rejections_of(target: Target, task_id: str) -> list[str]:
    return [line for line in read(target.log).splitlines() if f"rejected task {task_id}" in line]

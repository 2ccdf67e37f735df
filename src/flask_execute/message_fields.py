"""Which unsigned fields of a Celery message may travel next to an envelope.

A Celery protocol-2 message is ``headers`` plus a body ``[args, kwargs, embed]``. Our
signature covers only ``args[0]`` (the envelope), yet Celery turns the headers and the
``embed`` part into the task's request: ``embed`` is merged *over* the headers in the
pool process, so ``{"is_eager": true}`` or ``{"id": ...}`` there would change what the
dispatch task sees. Nothing unsigned may decide what runs, so the worker's main process
refuses, before the pool sees the message, any dispatch message whose fields are not
what our own ``apply_async`` writes:

* ``embed`` holds only ``callbacks``, ``errbacks``, ``chain`` and ``chord``, all empty
  (a submitted call never has callbacks, a chain or a chord);
* headers are Celery's protocol-2 headers (:data:`PROTOCOL_HEADERS`) with the values we
  send (no group, no stamps, results stored), plus custom headers that cannot collide
  with a request attribute (``is_eager``, ``called_directly``, ``delivery_info``, ...
  are refused);
* ``root_id`` and ``parent_id`` are bound inside the envelope and compared with it by
  the dispatch task once the envelope's MAC checked out (:func:`lineage`).
"""

from __future__ import annotations

import typing as t
from collections.abc import Mapping

from celery.app.task import Context

__all__ = ["EMBED_KEYS", "PROTOCOL_HEADERS", "lineage", "unsigned_field_problem"]

#: The headers Celery's ``as_task_v2`` writes, and ``redelivered`` (kombu's Redis
#: transport marks a restored message with it).
PROTOCOL_HEADERS = frozenset(
    {
        "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index",
        "retries", "timelimit", "root_id", "parent_id", "argsrepr", "kwargsrepr",
        "origin", "ignore_result", "replaced_task_nesting", "stamped_headers", "stamps",
        "redelivered",
    }
)  # fmt: skip
#: The keys of ``embed`` Celery writes; for a submitted call each is empty.
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
# headers whose only accepted values are "nothing": what we never send
_EMPTY_HEADERS = ("group", "group_index", "stamped_headers", "stamps", "ignore_result")


def unsigned_field_problem(headers: Mapping[str, t.Any], embed: object) -> str | None:
    """Why the unsigned fields of a dispatch message cannot accompany an envelope, or
    None when they are exactly what flask-execute sends.

    ``headers`` are the message headers (Celery's request dict before execution) and
    ``embed`` the third element of the message body.
    """
    if not isinstance(embed, Mapping):
        return f"the message body's third part is a {type(embed).__name__}, not a dict."
    extra = sorted(str(k) for k in embed if k not in EMBED_KEYS)
    if extra:
        return f"the message body carries request fields {extra} next to the envelope."
    filled = sorted(str(k) for k, v in embed.items() if v)
    if filled:
        return f"the message asks for {filled} of a call that has none."
    for key in headers:
        if key in PROTOCOL_HEADERS:
            continue
        # a custom header becomes an attribute of the task's request: it must not
        # shadow one Celery or our dispatch task reads (is_eager, called_directly, ...)
        if not isinstance(key, str) or key.startswith("_") or hasattr(Context, key):
            return f"the message header {key!r} is not allowed next to an envelope."
    filled = [k for k in _EMPTY_HEADERS if headers.get(k)]
    if filled:
        return f"the message header {filled[0]!r} is set; flask-execute never sends it."
    if headers.get("replaced_task_nesting") not in (None, 0):
        return "the message header 'replaced_task_nesting' is set; flask-execute never sends it."
    return None


def lineage(task_id: str, parent: t.Any, after: list[str] | None = None) -> tuple[str, str | None]:
    """``(root_id, parent_id)`` of a call published now, as Celery's ``send_task``
    computes them: inside a task (``parent``, Celery's current worker task) the call
    descends from it, else it is its own root. Outside a task, a call that waits for
    the futures ``after`` descends from the first of them (as a link of a Celery chain
    from the one before): whichever worker publishes it then keeps this parent (Celery
    fills in its own current task only where a message has none)."""
    if parent is None:
        return task_id, after[0] if after else None
    request = parent.request
    return str(request.root_id or request.id), str(request.id)

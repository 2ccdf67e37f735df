"""How a message we drop is reported: one CRITICAL line on ``flask_execute.security``
naming the task id (made printable: it comes from whoever wrote the message), the
reason and a sentence, never the message's content.

Used by the transports, the admission check and the dispatch task alike, so that every
refusal reads the same and an alerting rule matches all of them.

A refusal the caller can act on (:data:`NOTIFIED`: the workers do not know the key the
call was signed with, or its envelope expired) is also told to the process waiting for
the call, on its reply channel: a :func:`notice`. The worker cannot sign it (it does not
hold the caller's key), so a notice proves nothing, and the caller believes one only
as far as that is harmless: it withdraws the call (claims it as cancelled), and only
if that worked (the call had not started and now never runs) does the future fail,
with :func:`refusal_message` written by the caller itself from the reason code. A
notice never gives a value and carries no text of its own; a forged one does what
deleting the call's message would, except that the caller hears of it sooner.
"""

from __future__ import annotations

import json
import logging
import re

__all__ = [
    "NOTICE",
    "NOTIFIED",
    "Refused",
    "alert",
    "failure",
    "kind",
    "notice",
    "refusal_message",
    "security_log",
    "shown",
]

security_log = logging.getLogger("flask_execute.security")


class Refused(Exception):
    """A message that must not reach Celery: a reason code and a sentence."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def alert(task_id: object, refused: Refused, subject: str | None = None) -> None:
    """Log a refusal once: what was refused (``subject``, by default the task and its
    id made printable), the reason, never the message's content."""
    security_log.critical(
        "flask-execute rejected %s (%s): %s The message was dropped unexecuted.",
        subject or f"task {shown(task_id)}",
        refused.reason,
        refused,
    )


def shown(task_id: object) -> str:
    """``task_id`` as one printable line (it comes from the attacker)."""
    if task_id is None:
        return "<unknown>"
    text = task_id if isinstance(task_id, str) else repr(task_id)
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 100 else f"{text[:97]}..."


def kind(value: object) -> str:
    """What ``value`` is, for an error sentence: "null", "an int", "a list of 4 items"."""
    if value is None:
        return "null"
    name = type(value).__name__
    article = "an" if name[0] in "aeiou" else "a"
    if isinstance(value, (list, tuple)):
        return f"{article} {name} of {len(value)} item{'' if len(value) == 1 else 's'}"
    return f"{article} {name}"


def failure(exc: BaseException) -> str:
    """An exception as text for a refusal: its type and its message, printable."""
    return f"{type(exc).__name__}: {shown(str(exc))}"


#: The refusals told to the caller: reason code -> what to check.
NOTIFIED: dict[str, str] = {
    "unknown_key": (
        "it does not know the key this call was signed with{keys}. Give the web"
        " processes and the workers the same SECRET_KEY or CELERY_SIGNING_KEY (while"
        " rotating keys, keep the old one in SECRET_KEY_FALLBACKS or"
        " CELERY_SIGNING_KEY_FALLBACKS on both sides)"
    ),
    "expired": (
        "its signed envelope had expired, or was issued more than 5 minutes ahead of"
        " the worker's clock. Check that the clocks of the web processes and the"
        " workers agree (NTP)"
    ),
}
#: The key of a refusal notice (a state on a reply channel) that holds its reason.
NOTICE = "flask_execute_refused"
_KID = re.compile(r"[0-9a-f]{8}")


def notice(task_id: str, reason: str, worker_kid: str) -> str:
    """The unsigned notice a worker publishes on the caller's reply channel when it
    refuses task ``task_id`` for ``reason`` (one of :data:`NOTIFIED`). Its status is
    not a final one: the result watcher keeps following the task until the caller
    believes the notice (see the module's docstring)."""
    return json.dumps(
        {"task_id": task_id, "status": "REFUSED", NOTICE: reason, "worker_kid": worker_kid}
    )


def refusal_message(label: str, reason: object, own_kid: str, worker_kid: object) -> str | None:
    """The caller's error message for a notice with ``reason`` about the call
    ``label`` (``name[task id]``), or None when the reason is not one we tell
    (a notice is unsigned: nothing of it but a known code and a key id is shown)."""
    if not isinstance(reason, str) or reason not in NOTIFIED:
        return None
    keys = f" (key id {own_kid}"
    if isinstance(worker_kid, str) and _KID.fullmatch(worker_kid) and worker_kid != own_kid:
        keys += f"; the worker signs with key id {worker_kid}"
    keys += ")"
    advice = NOTIFIED[reason].format(keys=keys)
    return f"A worker refused {label} ({reason}): {advice}. The call did not run and will not."

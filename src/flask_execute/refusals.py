"""How a message we drop is reported: one CRITICAL line on ``flask_execute.security``
naming the task id (made printable: it comes from whoever wrote the message), the
reason and a sentence, never the message's content.

Used by the transports, the admission check and the dispatch task alike, so that every
refusal reads the same and an alerting rule matches all of them.
"""

from __future__ import annotations

import logging

__all__ = ["Refused", "alert", "failure", "kind", "security_log", "shown"]

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

"""How tests/test_docs_blocks.py runs a documentation code block the way a reader
would: as a script file run with ``python file.py`` in a fresh directory, as a
fragment appended to the page's app (a reader's session), as a config file loaded
into an app, as shell commands, or as a small project with its own test suite.

The broker: every subprocess gets the harness's private Redis (a db of its own per
block) through a ``sitecustomize.py`` on its ``PYTHONPATH`` that adds
``CELERY_BROKER_URL`` (and ``CELERY_FLOWER = False``, so that no block starts a
Flower it does not ask for) to ``flask.Flask.default_config``: every app a block
builds starts from them, exactly as if the reader's machine had Redis on the default
address; a block's own config (``app.config[...]``, ``from_prefixed_env``) still wins.
Nothing else is injected: local workers start as the block makes them start.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import pathlib
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tokenize
import typing as t

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = str(ROOT / "src")
HOST = socket.gethostname()
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]


# --- the blocks --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence
    lang: str
    code: str

    @property
    def key(self) -> str:
        """The block's first non-blank line: with the page, what the plans are keyed by."""
        first = next(line.strip() for line in self.code.splitlines() if line.strip())
        return first if first.startswith(("#", ";")) else re.sub(r"\s+#.*$", "", first)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks() -> list[Block]:
    """Every fenced code block of README.md and docs/*.md. MyST directives (```{...})
    are not code: Sphinx renders them, and the docs build checks them."""
    found = []
    for page in PAGES:
        lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            match = re.match(r"^( *)```(.*)$", lines[i])  # indented: in a list item
            if match is None:
                i += 1
                continue
            fence = match.group(1) + "```"
            end = next(j for j in range(i + 1, len(lines)) if lines[j].rstrip() == fence)
            info = match.group(2).strip()
            if not info.startswith("{"):
                code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
                found.append(Block(page, i + 1, info or "text", code))
            i = end + 1
    return found


# --- the environment of one block ----------------------------------------------------------
SITECUSTOMIZE = """\
import os

_url = os.environ.get("FLASK_EXECUTE_DOCS_BROKER")
if _url:
    import flask
    from werkzeug.datastructures import ImmutableDict

    flask.Flask.default_config = ImmutableDict(
        {**flask.Flask.default_config, "CELERY_BROKER_URL": _url, "CELERY_FLOWER": False}
    )
"""

CHECKS = '''\
"""What the docs' comments promise, checked (``value  # 3``, ``call()  # ValueError``)."""


def expect(value, expected, line):
    if value != expected:
        raise AssertionError(f"{line!r} gave {value!r}; the docs say {expected!r}")
    return value


def expect_raises(thunk, name, line):
    try:
        thunk()
    except Exception as exc:
        if type(exc).__name__ == name:
            return exc
        raise
    raise AssertionError(f"{line!r} did not raise {name}, as the docs say")
'''


class Reader:
    """A fresh directory and environment for one block, and ways to run things in it."""

    def __init__(self, cwd: pathlib.Path, broker_url: str) -> None:
        self.cwd = cwd
        self.broker_url = broker_url
        inject = cwd / "_docs_inject"
        inject.mkdir()
        (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (inject / "docs_check.py").write_text(CHECKS)
        venv_bin = os.path.dirname(sys.executable)
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(inject), SRC]),
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "FLASK_EXECUTE_DOCS_BROKER": broker_url,
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("FLASK_APP", None)
        self.background: list[subprocess.Popen[str]] = []

    def write(self, name: str, text: str) -> pathlib.Path:
        path = self.cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def run(
        self,
        argv: list[str],
        *,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            argv, cwd=self.cwd, env={**self.env, **(env or {})}, input=stdin,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and out.returncode != 0:
            raise AssertionError(
                f"{argv} exited with {out.returncode}\n--- stdout\n{out.stdout}\n"
                f"--- stderr\n{out.stderr}\n{self.logs()}"
            )
        return out

    def python(self, *args: str, **kwargs: t.Any) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, *args], **kwargs)

    def shell(self, line: str, **kwargs: t.Any) -> subprocess.CompletedProcess[str]:
        return self.run(["bash", "-c", line], **kwargs)

    def serve(
        self, line: str, ready: str, *, count: int = 1, env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.Popen[str]:  # fmt: skip
        """Start a long-running command; return once ``ready`` (a regex) appeared
        ``count`` times in its output."""
        proc = subprocess.Popen(
            ["bash", "-c", line], cwd=self.cwd, env={**self.env, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, start_new_session=True,
        )  # fmt: skip
        self.background.append(proc)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        output = ""
        deadline = time.monotonic() + timeout
        while len(re.findall(ready, output)) < count:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(0.0, min(left, 0.5)))
            chunk = os.read(fd, 65536).decode(errors="replace") if readable else ""
            output += chunk
            if (readable and not chunk) or left <= 0:
                raise AssertionError(
                    f"{line!r} did not print {ready!r} {count}x (exit {proc.poll()}):\n{output}"
                )
        proc.output = [output]  # type: ignore[attr-defined]

        def drain() -> None:  # a full pipe would block the service
            while chunk := os.read(fd, 65536):
                proc.output.append(chunk.decode(errors="replace"))  # type: ignore[attr-defined]

        proc.drain = threading.Thread(target=drain, daemon=True)  # type: ignore[attr-defined]
        proc.drain.start()  # type: ignore[attr-defined]
        return proc

    def stop(
        self, proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 30
    ) -> int:
        """Signal a served command (its process group: the worker's pool too) and wait."""
        try:
            if sig == signal.SIGINT:  # Ctrl-C: the terminal signals the whole group
                os.killpg(proc.pid, sig)
            else:  # bash -c runs a single command in its own process (exec)
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            code = proc.wait(timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the rest of its group, if any
            except (ProcessLookupError, PermissionError):
                pass
            drain = getattr(proc, "drain", None)
            if drain is not None:
                drain.join(10)
            if proc.stdout is not None:
                proc.stdout.close()
            if proc in self.background:
                self.background.remove(proc)
        return code

    def close(self) -> None:
        for proc in list(self.background):
            self.stop(proc, signal.SIGKILL, 10)

    def logs(self) -> str:
        parts = []
        for log in sorted(self.cwd.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(parts)


# --- a fragment, made into the script a reader's session amounts to -------------------------
_EXCEPTION = re.compile(r"^([A-Z]\w*(?:Error|Exception))\b")


def _comments(code: str) -> dict[int, str]:
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string[1:].strip()
    return found


def promised(comment: str) -> tuple[str, str] | None:
    """What a ``# ...`` comment after an expression promises: ``("value", literal
    source)`` or ``("raises", exception name)``; None when it only explains. Host
    names in the docs (``web1``, ``host``) stand for this machine's."""
    comment = comment.replace("@web1", "@" + HOST).replace("@host", "@" + HOST)
    cuts = [len(comment)] + [m.start() for m in re.finditer(r", |: |; | \(", comment)]
    for cut in sorted(set(cuts), key=lambda c: (c != len(comment), c)):
        candidate = comment[:cut].strip()
        try:
            ast.literal_eval(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        return "value", candidate
    match = _EXCEPTION.match(comment)
    return ("raises", match.group(1)) if match else None


_HOISTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)


def _is_config(node: ast.stmt) -> bool:
    return isinstance(node, ast.Assign) and all(
        isinstance(target, ast.Name) and target.id.isupper() for target in node.targets
    )


@dataclasses.dataclass
class Fragment:
    """A block split the way a script needs it: config keys, module-level definitions
    (so a worker that imports the script has them), and the statements that run."""

    config: list[str]
    definitions: list[str]
    statements: list[str]
    awaits: bool


def split(code: str) -> Fragment:
    tree = ast.parse(code)
    comments = _comments(code)
    per_line: dict[int, int] = {}
    for node in tree.body:
        per_line[node.lineno] = per_line.get(node.lineno, 0) + 1
    config, definitions, statements = [], [], []
    for node in tree.body:
        source = ast.get_source_segment(code, node, padded=False) or ""
        if isinstance(node, _HOISTED):
            decorators = getattr(node, "decorator_list", [])
            start = min([node.lineno] + [d.lineno for d in decorators])
            lines = code.splitlines()[start - 1 : node.end_lineno]
            definitions.append("\n".join(lines))
        elif _is_config(node):
            config.append(source)
        elif isinstance(node, ast.Expr) and node.lineno == node.end_lineno:
            comment = comments.get(node.lineno) if per_line[node.lineno] == 1 else None
            promise = promised(comment) if comment else None
            if promise is None:
                statements.append(f"_ = {source}")
            elif promise[0] == "value":
                statements.append(f"_ = expect(({source}), ({promise[1]}), {source!r})")
            else:
                name = promise[1]
                statements.append(f"_ = expect_raises(lambda: ({source}), {name!r}, {source!r})")
        else:
            statements.append(source)
    awaits = any(
        isinstance(node, ast.Await)
        for stmt in tree.body
        if not isinstance(stmt, (ast.AsyncFunctionDef, ast.FunctionDef))
        for node in ast.walk(stmt)
    )
    return Fragment(config, definitions, statements, awaits)


def indent(code: str, spaces: int) -> str:
    return textwrap.indent(code, " " * spaces, lambda line: True)


def session_script(
    prelude: str,
    block_code: str,
    *,
    config: dict[str, object] | None = None,
    defs: str = "",
    setup: str = "",
    after: str = "",
    in_task_from: str | None = None,
    as_function: bool = False,
    app_context: bool = True,
) -> str:
    """The script of a reader's session: the page's app (``prelude``; config is added
    before its ``celery = Celery(app)``), the names the block assumes (``defs``), the
    block's definitions at module level and its statements under
    ``if __name__ == "__main__":`` (local workers import the script), in the app
    context; expressions followed by a literal comment are checked against it."""
    in_task = ""
    if in_task_from is not None:
        head, _, tail = block_code.partition(in_task_from)
        block_code = head
        in_task = in_task_from + tail
    fragment = split(block_code)
    settings = dict(config or {})
    lines = prelude.rstrip("\n").splitlines()
    keys = [f"app.config.update({settings!r})"] if settings else []
    keys += [f"app.config[{c.split('=', 1)[0].strip()!r}] = {c.split('=', 1)[1].strip()}"
             for c in fragment.config]  # fmt: skip
    # config goes in before `celery = Celery(app)`: init_app reads it once
    at = next((i for i, line in enumerate(lines) if "= Celery(app" in line), len(lines))
    assert at < len(lines) or not keys, "config needs a prelude with `celery = Celery(app)`"
    script = "\n".join(lines[:at] + keys + lines[at:]) + "\n\n"
    script += "\n\n".join(fragment.definitions) + "\n\n" + textwrap.dedent(defs) + "\n"
    if in_task:
        script += "\ndef docs_in_task():\n" + indent(in_task, 4) + "\n"
    body = "\n".join([textwrap.dedent(setup), *fragment.statements, textwrap.dedent(after)]).strip(
        "\n"
    )
    if in_task:
        body += "\ncelery.submit(docs_in_task).result(timeout=30)"
    body = body or "pass"
    if fragment.awaits:
        body = "async def docs_main():\n" + indent(body, 4) + "\n\nasyncio.run(docs_main())"
    elif as_function:
        body = "def docs_view():\n" + indent(body, 4) + "\n\ndocs_view()"
    if app_context:
        body = "with app.app_context():\n" + indent(body, 4)
    script += (
        '\nif __name__ == "__main__":\n'
        "    import asyncio\n\n"
        "    from docs_check import expect, expect_raises\n\n" + indent(body, 4) + "\n"
    )
    return script

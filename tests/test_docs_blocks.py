"""Every code block of README.md and docs/*.md runs, as a reader would run it, against
real workers on the harness's private Redis (how the broker reaches the blocks:
tests/docsrun.py).

Each block has a plan in PLANS, keyed by its page and first line: a script run with
``python file.py`` in a fresh directory, a fragment run in the session of its page's
app, a config file loaded into an app, shell commands, or a small project with its
own tests. Expressions followed by a literal comment (``pool.result()  # [3, 7, 11]``,
``f.cancel()  # True``, ``pair.delay().get()  # EncodeError: ...``) are checked
against it. A block that is not run is ``Exempt``, with the reason next to it; a
substitution of a placeholder (``web1``, ``...``) says why too. A new block without a
plan fails ``test_every_block_has_a_plan``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import shutil
import signal
import textwrap
import typing as t
import uuid

import pytest

from tests.docsrun import Block
from tests.docsrun import HOST
from tests.docsrun import read_blocks
from tests.docsrun import Reader
from tests.docsrun import ROOT
from tests.docsrun import session_script

BLOCKS = read_blocks()
SECRET = "docs-secret-for-the-docs-tests-0123456789"
IMPORTS = "from flask import Flask\nfrom flask_execute import Celery\n\n"


def code(page: str, start: str) -> str:
    """The code of the one block of ``page`` whose first line starts with ``start``."""
    (found,) = [b.code for b in BLOCKS if b.page == page and b.key.startswith(start)]
    return found


# the README's first example, without its `if __name__ == "__main__":` part: the app a
# reader has defined when the README goes on with fragments
USAGE = code("README.md", "from flask import Flask").split("if __name__")[0]
QUICKSTART_APP = code("docs/quickstart.md", "# app.py")
TASKS = "from my_app import celery\n\n\n@celery.task\ndef add(x, y):\n    return x + y\n"


def my_app(config: str = "") -> dict[str, str]:
    """The project the docs call ``my_app``: the README's factory block as the
    package (with the imports of the example before it), its ``my_app.config`` and a
    ``my_app.tasks`` module registering ``add`` (the task name the docs use)."""
    return {
        "my_app/__init__.py": IMPORTS + code("README.md", "celery = Celery()")
        + "\n\nfrom my_app import tasks  # noqa: E402,F401\n",
        "my_app/config.py": f"SECRET_KEY = {SECRET!r}\n" + textwrap.dedent(config),
        "my_app/tasks.py": TASKS,
    }  # fmt: skip


CLI_CONFIG = code("docs/cli.md", "CELERY_WORKERS = {")


# --- the kinds of plan -----------------------------------------------------------------------
@dataclasses.dataclass
class Exempt:
    """Not run: ``reason`` says why."""

    reason: str


@dataclasses.dataclass
class Script:
    """The block saved as ``name`` (after ``prefix``) and run with ``python name``, or a
    ``driver`` script that uses it; stdout must be ``stdout`` when given."""

    name: str
    stdout: list[str] | None = None
    prefix: str = ""
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    driver: str | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    why: str = ""

    def run(self, block: Block, reader: Reader) -> None:
        for path, text in self.files.items():
            reader.write(path, text)
        reader.write(self.name, self.prefix + block.code)
        main = self.name
        if self.driver is not None:
            main = "run_docs.py"
            reader.write(main, textwrap.dedent(self.driver))
        out = reader.python(main, env=self.env)
        if self.stdout is not None:
            assert out.stdout.splitlines() == self.stdout, out.stdout + out.stderr


@dataclasses.dataclass
class Session:
    """The block run after its page's app (``prelude``): see ``session_script``."""

    prelude: str = USAGE
    config: dict[str, object] = dataclasses.field(default_factory=dict)
    defs: str = ""
    setup: str = ""
    after: str = ""
    in_task_from: str | None = None
    as_function: bool = False
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    subs: tuple[tuple[str, str], ...] = ()
    why: str = ""

    def run(self, block: Block, reader: Reader) -> None:
        text = block.code
        for old, new in self.subs:
            assert old in text, f"substitution {old!r} not in the block"
            text = text.replace(old, new)
        for path, content in self.files.items():
            reader.write(path, content)
        script = session_script(
            self.prelude, text, config=self.config, defs=self.defs, setup=self.setup,
            after=self.after, in_task_from=self.in_task_from, as_function=self.as_function,
        )  # fmt: skip
        reader.write("session.py", script)
        reader.python("session.py")


@dataclasses.dataclass
class ConfigFile:
    """Each statement of the block (alternatives, in the docs) as the config file of
    an app: ``init_app`` must accept it."""

    subs: tuple[tuple[str, str], ...] = ()
    why: str = ""

    def run(self, block: Block, reader: Reader) -> None:
        text = block.code
        for old, new in self.subs:
            assert old in text, f"substitution {old!r} not in the block"
            text = text.replace(old, new)
        for i, node in enumerate(ast.parse(text).body):
            reader.write(f"config{i}.py", ast.get_source_segment(text, node) or "")
            reader.write(
                f"load{i}.py",
                IMPORTS + f"app = Flask('docs_config')\napp.config['SECRET_KEY'] = {SECRET!r}\n"
                f"app.config.from_pyfile('config{i}.py')\nCelery(app)\n",
            )  # fmt: skip
            reader.python(f"load{i}.py")


@dataclasses.dataclass
class Run:
    """A short command: it must exit with ``exit``; ``worker``: while a worker of the
    project runs."""

    exit: int = 0
    worker: bool = False
    stdin: str | None = None


@dataclasses.dataclass
class Serve:
    """A long-running command: it must print ``ready`` (or, with ``probe``, the probe
    command must succeed), then it is stopped with ``stop``."""

    ready: str = r"@\S+ ready\."
    count: int = 1
    probe: str | None = None
    stop: int = signal.SIGTERM


@dataclasses.dataclass
class Commands:
    """Shell lines (console blocks: the ``$`` lines; the rest is sample output) run in
    the ``project`` directory; ``lines`` maps a part of a line to its plan (default
    ``Run()``); ``subs`` replace placeholders first."""

    project: dict[str, str] = dataclasses.field(default_factory=dict)
    lines: dict[str, Run | Serve | Exempt] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    subs: tuple[tuple[str, str], ...] = ()
    why: str = ""

    def commands(self, block: Block) -> list[str]:
        text = block.code
        for old, new in self.subs:
            assert old in text, f"substitution {old!r} not in the block"
            text = text.replace(old, new)
        lines = text.splitlines()
        if block.lang == "console":
            return [line[2:] for line in lines if line.startswith("$ ")]
        return [line for line in lines if line.strip() and not line.startswith("#")]

    def succeeds(self, reader: Reader, line: str) -> bool:
        return reader.shell(line, env=self.env, check=False).returncode == 0

    def plan(self, line: str) -> Run | Serve | Exempt:
        return next((plan for part, plan in self.lines.items() if part in line), Run())

    def run(self, block: Block, reader: Reader) -> None:
        for path, text in self.project.items():
            reader.write(path, text)
        worker = None
        for line in self.commands(block):
            plan = self.plan(line)
            if isinstance(plan, Exempt):
                continue
            if isinstance(plan, Serve):
                proc = reader.serve(line, plan.ready, count=plan.count, env=self.env)
                if plan.probe is not None:
                    wait_until(functools.partial(self.succeeds, reader, plan.probe))
                reader.stop(proc, plan.stop)
                continue
            if plan.worker and worker is None:
                worker = reader.serve(
                    "flask --app my_app:create_app celery worker -n foo@%h",
                    r"ready\.",
                    env=self.env,
                )
            out = reader.shell(line, env=self.env, stdin=plan.stdin, check=False)
            assert out.returncode == plan.exit, (
                f"{line!r} exited with {out.returncode}, expected {plan.exit}:\n"
                f"{out.stdout}\n{out.stderr}"
            )
        if worker is not None:
            reader.stop(worker)


_project_runs: dict[str, str] = {}


@dataclasses.dataclass
class Project:
    """Several blocks that make one project (files named by their first-line comment
    or given here): its test suite runs once, and must print ``expect``."""

    name: str
    files: dict[str, str | tuple[str, str]]  # path: text, or (page, key) of a block
    expect: str
    why: str = ""

    def run(self, block: Block, reader: Reader) -> None:
        if self.name in _project_runs:
            assert self.expect in _project_runs[self.name]
            return
        for path, text in self.files.items():
            reader.write(path, code(*text) if isinstance(text, tuple) else text)
        out = reader.python(
            "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
            env={"FLASK_EXECUTE_TEST_BROKER": reader.broker_url}, timeout=300,
        )  # fmt: skip
        _project_runs[self.name] = out.stdout
        assert self.expect in out.stdout, out.stdout + out.stderr


@dataclasses.dataclass
class Custom:
    """A plan of its own (below)."""

    run: t.Callable[[Block, Reader], None]
    why: str = ""


@dataclasses.dataclass
class Pending:
    """A plan that fails today because of work still being done elsewhere (``issue``
    names it): the block still runs, as a strict xfail, so it is noticed once fixed."""

    plan: Script | Session | ConfigFile | Commands | Project | Custom
    issue: str

    def run(self, block: Block, reader: Reader) -> None:
        self.plan.run(block, reader)


Plan = Exempt | Script | Session | ConfigFile | Commands | Project | Custom | Pending


def wait_until(predicate: t.Callable[[], bool], timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


# --- custom plans ------------------------------------------------------------------------------
def run_demo(block: Block, reader: Reader) -> None:
    """``make demo`` is ``.venv`` (created from the package index) plus
    ``python examples/demo.py``; this runs the latter, from a copy (the demo writes its
    logs next to itself)."""
    shutil.copy(ROOT / "examples" / "demo.py", reader.cwd / "demo.py")
    out = reader.python("demo.py", timeout=180)
    assert "Hello from the app context" in out.stdout, out.stdout


def userproject_layout(block: Block, reader: Reader) -> None:
    """The tree of docs/testing.md is examples/userproject, file for file."""
    listed = {
        line.split("── ")[1]
        for line in block.code.splitlines()
        if "── " in line and not line.rstrip().endswith("/")
    }
    project = ROOT / "examples" / "userproject"
    actual = {p.name for p in project.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert listed == actual


def deployment_env(block: Block, reader: Reader) -> None:
    """docs/deployment.md's factory reads the env file of the next block: build it,
    with that file in the environment, and check what it read."""
    reader.write("my_app.py", IMPORTS + "celery = Celery()\n\n\n"
                 + code("docs/deployment.md", "def create_app():"))  # fmt: skip
    reader.write("check_env.py", textwrap.dedent(
        """
        from my_app import create_app

        app = create_app()
        print(app.config["CELERY_START_LOCAL_WORKERS"], app.config["CELERY_BROKER_URL"])
        """
    ))  # fmt: skip
    out = reader.python("check_env.py", env=deployment_environment(reader))
    assert out.stdout.split() == ["False", reader.broker_url]


def deployment_environment(reader: Reader) -> dict[str, str]:
    """The env file of docs/deployment.md, its placeholders replaced: the secrets
    (``...``) by real ones, the broker (``redis.internal``) by the harness's."""
    env = {}
    for line in code("docs/deployment.md", "# /etc/my_app/env").splitlines():
        if line.startswith("FLASK_"):
            key, value = line.split("=", 1)
            env[key] = value
    env["FLASK_SECRET_KEY"] = SECRET
    env["FLASK_CELERY_SIGNING_KEY"] = SECRET[::-1]
    assert env["FLASK_CELERY_BROKER_URL"] == "redis://redis.internal:6379/0"
    env["FLASK_CELERY_BROKER_URL"] = reader.broker_url
    return env


def deployment_commands(block: Block, reader: Reader) -> None:
    reader.write("my_app.py", IMPORTS + "celery = Celery()\n\n\n"
                 + code("docs/deployment.md", "def create_app():"))  # fmt: skip
    env = deployment_environment(reader)
    commands = Commands(env=env, lines={
        "celery worker": Serve(),
        "celery status": Run(exit=0, worker=True),
    })  # fmt: skip
    commands.run(block, reader)


# --- the plans ---------------------------------------------------------------------------------
WEB1 = ("web1", HOST)
BEAT = r"maxinterval -> "  # the end of beat's banner, printed at any log level
TASK_ID = ("5eb7e7b0-...", str(uuid.uuid4()))
REPORTS_WORKER = {"CELERY_WORKERS": {"worker1": {"queues": ["celery", "reports"]}}}
SHOP_FILES = {"shop.py": ("docs/testing.md", "# shop.py"),
              "tests/conftest.py": ("docs/testing.md", "# tests/conftest.py"),
              "pytest.ini": "[pytest]\npythonpath = .\n"}  # fmt: skip
ADD = "def add(x, y):\n    return x + y\n"
# the last (the dict) of docs/workers-and-queues.md's CELERY_WORKERS examples
PAGE_WORKERS = ast.literal_eval(
    ast.parse(code("docs/workers-and-queues.md", "CELERY_WORKERS = 2")).body[-1].value  # type: ignore[attr-defined]
)
USERPROJECT = Project(
    "userproject",
    {**SHOP_FILES, "tests/test_shop.py": ("docs/testing.md", "# tests/test_shop.py")},
    "2 passed",
    why="pytest.ini as in examples/userproject (the block does not show it)",
)
INSTALL = Exempt(
    "installs from the package index and a repository URL; test_docs checks what the"
    " install instructions say and the version that makes them necessary"
)
MAKE = Commands(
    lines={"make demo": Exempt("see the plan of README.md's `make demo`"),
           "make test": Exempt("runs this test suite")},
)  # fmt: skip
PRODUCTION = Commands(
    project=my_app("CELERY_START_LOCAL_WORKERS = False\n" + CLI_CONFIG),
    lines={"celery worker": Serve(), "celery beat": Serve(BEAT)},
)
ENV_APP = {"FLASK_APP": "my_app:create_app"}
SERVICE_UNIT = Exempt(
    "a systemd/supervisor unit for a server: its command is the `flask ... celery"
    " worker -n foo@%h` (%%h is systemd's escape of %h) run by cli.md's and"
    " deployment.md's command blocks"
)
OUTPUT = Exempt("sample output or a log line, shown, not run")
TEMPLATE = Exempt("a template of the command the extension builds (<placeholders>), not a command")

# fmt: off
PLANS: dict[tuple[str, str], Plan] = {  # (page, the start of the block's first line): plan
    # --- README.md ---
    ("README.md", "make demo"): Custom(
        run_demo, why="`make demo` = a .venv from the index + examples/demo.py; `make test`"
        " runs this suite (so its line is not run here)"),
    ("README.md", "git clone"): INSTALL,
    ("README.md", "from flask import Flask"): Script("usage.py", stdout=["3"]),
    ("README.md", "celery = Celery()"): Script(
        "my_app/__init__.py", prefix=IMPORTS,
        files={"my_app/config.py": f"SECRET_KEY = {SECRET!r}\n"},
        driver="""
            import operator
            from my_app import celery, create_app

            app = create_app()
            with app.app_context():
                print(celery.submit(operator.add, 1, 2).result(timeout=30))
            """,
        stdout=["3"],
        why="the block continues the example above (its imports), as my_app/__init__.py;"
        " its `my_app.config` holds the SECRET_KEY"),
    ("README.md", "future = celery.submit(add, 1, y=2)"): Session(
        config={"CELERY_WORKERS": {"worker1": {"queues": ["celery", "high-priority"]}}},
        defs="def fn(future):\n    print('done:', future.result())\n",
        in_task_from="from flask_execute import current_task",
        why="`fn` is the reader's; the last two lines say 'inside a task': they run in one;"
        " a worker consumes the queue the block sends to (else the script's exit waits"
        " CELERY_EXIT_WAIT for that call)"),
    ("README.md", "celery.apply(notify"): Session(
        defs="def notify(user_id, queue):\n    return f'{user_id} via {queue}'\n",
        setup="user_id = 7", after="assert _.result(timeout=30) == '7 via email'"),
    ("README.md", 'with celery.executor(queue="reports")'): Session(
        config=REPORTS_WORKER,
        defs="def thumbnail(path, size):\n    return f'{path}@{size}'\n",
        setup="paths, sizes = ['a.png', 'b.png'], [64, 128]",
        after="assert results == ['a.png@64', 'b.png@128']",
        why="a worker must consume the queue 'reports' the block sends to"),
    ("README.md", "@celery.task"): Session(after="assert _.get(timeout=30) == 3"),
    ("README.md", "CELERY_WORKERS = {"): Session(),
    ("README.md", "flask --app my_app:create_app celery cluster"): Commands(
        project=my_app(CLI_CONFIG),
        lines={"celery cluster": Serve(stop=signal.SIGINT), "celery worker": Serve(),
               "celery status": Run(exit=1), "inspect stats": Run(worker=True)},
        why="`status` runs with no worker (exit 1, as its comment says); `inspect stats`"
        " with foo running"),
    ("README.md", "def test_invoice("): Project(
        "readme-invoice",
        {**SHOP_FILES, "tests/test_readme.py": "from shop import celery\n"
         "from shop import invoice_total\n\n\n" + code("README.md", "def test_invoice(")},
        "1 passed", why="the test of docs/testing.md's shop project, with its imports"),
    ("README.md", "CELERY_START_LOCAL_WORKERS = False"): ConfigFile(),
    ("README.md", "flask --app my_app:create_app celery worker -n foo@%h"): PRODUCTION,
    # --- docs/cli.md ---
    ("docs/cli.md", "flask --app my_app:create_app celery --help"): Commands(
        project=my_app(CLI_CONFIG), lines={"celery worker": Serve()}),
    ("docs/cli.md", "flask celery worker"): Commands(
        project=my_app(CLI_CONFIG), env=ENV_APP,
        lines={"--loglevel=warning": Serve(ready=r"celery@", probe="flask celery status"),
               "worker --help": Run(), "celery worker": Serve()},
        why="FLASK_APP is set, as the page's first block shows; at --loglevel=warning the"
        " worker prints no 'ready': `flask celery status` says when it is"),
    ("docs/cli.md", "CELERY_WORKERS = {"): ConfigFile(),
    ("docs/cli.md", "flask celery beat"): Commands(
        project=my_app(CLI_CONFIG), env=ENV_APP, lines={"beat": Serve(BEAT)}),
    ("docs/cli.md", "flask celery flower"): Commands(
        project=my_app(CLI_CONFIG), env=ENV_APP, lines={"flower": Serve(r"Visit me at")},
        subs=(("--port=8080", "--port=0"),),
        why="port 8080 may be taken on a shared machine: Flower picks a free one (0)"),
    ("docs/cli.md", "$ flask --app my_app:create_app celery cluster"): Commands(
        project=my_app(CLI_CONFIG), lines={"cluster": Serve(stop=signal.SIGINT)}),
    ("docs/cli.md", "$ flask celery status"): Commands(
        project=my_app(CLI_CONFIG), env=ENV_APP, lines={"status": Run(worker=True)}),
    ("docs/cli.md", "flask celery inspect ping"): Commands(
        project=my_app(CLI_CONFIG), env=ENV_APP, lines={"inspect": Run(worker=True)},
        subs=(WEB1, TASK_ID), why="web1 is the docs' host name; 5eb7e7b0-... a task id"),
    ("docs/cli.md", "flask celery control pool_grow 1"): Commands(
        project=my_app(CLI_CONFIG), env=ENV_APP, subs=(WEB1, TASK_ID),
        lines={"autoscale": Run(exit=1, worker=True), "control": Run(worker=True)},
        why="web1 is the docs' host name; 5eb7e7b0-... a task id; foo runs without"
        " --autoscale (pool_grow refuses to run with it), so `autoscale` gets an error"
        " reply from every node and exits 1, as the page says"),
    ("docs/cli.md", "flask celery report"): Commands(
        project=my_app(CLI_CONFIG), env=ENV_APP,
        lines={"celery events": Exempt("the curses monitor needs a terminal"),
               "celery shell": Run(stdin="")},
        why="the shell reads its commands from stdin: an empty one ends it"),
    ("docs/cli.md", "FLASK_APP=my_app:create_app celery -A flask_execute.celery worker"):
        Commands(project=my_app(CLI_CONFIG),
                 lines={"worker": Serve(), "beat": Serve(BEAT)}),
    ("docs/cli.md", "CELERY_START_LOCAL_WORKERS = False"): ConfigFile(),
    ("docs/cli.md", "flask --app my_app:create_app celery worker -n foo@%h"): PRODUCTION,
    ("docs/cli.md", "# /etc/systemd/system/"): SERVICE_UNIT,
    ("docs/cli.md", "; /etc/supervisor/"): SERVICE_UNIT,
    # --- docs/configuration.md ---
    ("docs/configuration.md", "CELERY_WORKERS = {"): ConfigFile(),
    # --- docs/deployment.md ---
    ("docs/deployment.md", "CELERY_START_LOCAL_WORKERS = False"): ConfigFile(),
    ("docs/deployment.md", "def create_app():"): Custom(deployment_env),
    ("docs/deployment.md", "# /etc/my_app/env"): Custom(
        deployment_env, why="the env file the factory above reads"),
    ("docs/deployment.md", "flask --app my_app:create_app celery worker"): Custom(
        deployment_commands, why="with the page's my_app and env file"),
    ("docs/deployment.md", "# /etc/systemd/system/"): SERVICE_UNIT,
    ("docs/deployment.md", "systemctl enable"): Exempt("systemd on a server, as root"),
    ("docs/deployment.md", "; /etc/supervisor/"): SERVICE_UNIT,
    ("docs/deployment.md", "flask --app my_app:create_app celery status"): Custom(
        deployment_commands, why="with the page's my_app and env file"),
    ("docs/deployment.md", 'CELERY_BROKER_URL = "redis://'): ConfigFile(),
    ("docs/deployment.md", 'CELERY_BROKER_URL = "amqp://'): ConfigFile(),
    ("docs/deployment.md", "appendonly yes"): Exempt("redis.conf, not Python"),
    # --- docs/dependencies.md ---
    ("docs/dependencies.md", "import time"): Script(
        "pipeline.py", stdout=["PENDING", "user 7 spent 50"]),
    ("docs/dependencies.md", "pool = celery.map(add, *[(i, i) for i in range(100)])"): Session(),
    ("docs/dependencies.md", "from flask_execute import DependencyError"): Session(),
    # --- docs/futures.md ---
    ("docs/futures.md", "Task my_app:add[5eb7...] not done"): OUTPUT,
    ("docs/futures.md", "Task my_app:report[9c1d...] not done"): OUTPUT,
    ("docs/cli.md", "[... WARNING/MainProcess] flask-execute: worker celery@web1"): OUTPUT,
    ("docs/local-services.md", "* flask-execute: worker worker1 started"): OUTPUT,
    ("docs/reliability.md", "| fault, delivery | accepted |"): OUTPUT,
    ("docs/futures.md", "f = celery.submit(report, countdown=60)"): Session(
        defs="def report():\n    return 'report'\n"),
    ("docs/futures.md", "task_id = celery.submit(build_report"): Session(
        defs="def build_report(user_id):\n    return f'report for {user_id}'\n",
        setup="user_id = 7", as_function=True,
        after="assert future.result(timeout=30) == 'report for 7'",
        why="its `return` is a view's: the block runs as one"),
    ("docs/futures.md", "import asyncio"): Session(
        after="assert asyncio.run(handler()) == (3, 7, 11)"),
    ("docs/futures.md", "import concurrent.futures as cf"): Session(
        defs="def fetch(url):\n    return len(url)\n",
        setup="urls = ['https://a.example', 'https://bb.example']"),
    ("docs/futures.md", "pool = celery.map(add, *[(i, i)"): Session(
        after="assert _ == 2 * sum(range(10_000))"),
    # --- docs/index.md ---
    ("docs/index.md", "from flask import Flask"): Script("usage.py", stdout=["3"]),
    # --- docs/local-services.md ---
    ("docs/local-services.md", "<sys.executable> -m celery -A flask_execute.celery worker"):
        TEMPLATE,
    ("docs/local-services.md", "<sys.executable> -m celery -A flask_execute.celery beat"):
        TEMPLATE,
    ("docs/local-services.md", "<sys.executable> -m celery -A flask_execute.celery flower"):
        TEMPLATE,
    ("docs/local-services.md", "WARNING flask_execute.local"): OUTPUT,
    ("docs/local-services.md", "/home/me/usage.py sends a task"): Exempt(
        "a sample of the error; tests/test_scripts.py checks the real one"),
    ("docs/local-services.md", "flask --app my_app:create_app celery worker"): PRODUCTION,
    # --- docs/map.md ---
    ("docs/map.md", "pool = celery.map(add, (1, 2)"): Session(),
    ("docs/map.md", "pool = celery.map_apply(notify"): Session(
        defs="def notify(user_id, queue):\n    return f'{user_id} via {queue}'\n",
        after="assert pool.result(timeout=30) == [f'{i} via email' for i in (1, 2, 3)]"),
    ("docs/map.md", "results = pool.result(timeout=600, progress=True)"): Session(
        setup="pool = celery.map(add, *[(i, i) for i in range(20)])",
        after="assert results == [2 * i for i in range(20)]"),
    ("docs/map.md", "for future in pool.as_completed("): Session(
        defs="import logging\n\nlog = logging.getLogger('docs')\n",
        setup="pool = celery.map(add, *[(i, i) for i in range(5)])"),
    ("docs/map.md", "# with concurrent.futures.ProcessPoolExecutor()"): Session(
        config=REPORTS_WORKER,
        defs="def build_report(user_id, fmt='html'):\n    return f'{user_id}.{fmt}'\n\n\n"
        "def thumbnail(path, size):\n    return f'{path}@{size}'\n",
        setup="user_id, paths, sizes = 7, ['a.png', 'b.png'], [64, 128]",
        after="assert future.result(timeout=30) == '7.pdf'",
        why="a worker must consume the queue 'reports' the block sends to"),
    ("docs/map.md", "with celery.executor() as executor:"): Session(
        defs="from flask_execute import progress\n\n\n"
        "def resize(path):\n    return path.upper()\n",
        setup="paths = ['a.png', 'b.png']",
        after="assert [f.result() for f in futures] == ['A.PNG', 'B.PNG']",
        why="`progress` was imported by the page's earlier block"),
    # --- docs/quickstart.md ---
    ("docs/quickstart.md", "make demo"): MAKE,
    ("docs/quickstart.md", "git clone"): INSTALL,
    ("docs/quickstart.md", "# app.py"): Script("app.py", stdout=[]),
    ("docs/quickstart.md", "from flask import Flask"): Script(
        "my_app.py", env={"FLASK_SECRET_KEY": SECRET},
        driver="""
            import operator
            from my_app import celery, create_app

            app = create_app()
            if __name__ == "__main__":
                with app.app_context():
                    print(celery.submit(operator.add, 1, 2).result(timeout=30))
            """,
        stdout=["3"], why="the factory reads its config from FLASK_* variables: the reader"
        " sets FLASK_SECRET_KEY"),
    ("docs/quickstart.md", "def add(x, y):"): Session(
        prelude=QUICKSTART_APP,
        after="assert app.test_client().post('/add').json['result'] == 3",
        why="the view answers a POST, as `flask run` would serve it"),
    ("docs/quickstart.md", "factor = 10"): Session(prelude=QUICKSTART_APP),
    ("docs/quickstart.md", "future = celery.submit(add, 1, 2)"): Session(
        prelude=QUICKSTART_APP, defs=ADD, why="`add` is the page's, from step 3"),
    ("docs/quickstart.md", "pool = celery.map(add, [1, 2]"): Session(
        prelude=QUICKSTART_APP, defs=ADD, why="`add` is the page's, from step 3"),
    ("docs/quickstart.md", "from flask import current_app"): Session(
        prelude=QUICKSTART_APP, config={"EXPORT_DIR": "/srv/exports"},
        after="assert celery.submit(export, 3).result(timeout=30) == '/srv/exports'",
        why="the block reads EXPORT_DIR from the app's config"),
    # --- docs/security.md ---
    ("docs/security.md", "fe1.<header>"): Exempt("the envelope's format"),
    ("docs/security.md", "flask-execute rejected task"): OUTPUT,
    ("docs/security.md", "SignatureError: A worker refused"): OUTPUT,
    ("docs/security.md", "import logging"): Session(
        defs="my_alert_handler = logging.NullHandler()\n",
        after="assert my_alert_handler in"
        " logging.getLogger('flask_execute.security').handlers"),
    ("docs/security.md", "CELERY_ENCRYPT = True"): Session(
        after="assert celery.submit(add, 1, 2).result(timeout=30) == 3"),
    ("docs/security.md", "fe1.<header, clear>"): Exempt("the envelope's format"),
    ("docs/security.md", "Refusing to use /run/user/1000/"): OUTPUT,
    ("docs/security.md", "flask_execute.errors.SignatureError: Refusing the boot"): OUTPUT,
    ("docs/security.md", "Task my_app.reports:build"): OUTPUT,
    # --- docs/design.md ---
    ("docs/design.md", "web process"): Exempt("a drawing of the modules, not code"),
    # --- docs/streaming.md ---
    ("docs/streaming.md", "# jobs.py"): Script(
        "jobs.py",
        driver="""
            from jobs import app

            if __name__ == "__main__":
                owner, stranger = app.test_client(), app.test_client()
                job = owner.post("/jobs").json
                print(stranger.get(job["events"]).status_code)
                body = owner.get(job["events"]).get_data(as_text=True)
                print(body.strip().splitlines()[-1])
                print(body.count('"state": "PROGRESS"'))
            """,
        stdout=["404", 'data: {"result": "3 steps done", "state": "SUCCESS"}', "3"],
        why="a client that started the job, and one that did not, follow it"),
    ("docs/streaming.md", "const events = new EventSource"): Exempt(
        "browser JavaScript: examples/progress/ follows its job this way, in Chromium"
        " (tests/test_progress_page.py)"),
    ("docs/streaming.md", "retry: 2000"): OUTPUT,
    ("docs/streaming.md", "from flask import Blueprint"): Script(
        "streams.py",
        driver=f"""
            import operator
            from flask import Flask
            from flask_execute import Celery
            from streams import streams

            app = Flask(__name__)
            app.config["SECRET_KEY"] = {SECRET!r}
            celery = Celery(app)
            app.register_blueprint(streams)
            if __name__ == "__main__":
                with app.app_context():
                    future = celery.submit(operator.add, 1, 2)
                client = app.test_client()
                print(client.get(f"/jobs/{{future.id}}/events").status_code)
                with client.session_transaction() as session:
                    session["jobs"] = [future.id]
                print(client.get(f"/jobs/{{future.id}}/events").get_data(as_text=True).strip()
                      .splitlines()[-1])
            """,
        stdout=["404", 'data: {"result": 3, "state": "SUCCESS"}'],
        why="the blueprint on an app; the session says which job may be followed"),
    # --- docs/tasks-and-schedules.md ---
    ("docs/tasks-and-schedules.md", "from flask_execute import Celery"): Script(
        "my_tasks.py",
        driver=f"""
            from flask import Flask
            from my_tasks import add, celery

            app = Flask(__name__)
            app.config["SECRET_KEY"] = {SECRET!r}
            celery.init_app(app)
            if __name__ == "__main__":
                with app.app_context():
                    print(add.delay(1, 2).get(timeout=30))
            """,
        stdout=["3"], why="the block's module, used by an app"),
    ("docs/tasks-and-schedules.md", "# direct"): Script(
        "both.py", prefix=IMPORTS,
        driver="""
            from both import add, celery, create_app

            app = create_app()
            if __name__ == "__main__":
                with app.app_context():
                    print(add.delay(1, 2).get(timeout=30))
            """,
        stdout=["3"], why="the block continues the page's imports"),
    ("docs/tasks-and-schedules.md", "result = add.delay(1, 2)"): Session(
        prelude="from my_app import celery, create_app\nfrom my_app.tasks import add\n\n"
        "app = create_app()\n", files=my_app(),
        why="the page's `add` is my_app.tasks.add"),
    ("docs/tasks-and-schedules.md", "@celery.task"): Session(),
    ("docs/tasks-and-schedules.md", "from celery import Task"): Script(
        "tasks_base.py", prefix=IMPORTS,
        driver=f"""
            import operator
            from flask import Flask
            from tasks_base import celery

            app = Flask(__name__)
            app.config["SECRET_KEY"] = {SECRET!r}
            celery.init_app(app)
            if __name__ == "__main__":
                with app.app_context():
                    print(celery.submit(operator.add, 1, 2).result(timeout=30))
            """,
        stdout=["3"], why="the block continues the page's imports; an app uses it"),
    ("docs/tasks-and-schedules.md", "import datetime"): Session(
        after="assert {'midnight', 'solar-task'} <= set(celery.controller.conf.beat_schedule)"),
    ("docs/tasks-and-schedules.md", '@celery.schedule(hour=0, minute=0, name="report-'):
        Session(after="assert {'report-midnight', 'report-noon'}"
                " <= set(celery.controller.conf.beat_schedule)"),
    ("docs/tasks-and-schedules.md", "CELERYBEAT_SCHEDULE = {"): ConfigFile(
        subs=(("{...}", "{}"),), why="`{...}` stands for a schedule"),
    # --- docs/testing.md ---
    ("docs/testing.md", "userproject/"): Custom(userproject_layout),
    ("docs/testing.md", "# shop.py"): USERPROJECT,
    ("docs/testing.md", "# tests/conftest.py"): USERPROJECT,
    ("docs/testing.md", "# tests/test_shop.py"): USERPROJECT,
    ("docs/testing.md", "CELERY_ALWAYS_EAGER = True"): Session(
        after="f = celery.submit(add, 1, 2)\nassert f.done() and f.result(timeout=0) == 3"),
    ("docs/testing.md", "def test_add(app, flask_execute_eager):"): Project(
        "testing-eager",
        {**SHOP_FILES, "tests/test_eager.py": "import pytest\nfrom shop import celery\n\n\n"
         + ADD + "\n\ndef check_positive(x):\n    if x < 0:\n"
         "        raise ValueError(f'{x} is negative')\n    return x\n\n\n"
         + code("docs/testing.md", "def test_add(app, flask_execute_eager):")},
        "2 passed",
        why="the shop project's fixtures; `add` and `check_positive` are the reader's"),
    ("docs/testing.md", "# conftest.py"): Project(
        "testing-session",
        {"conftest.py": ("docs/testing.md", "# conftest.py"),
         "my_app.py": IMPORTS + "celery = Celery()\n\n\ndef create_app(config=None):\n"
         "    app = Flask(__name__)\n    app.config.update(config or {})\n"
         "    celery.init_app(app)\n    return app\n\n\n" + ADD,
         "test_app.py": "from my_app import add, celery\n\n\ndef test_add(app):\n"
         "    assert celery.submit(add, 1, 2).result(timeout=30) == 3\n"},
        "1 passed", why="my_app is a factory taking a config dict, as the block calls it"
        " (with a default: local workers call the factory without arguments)"),
    # --- docs/workers-and-queues.md ---
    ("docs/workers-and-queues.md", "CELERY_WORKERS = 2"): ConfigFile(),
    ("docs/workers-and-queues.md", 'future = celery.submit(add, 1, 2, queue='): Session(
        config={"CELERY_WORKERS": {"worker1": {
            "queues": ["celery", "high-priority", "low-priority", "reports"]}}},
        defs="@celery.task\n" + ADD,
        after="assert future.result(timeout=30) == 3\n"
        "assert pool.result(timeout=30) == [3, 7]",
        why="a worker consumes the queues the block names; `add` is a registered task"),
    ("docs/workers-and-queues.md", "celery.start()"): Session(
        config={"CELERY_WORKERS": PAGE_WORKERS}, why="the page's CELERY_WORKERS"),
    ("docs/workers-and-queues.md", "celery.inspect.ping()"): Session(
        config={"CELERY_WORKERS": ["foo"]}, subs=(("foo@web1", f"foo@{HOST}"),),
        setup="celery.start()",
        why="one worker, foo, as the comments show; web1 is the docs' host name"),
    ("docs/workers-and-queues.md", "celery.control.ping()"): Session(
        config={"CELERY_WORKERS": ["foo"]}, subs=(("foo@web1", f"foo@{HOST}"),),
        setup="celery.start()\ntask_id = celery.submit(add, 1, 2, countdown=60).id",
        why="one worker, foo, as the comments show; web1 is the docs' host name; a task"
        " to revoke"),
    ("docs/workers-and-queues.md", "pip install"): INSTALL,
}
# fmt: on


def plan_key(block: Block) -> tuple[str, str] | None:
    """The entry of PLANS for ``block``: the longest start of its first line."""
    keys = [k for k in PLANS if k[0] == block.page and block.key.startswith(k[1])]
    return max(keys, key=lambda k: len(k[1]), default=None)


def plan_for(block: Block) -> Plan | None:
    key = plan_key(block)
    return None if key is None else PLANS[key]


RUN = [b for b in BLOCKS if not isinstance(plan_for(b), (Exempt, type(None)))]


# --- the tests ---------------------------------------------------------------------------------
def test_every_block_has_a_plan():
    missing = [f"{b.id}: {b.key!r}" for b in BLOCKS if plan_for(b) is None]
    assert not missing, "blocks without a plan in PLANS:\n" + "\n".join(missing)
    stale = set(PLANS) - {plan_key(b) for b in BLOCKS}
    assert not stale, f"plans for blocks that no longer exist: {sorted(stale)}"


def test_exempt_blocks_say_why():
    for block in BLOCKS:
        plan = plan_for(block)
        if isinstance(plan, Exempt):
            assert len(plan.reason.split()) >= 3, block.id


def _param(block: Block) -> t.Any:
    plan = plan_for(block)
    marks = []
    if isinstance(plan, Pending):
        marks.append(pytest.mark.xfail(strict=True, reason=plan.issue))
    return pytest.param(block, id=block.id, marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in RUN])
def test_block_runs(block, tmp_path, broker_url):
    reader = Reader(tmp_path, broker_url)
    try:
        plan = plan_for(block)
        assert plan is not None and not isinstance(plan, Exempt)
        plan.run(block, reader)
    finally:
        reader.close()

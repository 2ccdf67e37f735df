"""``flask celery ...``: run and operate Celery with the app loaded (factories too).

The commands stay thin: ``worker``, ``beat``, ``flower`` and any other Celery
subcommand run *in this process* through Celery's own CLI with this app's Celery app
(so a SIGTERM reaches the real worker, and the app is built once); ``status``,
``inspect`` and ``control`` talk to workers in process; ``cluster`` supervises every
configured service and streams their logs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup
from flask.cli import with_appcontext

from .flower import flower_login
from .flower import FLOWER_LOGIN_ENV
from .flower import stop_on_sigterm
from .processes import make_private_dir
from .runtime import Runtime
from .worker_options import worker_argv

__all__ = ["celery_cli"]

_PASS = {"ignore_unknown_options": True, "allow_extra_args": True}


def _state() -> Runtime:
    return t.cast(Runtime, _extension().runtime(current_app._get_current_object()))  # type: ignore[attr-defined]


def _extension() -> t.Any:
    """The flask-execute extension of the current app."""
    extension = current_app.extensions.get("celery")
    if extension is None:  # pragma: no cover - the group is only added by init_app
        raise click.ClickException("This app does not use flask-execute.")
    return extension


def _run_celery(argv: list[str]) -> t.NoReturn:
    """Run Celery's own CLI in this process, with this app's Celery app, and exit
    with its exit code (``celery.Celery.start`` drops it: a worker stopped by an
    unrecoverable error exited 0). Its usage lines read ``flask celery ...``."""
    from celery.bin.celery import celery as command

    group = _group_path()
    command.params[0].default = _state().controller  # what Celery.start() does
    try:
        code = command.main(args=argv, prog_name=group, standalone_mode=False)
    except click.exceptions.Exit as exc:  # pragma: no cover - click returns it
        code = exc.exit_code
    finally:
        command.params[0].default = None
    sys.exit(code if isinstance(code, int) else 0)


class CeleryGroup(AppGroup):
    """Known commands, and any other Celery subcommand passed through."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command

        @click.argument("args", nargs=-1, type=click.UNPROCESSED)
        @with_appcontext
        def passthrough(args: tuple[str, ...]) -> None:
            _run_celery([cmd_name, *args])

        return click.Command(
            cmd_name,
            callback=passthrough,
            params=passthrough.__click_params__,  # type: ignore[attr-defined]
            context_settings=_PASS,
            add_help_option=False,
            help=f"`celery {cmd_name}` with this app loaded.",
        )


celery_cli = CeleryGroup(
    "celery",
    help="Run and operate Celery for this app (any other celery subcommand passes through).",
)


def _node_name(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg in ("-n", "--hostname") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--hostname="):
            return arg.split("=", 1)[1]
        if arg.startswith("-n") and len(arg) > 2:
            return arg[2:]
    return None


@celery_cli.command(context_settings=_PASS, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(args: tuple[str, ...]) -> None:
    """Run a worker (any `celery worker` option). `-n foo@%h` applies the `foo` options
    of CELERY_WORKERS; options given here win."""
    state = _state()
    argv = list(args)
    node = _node_name(argv)
    defaults: list[str] = []
    if node is not None:
        name = node.split("@")[0]
        if name in state.settings.workers:
            options = state.worker_options(name, local=False)
            defaults = worker_argv(name, options, state.settings.log_level)[2:]  # -n stays
    # without -Q the worker consumes every queue the app routes to (consumption.py)
    if not any(a.startswith(("-l", "--loglevel")) for a in [*argv, *defaults]):
        defaults.append(f"--loglevel={state.settings.log_level}")
    _run_celery(["worker", *defaults, *argv])


@celery_cli.command(context_settings=_PASS, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def beat(args: tuple[str, ...]) -> None:
    """Run beat with the schedules of @celery.schedule and beat_schedule."""
    state = _state()
    log_dir = state.log_dir
    make_private_dir(log_dir)
    defaults = [
        f"--loglevel={state.settings.log_level}",
        f"--schedule={os.path.join(log_dir, 'celerybeat-schedule')}",
    ]
    _run_celery(["beat", *defaults, *args])


@celery_cli.command(context_settings=_PASS, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def flower(args: tuple[str, ...]) -> None:
    """Run Flower on CELERY_FLOWER_ADDRESS:CELERY_FLOWER_PORT, behind the login of
    CELERY_FLOWER_BASIC_AUTH (or a generated one, printed here)."""
    settings = _state().settings
    if "--help" in args or "-h" in args:
        _flower_help(settings.flower_address, settings.flower_port)
        return
    login, generated = flower_login(settings.flower_basic_auth)
    os.environ[FLOWER_LOGIN_ENV] = login  # Flower reads it; never on a command line
    if generated is not None:
        click.echo(
            f"Flower login: user 'flower', password {generated} (generated for this run;"
            " CELERY_FLOWER_BASIC_AUTH sets your own).",
            err=True,
        )
    defaults = [f"--address={settings.flower_address}", f"--port={settings.flower_port}"]
    stop_on_sigterm()
    _run_celery(["flower", *defaults, *args])


def _group_path() -> str:
    ctx = click.get_current_context(silent=True)
    return ctx.parent.command_path if ctx is not None and ctx.parent else "flask celery"


def _flower_help(address: str, port: int) -> None:
    """Flower's own options (Tornado options: Flower's click command lists none)."""
    click.echo(
        f"Usage: {_group_path()} flower [--option=value ...]\n\n"
        "  Run Flower for this app, behind a login (CELERY_FLOWER_BASIC_AUTH, or one"
        " generated\n  and printed once). Defaults: --address="
        f"{address} --port={port} (CELERY_FLOWER_ADDRESS,\n  CELERY_FLOWER_PORT);"
        " options given here win.\n"
    )
    try:
        from flower.options import options
    except ImportError:
        raise click.ClickException(
            "Flower is not installed: pip install 'flask-execute[flower]'."
        ) from None
    import io

    out = io.StringIO()
    options.print_help(out)
    # Tornado prints every module's options under its file name: keep Flower's
    text = out.getvalue()
    marker = os.path.join("flower", "options.py options:")
    start = text.find(marker)
    if start >= 0:
        text = "Flower's options:" + text[start + len(marker) :]
    click.echo(text.rstrip())


@celery_cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for replies.")
def status(as_json: bool, timeout: float) -> None:
    """Which workers answer a ping. Exit code 1 when none does."""
    replies = _extension().status(timeout=timeout)
    if as_json:
        click.echo(json.dumps(replies, indent=2, sort_keys=True))
    elif replies:
        width = max(len(node) for node in replies)
        for node, answer in sorted(replies.items()):
            click.echo(f"{node:<{width}}  {answer}")
        click.echo(f"\n{len(replies)} node{'s' if len(replies) != 1 else ''} online.")
    else:
        click.echo("No worker answered.", err=True)
    if not replies:
        sys.exit(1)


def _value(text: str) -> t.Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _remote(kind: str, command: str, args: tuple[str, ...], timeout: float,
            destination: tuple[str, ...]) -> None:  # fmt: skip
    extension = _extension()
    proxy = extension.inspect if kind == "inspect" else extension.control
    try:
        method = getattr(proxy, command)
    except AttributeError as exc:
        raise click.UsageError(str(exc)) from None
    nodes = list(destination) or None
    if command == "shutdown":
        # workers do not answer a shutdown: ask who is there first
        replies = {
            node: {"ok": "shutting down"}
            for node in extension.inspect.ping(timeout=timeout, destination=nodes)
        }
        if replies:
            method(timeout=timeout, destination=list(replies))
    else:
        replies = method(*[_value(a) for a in args], timeout=timeout, destination=nodes)
    click.echo(json.dumps(replies, indent=2, sort_keys=True, default=str))
    if not replies:
        click.echo("No worker answered.", err=True)
        sys.exit(1)
    failed = [n for n, r in replies.items() if isinstance(r, dict) and set(r) == {"error"}]
    if len(failed) == len(replies):
        click.echo(f"Every node replied with an error ({', '.join(sorted(failed))}).", err=True)
        sys.exit(1)


_timeout = click.option("--timeout", "-t", default=1.0, show_default=True,
                        help="Seconds to wait for replies.")  # fmt: skip
_destination = click.option("--destination", "-d", multiple=True,
                            help="Only ask this node (repeatable).")  # fmt: skip


@celery_cli.command()
@click.argument("command")
@click.argument("args", nargs=-1)
@_timeout
@_destination
def inspect(command: str, args: tuple[str, ...], timeout: float,
            destination: tuple[str, ...]) -> None:  # fmt: skip
    """Inspect workers: ping, active, scheduled, reserved, revoked, registered, stats,
    active_queues, conf, ... Prints JSON."""
    _remote("inspect", command, args, timeout, destination)


@celery_cli.command()
@click.argument("command")
@click.argument("args", nargs=-1)
@_timeout
@_destination
def control(command: str, args: tuple[str, ...], timeout: float,
            destination: tuple[str, ...]) -> None:  # fmt: skip
    """Control workers: shutdown, pool_restart, pool_grow N, pool_shrink N,
    autoscale MAX MIN, rate_limit TASK RATE, add_consumer QUEUE, ... Prints replies."""
    _remote("control", command, args, timeout, destination)


@celery_cli.command()
def cluster() -> None:
    """Run every configured worker, plus beat (when a schedule exists) and Flower (when
    installed and enabled), streaming their logs. Ctrl-C or SIGTERM stops them all."""
    state = _state()
    services = state.services
    log_dir = state.log_dir
    sizes = _log_sizes(log_dir)

    def stop_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_signal)
    code = 0
    try:
        services.start()
        if not services.owner:
            click.echo(
                "[cluster] another process on this host already runs this app's services"
                f" (lock in {state.runtime_dir}); its workers answer. Waiting: this"
                " command takes over if that process ends (Ctrl-C stops waiting).",
                err=True,
            )
        code = _supervise(services, sizes)
    except KeyboardInterrupt:
        click.echo("[cluster] stopping")
    finally:
        children = services.children
        services.stop(timeout=10)
        _stream(children, sizes)  # what they wrote while stopping
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code)


def _supervise(services: t.Any, sizes: dict[str, int]) -> int:
    """Stream logs until a service is given up (exit code 1) or we are interrupted.
    Dead services are restarted by the local-services supervisor."""
    announced = False
    while True:
        if services.owner and not announced:
            names = ", ".join(c.name for c in services.children)
            click.echo(f"[cluster] running {names} (Ctrl-C stops)")
            if services.flower_url:
                click.echo(f"[cluster] Flower: {services.flower_url}")
            announced = True
        _stream(services.children, sizes)
        if services.given_up:
            for name in services.given_up:
                click.echo(f"[cluster] {name} kept dying; giving up")
            return 1
        time.sleep(0.2)


def _log_sizes(log_dir: str) -> dict[str, int]:
    sizes = {}
    if os.path.isdir(log_dir):
        for name in os.listdir(log_dir):
            path = os.path.join(log_dir, name)
            if name.endswith(".log") and os.path.isfile(path):
                sizes[path] = os.path.getsize(path)
    return sizes


def _stream(children: t.Sequence[t.Any], sizes: dict[str, int]) -> None:
    """Print what each child appended to its log since last time."""
    for child in children:
        path = child.log_path
        try:
            with open(path, "rb") as f:
                f.seek(sizes.get(path, 0))
                data = f.read()
                sizes[path] = f.tell()
        except OSError:
            continue
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                click.echo(f"[{child.name}] {line}")

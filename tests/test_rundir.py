"""The attacker is another user of the same machine (issue 10, item 3).

Per-user state (the development signing key, lock files, boot files, the embedded
Redis's socket) used to live in ``/tmp/flask-execute-<uid>``: another user planted a
symbolic link there that the check followed, handed the app their own signing key,
and swapped the boot pickle a worker loaded, running code as the victim (root).

These tests run as root (as CI does) and play that other user for real: they create
directories, files and links owned by uid 65534 (``nobody``) where the app keeps its
state, and check that the app refuses them with an error naming the path, what is
wrong and the fix, and that nothing of the attacker's is used or unpickled.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import pickle
import stat
import tempfile
import typing as t
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

import flask_execute.local
import flask_execute.runtime
from flask_execute import bootfile
from flask_execute import Celery
from flask_execute import ServiceStartError
from flask_execute import SignatureError
from flask_execute import UnsafePathError
from flask_execute.envelopes import Codec
from flask_execute.envelopes import key_id
from flask_execute.local import BOOT_ENV
from tests.apps import tasks
from tests.conftest import descendants
from tests.conftest import wait_gone
from tests.test_security import Canary
from tests.test_security import read

ATTACKER = 65534  # nobody
ATTACKER_KEY = b"k" * 32  # what the attacker writes into the signing.key they plant

#: Files and links owned by another user can only be made by root (as CI runs).
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="plays another user: needs root")


class Machine:
    """A machine of our own: a home, an ``XDG_RUNTIME_DIR`` (0700, ours) and a shared
    sticky temporary directory everyone can write (``/tmp``)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.home = root / "home"
        self.run = root / "run"
        self.shared = root / "shared"
        for path, mode in ((self.home, 0o700), (self.run, 0o700), (self.shared, 0o1777)):
            path.mkdir()
            path.chmod(mode)
        monkeypatch.setenv("HOME", str(self.home))
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(self.run))
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        self.instance = str(root / "instance")

    def app(self, **config: object) -> Flask:
        app = Flask("rundir_app", instance_path=self.instance)
        app.config.update({"CELERY_BROKER_URL": "redis://127.0.0.1:1/0", **config})
        return app

    @property
    def digest(self) -> str:
        """The per-app directory name (a hash of the instance path and import name)."""
        return hashlib.sha256(f"{self.instance}|rundir_app".encode()).hexdigest()[:12]

    def trap(self) -> Path:
        """What the attacker prepares in the shared directory: a directory of theirs
        holding a ``signing.key`` of their choosing, for links to point at."""
        trap = attacker_dir(self.shared / "trap")
        attacker_dir(trap / self.digest)
        attacker_file(trap / self.digest / "signing.key", ATTACKER_KEY)
        return trap


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Machine]:
    # not tmp_path: its long name would leave no room for a unix socket in the home
    with tempfile.TemporaryDirectory(prefix="fe-") as root:
        yield Machine(Path(root), monkeypatch)


def attacker_dir(path: Path, mode: int = 0o777) -> Path:
    path.mkdir()
    os.chown(path, ATTACKER, ATTACKER)
    path.chmod(mode)
    return path


def attacker_file(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    os.chown(path, ATTACKER, ATTACKER)
    path.chmod(mode)
    return path


def plant_link(link: Path, target: Path) -> None:
    """A symbolic link owned by the attacker (where they could write)."""
    os.symlink(target, link)
    os.lchown(link, ATTACKER, ATTACKER)


def our_dir(path: Path, mode: int = 0o700) -> Path:
    path.mkdir()
    path.chmod(mode)
    return path


def assert_private(path: str) -> None:
    info = os.lstat(path)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    assert stat.S_IMODE(info.st_mode) == 0o700


# --- where the state lives ------------------------------------------------------------
def test_runtime_dir_is_private_at_every_level(machine):
    app = machine.app()
    Celery(app)  # no SECRET_KEY: the development key file is created
    state = app.extensions["celery"].runtime(app)
    top = machine.run / "flask-execute"
    assert state.runtime_dir == str(top / machine.digest)
    for path in (top, top / machine.digest):
        assert_private(str(path))
    key = os.lstat(top / machine.digest / "signing.key")
    assert stat.S_IMODE(key.st_mode) == 0o600 and key.st_uid == os.getuid()


def test_without_xdg_runtime_dir_the_home_cache_is_used(machine, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    app = machine.app()
    Celery(app)
    cache = machine.home / ".cache"
    assert app.extensions["celery"].runtime(app).runtime_dir == str(
        cache / "flask-execute" / machine.digest
    )
    for path in (cache, cache / "flask-execute", cache / "flask-execute" / machine.digest):
        assert_private(str(path))


def test_a_production_app_creates_no_runtime_directory(machine, monkeypatch):
    """Nothing to keep: no directory anywhere (www-data may not even have a home)."""
    monkeypatch.setattr(tempfile, "tempdir", str(machine.shared))
    monkeypatch.setenv("HOME", "/nonexistent")
    app = machine.app(
        SECRET_KEY="a long production secret, not a guess", CELERY_START_LOCAL_WORKERS=False
    )
    Celery(app)
    assert os.listdir(machine.run) == os.listdir(machine.shared) == []
    assert not os.path.exists("/nonexistent")


def test_no_home_and_no_xdg_directory_is_a_clear_error(machine, monkeypatch):
    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    with pytest.raises(UnsafePathError) as info:
        Celery(machine.app())  # development without a key: it needs the key file
    assert str(info.value) == (
        "Refusing to use /nonexistent/.cache for flask-execute's private files (signing"
        " key, locks, boot files): /nonexistent cannot be read (No such file or"
        " directory). Set XDG_RUNTIME_DIR or XDG_CACHE_HOME to a directory that only you"
        " (or root) can write, all the way up."
    )


# --- planted directories ------------------------------------------------------------------
@needs_root
def test_the_reported_shared_tmp_attack_does_not_reach_the_app(machine, monkeypatch):
    """The attack as reported: in the shared temporary directory, the other user
    links ``flask-execute-<uid>`` to that directory itself (root's, so an owner check
    that follows the link passes) and owns ``<hash>/signing.key`` there."""
    monkeypatch.setattr(tempfile, "tempdir", str(machine.shared))
    plant_link(machine.shared / f"flask-execute-{os.getuid()}", machine.shared)
    attacker_dir(machine.shared / machine.digest)
    attacker_file(machine.shared / machine.digest / "signing.key", ATTACKER_KEY)
    app = machine.app()
    Celery(app)
    state = app.extensions["celery"].runtime(app)
    assert state.codec.kid != key_id(ATTACKER_KEY)
    assert state.runtime_dir == str(machine.run / "flask-execute" / machine.digest)


def _link_to_shared_tmp(m: Machine, path: Path) -> None:
    # the /tmp attack: a link to a directory owned by root that everyone can write,
    # where the attacker owns the per-app directory and its signing.key
    m.trap()
    plant_link(path, m.shared / "trap")


PLANTS: dict[str, Callable[[Machine, Path], object]] = {
    "symlink": _link_to_shared_tmp,
    "other-owner": lambda m, path: attacker_dir(path),
    "mode-0755": lambda m, path: our_dir(path, 0o755),
}


def _problem(m: Machine, plant: str) -> str:
    return {
        "symlink": f"it is a symbolic link (to '{m.shared / 'trap'}'), which another user"
        " may have planted",
        "other-owner": f"it belongs to uid {ATTACKER}, not to you (uid {os.getuid()})",
        "mode-0755": "its mode is 0755, not 0700 (only you)",
    }[plant]


@needs_root
@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("level", ["top", "app"])
def test_planted_runtime_directory_is_refused(machine, level, plant):
    top = machine.run / "flask-execute"
    if level == "app":
        our_dir(top)
    path = top if level == "top" else top / machine.digest
    PLANTS[plant](machine, path)
    app = machine.app()
    with pytest.raises(UnsafePathError) as info:
        Celery(app)
    assert str(info.value) == (
        f"Refusing to use {path} for flask-execute's private files (signing key, locks,"
        f" boot files): {_problem(machine, plant)}. Remove it (rm -r {path}, as root if it"
        " is not yours); flask-execute creates it again, owned by you with mode 0700."
    )
    assert "celery" not in app.extensions
    # the fix the message gives works
    (os.unlink if plant == "symlink" else os.rmdir)(path)
    Celery(app)
    assert app.extensions["celery"].runtime(app).codec.kid != key_id(ATTACKER_KEY)


def _cache_plants() -> dict[str, Callable[[Machine], tuple[Path, str]]]:
    def symlink(m: Machine) -> tuple[Path, str]:
        plant_link(m.shared / "cache", attacker_dir(m.shared / "theirs"))
        return m.shared / "cache", (
            f"it is a symbolic link (to '{m.shared / 'theirs'}'), which another user may"
            " have planted"
        )

    def other_owner(m: Machine) -> tuple[Path, str]:
        problem = f"it belongs to uid {ATTACKER}, not to you (uid {os.getuid()})"
        return attacker_dir(m.shared / "cache"), problem

    def writable(m: Machine) -> tuple[Path, str]:
        return our_dir(m.shared / "cache", 0o777), "its mode 0777 lets other users write to it"

    return {"symlink": symlink, "other-owner": other_owner, "writable": writable}


@needs_root
@pytest.mark.parametrize("plant", _cache_plants())
def test_planted_cache_directory_is_refused(machine, monkeypatch, plant):
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    cache, problem = _cache_plants()[plant](machine)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    with pytest.raises(UnsafePathError) as info:
        Celery(machine.app())
    assert str(info.value) == (
        f"Refusing to use {cache} for flask-execute's private files (signing key, locks,"
        f" boot files): {problem}. Set XDG_CACHE_HOME to a directory of your own that"
        " only you can write."
    )


@needs_root
def test_cache_under_another_users_directory_is_refused(machine, monkeypatch):
    """Our own directory inside theirs: they can rename it and put theirs in its place."""
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    theirs = attacker_dir(machine.shared / "theirs", 0o755)
    cache = our_dir(theirs / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    with pytest.raises(UnsafePathError) as info:
        Celery(machine.app())
    assert str(info.value) == (
        f"Refusing to use {cache} for flask-execute's private files (signing key, locks,"
        f" boot files): {theirs} belongs to uid {ATTACKER}, who could replace what is in"
        " it. Set XDG_RUNTIME_DIR or XDG_CACHE_HOME to a directory that only you (or"
        " root) can write, all the way up."
    )


@needs_root
@pytest.mark.parametrize("plant", PLANTS)
def test_unsafe_xdg_runtime_dir_is_not_used(machine, monkeypatch, caplog, plant):
    """``XDG_RUNTIME_DIR`` pointing into a shared directory (some tools do that):
    the attacker got there first. The home cache is used instead, with a warning."""
    runtime = machine.shared / "runtime-0"
    PLANTS[plant](machine, runtime)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    app = machine.app()
    with caplog.at_level(logging.WARNING, logger="flask_execute.rundir"):
        Celery(app)
    state = app.extensions["celery"].runtime(app)
    assert state.codec.kid != key_id(ATTACKER_KEY)
    assert state.runtime_dir == str(machine.home / ".cache" / "flask-execute" / machine.digest)
    assert [r.getMessage() for r in caplog.records if r.name == "flask_execute.rundir"] == [
        f"flask-execute: not using XDG_RUNTIME_DIR={runtime} for flask-execute's private"
        f" files (signing key, locks, boot files): {_problem(machine, plant)}. Using the"
        " cache directory instead."
    ]


# --- planted files --------------------------------------------------------------------------
FILE_PLANTS: dict[str, tuple[Callable[[Machine, Path], object], str]] = {
    "symlink": (
        lambda m, path: plant_link(path, m.trap() / m.digest / "signing.key"),
        "it is a symbolic link (to '{trap}'), which another user may have planted. Remove"
        " it (rm {path}); flask-execute creates it again.",
    ),
    "other-owner": (
        lambda m, path: attacker_file(path, ATTACKER_KEY, 0o600),
        f"it belongs to uid {ATTACKER}, not to you (uid {os.getuid()}). Remove it (rm"
        " {path}, as root if it is not yours); flask-execute creates it again.",
    ),
    "mode-0644": (
        lambda m, path: (path.write_bytes(ATTACKER_KEY), path.chmod(0o644)),
        "its mode is 0644, not 0600 (only you). Remove it (rm {path}, as root if it is not"
        " yours); flask-execute creates it again.",
    ),
}


@needs_root
@pytest.mark.parametrize("plant", FILE_PLANTS)
def test_planted_signing_key_is_refused(machine, plant):
    app_dir = our_dir(our_dir(machine.run / "flask-execute") / machine.digest)
    path = app_dir / "signing.key"
    make, problem = FILE_PLANTS[plant]
    make(machine, path)
    app = machine.app()
    with pytest.raises(UnsafePathError) as info:
        Celery(app)
    trap = machine.shared / "trap" / machine.digest / "signing.key"
    assert str(info.value) == f"Refusing to open {path}: " + problem.format(path=path, trap=trap)
    assert "celery" not in app.extensions


@needs_root
@pytest.mark.parametrize("plant", FILE_PLANTS)
def test_planted_lock_file_is_refused(machine, plant, log_dir, broker_url):
    # a broker that answers: the refusal is the lock's, not an unreachable broker's
    app = machine.app(
        SECRET_KEY="a key of our own", CELERY_LOG_DIR=log_dir, CELERY_BROKER_URL=broker_url
    )
    celery = Celery(app)
    state = app.extensions["celery"].runtime(app)
    nodes = "|".join([state.broker_url, *sorted(state.services.expected_nodes())])
    path = (
        Path(state.runtime_dir) / f"services-{hashlib.sha256(nodes.encode()).hexdigest()[:12]}.lock"
    )
    make, problem = FILE_PLANTS[plant]
    make(machine, path)
    before = descendants()
    with app.app_context(), pytest.raises(UnsafePathError) as info:
        celery.start()
    trap = machine.shared / "trap" / machine.digest / "signing.key"
    assert str(info.value) == f"Refusing to open {path}: " + problem.format(path=path, trap=trap)
    assert descendants() == before  # nothing started
    assert not state.services.running


# --- the boot file -----------------------------------------------------------------------------
def test_boot_file_is_verified_before_it_is_unpickled(tmp_path):
    directory = our_dir(tmp_path / "run")
    canary = tmp_path / "pwned"
    path, key = bootfile.write(str(directory), {"locator": ("bare",)})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    name = os.path.basename(path)

    def refused(data: bytes, boot_key: str | None = key, as_name: str = name) -> SignatureError:
        target = directory / as_name
        target.unlink(missing_ok=True)
        target.write_bytes(data)
        target.chmod(0o600)
        with pytest.raises(SignatureError) as info:
            bootfile.read(str(target), boot_key)
        assert not canary.exists()
        assert target.exists()  # left for inspection
        return info.value

    genuine = Path(path).read_bytes()
    evil = pickle.dumps(Canary(canary))
    head = f"Refusing the boot file {directory / name}"
    tail = (
        " It is not what the web process wrote for this worker, so nothing in it was"
        f" unpickled and the worker does not start. Check who else can write to {directory}."
    )
    error = refused(evil)
    assert (error.reason, str(error)) == (
        "malformed",
        f"{head} (malformed): Envelope is not a flask-execute envelope.{tail}",
    )
    forged = Codec(ATTACKER_KEY).seal("boot", name, evil).encode()
    assert refused(forged).reason == "unknown_key"
    tampered = genuine[:-3] + (b"AAA" if genuine[-3:] != b"AAA" else b"BBB")
    assert refused(tampered).reason == "bad_mac"
    assert refused(genuine, boot_key=None).reason == "malformed"
    other_key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    assert refused(genuine, boot_key=other_key).reason == "unknown_key"
    # sealed for another boot file: a genuine file of another child is no use either
    assert refused(genuine, as_name="boot-0000000000000000.pickle").reason == "binding_mismatch"
    (directory / name).write_bytes(genuine)
    assert bootfile.read(path, key) == {"locator": ("bare",)}
    assert not os.path.exists(path)  # read once


def _swap(kind: str, path: str, canary: Path, shared: Path) -> None:
    """What the attacker does between the web process's write and the worker's read."""
    evil = pickle.dumps(Canary(canary))
    if kind == "content":  # as if they could write in the directory: same inode, owner, mode
        with open(path, "r+b") as f:
            f.truncate()
            f.write(evil)
    elif kind == "symlink":
        os.unlink(path)
        plant_link(Path(path), attacker_file(shared / "boot.pickle", evil))
    else:
        os.unlink(path)
        attacker_file(Path(path), evil, 0o600)


@needs_root
@pytest.mark.parametrize("kind", ["content", "symlink", "other-owner"])
def test_swapped_boot_file_is_refused_by_the_worker(
    machine, monkeypatch, broker_url, log_dir, tmp_path, kind
):
    canary = tmp_path / "pwned"
    worker = f"rundir-boot-{kind}"
    app = machine.app(
        SECRET_KEY="a key of our own",  # the attack does not need the key
        CELERY_BROKER_URL=broker_url,
        CELERY_LOG_DIR=log_dir,
        CELERY_WORKERS=[worker],
        CELERY_FLOWER=False,
    )
    celery = Celery(app)
    log = os.path.join(log_dir, f"{worker}.log")
    offset = os.path.getsize(log) if os.path.exists(log) else 0
    real_spawn = flask_execute.local.spawn
    swapped: list[str] = []

    def spawn(name: str, argv: list[str], log_path: str, **kwargs: t.Any) -> object:
        env = kwargs.pop("env").copy()  # what spawn() does: the boot file is written
        _swap(kind, env[BOOT_ENV], canary, machine.shared)
        swapped.append(env[BOOT_ENV])
        return real_spawn(name, argv, log_path, env=env, **kwargs)

    monkeypatch.setattr(flask_execute.local, "spawn", spawn)
    with app.app_context():
        with pytest.raises(ServiceStartError) as info:
            celery.start()
        (path,) = swapped
        if kind == "content":
            refusal = (
                f"flask_execute.errors.SignatureError: Refusing the boot file {path}"
                " (malformed): Envelope is not a flask-execute envelope. It is not what the"
                " web process wrote for this worker, so nothing in it was unpickled and the"
                f" worker does not start. Check who else can write to {os.path.dirname(path)}."
            )
        elif kind == "symlink":
            refusal = (
                f"flask_execute.errors.UnsafePathError: Refusing to open {path}: it is a"
                f" symbolic link (to '{machine.shared / 'boot.pickle'}'), which another user"
                f" may have planted. Remove it (rm {path}); flask-execute creates it again."
            )
        else:
            refusal = (
                f"flask_execute.errors.UnsafePathError: Refusing to open {path}: it belongs"
                f" to uid {ATTACKER}, not to you (uid {os.getuid()}). Remove it (rm {path},"
                " as root if it is not yours); flask-execute creates it again."
            )
        assert not canary.exists()
        assert f"Local service {worker} exited during start-up (exit code 2)" in str(info.value)
        assert refusal in read(log, offset).splitlines()
        assert refusal in str(info.value)
        assert not os.path.lexists(path)  # the web process cleaned up after it
        # the next genuine start serves
        monkeypatch.setattr(flask_execute.local, "spawn", real_spawn)
        try:
            assert celery.submit(tasks.add, 1, 2).result(timeout=20) == 3
        finally:
            celery.stop()
    assert not canary.exists()


# --- it works: local workers and the embedded Redis in the new place ---------------------------
def test_local_workers_and_embedded_redis_live_in_the_home_cache(machine, monkeypatch, log_dir):
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(flask_execute.runtime, "redis_answers", lambda *a, **k: False)
    app = Flask("rundir_app", instance_path=machine.instance)
    app.config.update(CELERY_LOG_DIR=log_dir, CELERY_WORKERS=["rundir-home"], CELERY_FLOWER=False)
    celery = Celery(app)
    state = app.extensions["celery"].runtime(app)
    private = machine.home / ".cache" / "flask-execute" / machine.digest
    socket_path = str(private / "redis.sock")
    assert state.runtime_dir == str(private)
    assert state.broker_url == f"redis+socket://{socket_path}"
    try:
        with app.app_context():
            assert celery.submit(tasks.add, 20, 22).result(timeout=20) == 42
        assert stat.S_ISSOCK(os.lstat(socket_path).st_mode)
        assert_private(str(private / "redis"))
        for name in os.listdir(private):
            info = os.lstat(private / name)
            assert info.st_uid == os.getuid()
            if stat.S_ISREG(info.st_mode):
                assert stat.S_IMODE(info.st_mode) == 0o600, name
            assert not name.startswith("boot-")  # each worker deleted its boot file
        redis_pid = state.embedded_broker.pid
    finally:
        with app.app_context():
            celery.stop()
    assert not wait_gone({redis_pid}, 5)
    assert not os.path.exists(socket_path)


def test_too_long_socket_path_fails_clearly(machine, monkeypatch, log_dir):
    monkeypatch.setattr(flask_execute.runtime, "redis_answers", lambda *a, **k: False)
    deep = machine.run
    while len(str(deep)) < 80:
        deep = our_dir(deep / "a-rather-long-directory-name")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    app = Flask("rundir_app", instance_path=machine.instance)
    app.config.update(CELERY_LOG_DIR=log_dir, CELERY_WORKERS=["rundir-long"], CELERY_FLOWER=False)
    celery = Celery(app)
    socket_path = os.path.join(app.extensions["celery"].runtime(app).runtime_dir, "redis.sock")
    before = descendants()
    with app.app_context():
        try:
            with pytest.raises(ServiceStartError) as info:
                celery.start()
        finally:
            celery.stop()
    assert str(info.value) == (
        f"The embedded Redis cannot listen on {socket_path}: the path is"
        f" {len(socket_path)} bytes long, and unix sockets allow 107. Set XDG_RUNTIME_DIR"
        " (or XDG_CACHE_HOME) to a shorter directory of your own, or set CELERY_BROKER_URL."
    )
    assert descendants() == before

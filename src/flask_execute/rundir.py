"""The private runtime directory of one app, and the files in it.

Per-user state (the development signing key, the services lock files, the boot files
of local workers, the embedded Redis's socket) lives in a directory that only this
user can create and write:

* ``$XDG_RUNTIME_DIR/flask-execute/<hash>/`` when ``XDG_RUNTIME_DIR`` is set to a
  directory of ours with mode 0700 (systemd's ``/run/user/<uid>``);
* else ``$XDG_CACHE_HOME/flask-execute/<hash>/`` (``~/.cache/flask-execute/<hash>/``).

Never a shared temporary directory: there another user can create our directory
first, or a symbolic link in its place. Every level is checked with ``lstat`` (so a
link is seen, never followed): the directories we create must be real directories,
owned by us, mode exactly 0700; the base we put them in must be ours and writable by
nobody else, and so must every directory above it (root's are fine; a sticky one
like ``/tmp`` too, since others cannot rename what we own in it). Files are created
with ``O_EXCL | O_NOFOLLOW`` and opened with ``O_NOFOLLOW``, then checked through
the open descriptor (``fstat``): a regular file of ours with mode 0600. Anything else
raises :class:`~flask_execute.errors.UnsafePathError` naming the path, what is
wrong and the fix; nothing is read from it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import sys

from .errors import UnsafePathError

__all__ = ["UNIX_PATH_MAX", "create_private", "open_private", "private_dir", "runtime_dir"]

log = logging.getLogger(__name__)

#: Longest unix socket path the platform accepts (``sizeof(sun_path)`` minus the NUL).
UNIX_PATH_MAX = 107 if sys.platform.startswith("linux") else 103

_WHAT = "flask-execute's private files (signing key, locks, boot files)"


def runtime_dir(key: str) -> str:
    """The private (0700) directory of the app identified by ``key``, created (and
    verified) on the way: ``<base>/flask-execute/<12 hex digits of sha256(key)>``.

    The short hashed name keeps unix socket paths in it short.

    :raises UnsafePathError: some level is a link, belongs to another user or can be
        written by others; or there is no home directory to put it in.
    """
    top = private_dir(os.path.join(_base(), "flask-execute"))
    return private_dir(os.path.join(top, hashlib.sha256(key.encode()).hexdigest()[:12]))


def _base() -> str:
    """``$XDG_RUNTIME_DIR`` if it is ours and 0700; else the user's cache directory
    (created 0700 if missing)."""
    uid = os.getuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime:
        problem = _runtime_problem(runtime, uid)
        if problem is None:
            return runtime
        # not ours (``su`` keeps the invoking user's), or unsafe: never use it, but
        # the cache directory below is as private, so this is no reason to stop
        log.warning(
            "flask-execute: not using XDG_RUNTIME_DIR=%s for %s: %s. Using the cache"
            " directory instead.",
            runtime,
            _WHAT,
            problem,
        )
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):  # the XDG spec: relative paths are to be ignored
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            raise UnsafePathError(
                f"There is no home directory (HOME is unset) to keep {_WHAT} in. Set"
                " XDG_RUNTIME_DIR or XDG_CACHE_HOME to a directory that only you can write."
            )
        cache = os.path.join(home, ".cache")
    problem = _ancestors_problem(cache, uid)
    if problem is not None:
        raise UnsafePathError(
            f"Refusing to use {cache} for {_WHAT}: {problem}. Set XDG_RUNTIME_DIR or"
            " XDG_CACHE_HOME to a directory that only you (or root) can write, all the"
            " way up."
        )
    _mkdir(cache)
    problem = _dir_problem(cache, uid, exact=False)
    if problem is not None:
        raise UnsafePathError(
            f"Refusing to use {cache} for {_WHAT}: {problem}. Set XDG_CACHE_HOME to a"
            " directory of your own that only you can write."
        )
    return cache


def _runtime_problem(path: str, uid: int) -> str | None:
    if not os.path.isabs(path):
        return "it is not an absolute path"
    return _dir_problem(path, uid, exact=True) or _ancestors_problem(path, uid)


def private_dir(path: str) -> str:
    """Create ``path`` (mode 0700) unless it exists, then verify it with ``lstat``: a
    real directory, owned by us, mode exactly 0700. Its parent must already be
    private; returns ``path``.

    :raises UnsafePathError: naming the path, what is wrong and the fix.
    """
    _mkdir(path)
    problem = _dir_problem(path, os.getuid(), exact=True)
    if problem is not None:
        raise UnsafePathError(
            f"Refusing to use {path} for {_WHAT}: {problem}. Remove it (rm -r {path}, as"
            " root if it is not yours); flask-execute creates it again, owned by you with"
            " mode 0700."
        )
    return path


def _mkdir(path: str) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    except OSError as exc:
        raise UnsafePathError(
            f"Could not create {path} for {_WHAT}: {exc.strerror}. Set XDG_RUNTIME_DIR"
            " or XDG_CACHE_HOME to a directory of your own that only you can write."
        ) from None
    os.chmod(path, 0o700)  # exactly, whatever the umask; the parent is private


def _dir_problem(path: str, uid: int, *, exact: bool) -> str | None:
    """What is wrong with ``path`` as a private directory, or None. ``exact``: mode
    must be 0700; else it must only not be writable by group or others."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return f"it is a symbolic link{_target(path)}, which another user may have planted"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if info.st_uid != uid:
        return f"it belongs to uid {info.st_uid}, not to you (uid {uid})"
    mode = stat.S_IMODE(info.st_mode)
    if exact and mode != 0o700:
        return f"its mode is {mode:04o}, not 0700 (only you)"
    if not exact and mode & 0o022:
        return f"its mode {mode:04o} lets other users write to it"
    return None


def _ancestors_problem(path: str, uid: int) -> str | None:
    """What lets another user replace ``path`` or a directory above it, or None.

    Every directory above (links resolved) must belong to us or root and be writable
    by nobody else, unless it is sticky (``/tmp``): then others cannot rename or
    remove what is ours in it, and the level below is checked for its owner anyway.
    """
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    while True:
        try:
            info = os.lstat(parent)
        except OSError as exc:
            return f"{parent} cannot be read ({exc.strerror})"
        if info.st_uid not in (0, uid):
            return f"{parent} belongs to uid {info.st_uid}, who could replace what is in it"
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            return (
                f"{parent} has mode {stat.S_IMODE(info.st_mode):04o}: other users could"
                " replace what is in it"
            )
        above = os.path.dirname(parent)
        if above == parent:
            return None
        parent = above


def create_private(path: str, flags: int = os.O_WRONLY) -> int:
    """Create ``path`` exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``) with mode 0600
    and return its descriptor.

    :raises FileExistsError: something (a file, a link) is already there.
    """
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # exactly, whatever the umask
    return fd


def open_private(path: str, flags: int = os.O_RDONLY) -> int:
    """Open an existing file without following a link (``O_NOFOLLOW``) and check it
    through the descriptor: a regular file, ours, mode 0600. Returns the descriptor.

    :raises FileNotFoundError: nothing is there.
    :raises UnsafePathError: it is a link, not a regular file, another user's, or
        readable or writable by others; the message says how to fix it.
    """
    try:
        # O_NONBLOCK: a FIFO in its place must not hang us (it is refused below)
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UnsafePathError(
            f"Refusing to open {path}: it is a symbolic link{_target(path)}, which another"
            f" user may have planted. Remove it (rm {path}); flask-execute creates it again."
        ) from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "it is not a regular file"
    elif info.st_uid != os.getuid():
        problem = f"it belongs to uid {info.st_uid}, not to you (uid {os.getuid()})"
    elif stat.S_IMODE(info.st_mode) != 0o600:
        problem = f"its mode is {stat.S_IMODE(info.st_mode):04o}, not 0600 (only you)"
    if problem is not None:
        os.close(fd)
        raise UnsafePathError(
            f"Refusing to open {path}: {problem}. Remove it (rm {path}, as root if it is not"
            " yours); flask-execute creates it again."
        )
    return fd


def _target(link: str) -> str:
    try:
        return f" (to {os.readlink(link)!r})"
    except OSError:  # pragma: no cover - removed meanwhile
        return ""

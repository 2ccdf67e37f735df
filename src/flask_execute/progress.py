"""A progress bar for long waits: ``flask_execute.progress(pool)`` and
``pool.result(progress=True)``. Uses tqdm when it is installed, else a one-line text
bar on stderr."""

from __future__ import annotations

import concurrent.futures
import sys
import time
import typing as t
from collections.abc import Iterable

__all__ = ["progress"]


def progress(
    futures: Iterable[concurrent.futures.Future[t.Any]],
    timeout: float | None = None,
    *,
    file: t.TextIO | None = None,
    description: str = "tasks",
) -> None:
    """Show how many of ``futures`` (a pool, or any futures) are done, until all are.

    :raises TimeoutError: not all done within ``timeout`` seconds.
    """
    items = list(futures)
    total = len(items)
    out = file or sys.stderr
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        tqdm = None
    done_iter = concurrent.futures.as_completed(items, timeout=timeout)
    if tqdm is not None:
        with tqdm(total=total, desc=description, file=out) as bar:
            for _ in done_iter:
                bar.update(1)
        return
    if not total:
        out.write(f"{description}: nothing to wait for\n")
        out.flush()
        return

    def draw(done: int) -> None:
        width = 30
        filled = int(width * done / total)
        out.write(f"\r{description}: [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        out.flush()

    draw(0)
    last = 0.0  # the first finished future is drawn at once
    try:
        for done, _ in enumerate(done_iter, 1):
            now = time.monotonic()
            if now - last > 0.1 or done == total:
                last = now
                draw(done)
    finally:
        # the bar's line ends however the wait ends (done, a timeout, Ctrl-C), so
        # that what is printed next starts on a line of its own
        out.write("\n")
        out.flush()

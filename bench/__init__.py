"""flask-execute versus plain Celery, on the same private Redis and the same worker shape.

``python -m bench`` (or ``make bench``) starts a private Redis, one flask-execute worker
(auto-started by the extension) and one plain ``celery worker`` (prefork, concurrency 2
each), runs every measurement alternating the two sides so that machine drift cancels,
prints medians and ratios, and rewrites ``bench/RESULTS.md``. The ``map`` measurements
also run plain Celery's ``group`` and ``chunks`` and, when the ``bench`` extra is
installed (``make bench`` installs it), Dask distributed's ``LocalCluster`` with two
worker processes (:mod:`bench.dask_peer`); :mod:`bench.issue14` judges issue 14's
targets. It ends with the "P web
processes" scenario of issue 11 (:mod:`bench.webprocs`: P - 1 idle web processes while
one makes N calls, on a third flask-execute app with a worker of the same shape).
``python -m bench --quick`` is a 1.5-minute smoke run that writes ``bench/RESULTS.tmp``
instead.

The benchmark is never part of the test run.
"""

from __future__ import annotations

import os

__all__ = ["ROOT", "env_value"]

#: The project root: the working directory of every process the benchmark starts, so
#: that ``bench`` is importable in workers and child processes.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_value(name: str) -> str:
    """A setting the orchestrator passes to the benchmark apps through the environment.

    :raises RuntimeError: when the module is imported outside ``python -m bench`` (the
        apps must never fall back to a shared Redis such as ``localhost:6379``).
    """
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(
            f"{name} is not set: the benchmark apps are configured by `python -m bench`,"
            " which starts a private Redis for them."
        )
    return value

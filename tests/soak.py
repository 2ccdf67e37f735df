"""``make soak``: the fault suite at a larger scale (not in CI). Thousands of calls in
both delivery modes while the local workers are SIGKILLed at random instants and the
broker (a private Redis with appendonly) is restarted; prints the counts table that
docs/reliability.md shows.

    python -m tests.soak [--rate 15] [--seconds 120] [--kills 6] [--outage 30]

The local worker (2 pool processes, calls of 50 ms) runs about 40 calls a second; the
default load (2 x 15 a second) keeps it busy without building a backlog it cannot
drain. A call not run when nothing moves any more is counted *lost* if it is neither
on a queue nor unacknowledged (held), else *still queued*.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=15.0, help="calls per second per mode")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--outage", type=float, default=30.0)
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="fe-soak-")
    os.environ["XDG_RUNTIME_DIR"] = tmp.name
    from flask_execute import supervisor
    from flask_execute.local import EmbeddedRedis
    from flask_execute.processes import free_port
    from tests import faults

    # the kills come faster than the supervisor's give-up policy tolerates (5 restarts
    # without a minute of calm): the soak measures delivery, not that policy
    supervisor.MAX_RESTARTS = args.kills + 5
    broker = EmbeddedRedis(os.path.join(tmp.name, "broker"), port=free_port(), appendonly=True)
    counters = EmbeddedRedis(os.path.join(tmp.name, "counters"), port=free_port())
    broker.start()
    counters.start()
    url = broker.url + "/0"
    app, celery = faults.make_app(url, url, os.path.join(tmp.name, "logs"), "soak")
    loads = [faults.Load(celery, app, counters.url + "/0", late) for late in (False, True)]
    try:
        with app.app_context():
            celery.start()
            for load in loads:
                load.start(rate=args.rate, seconds=args.seconds)
            killer = threading.Thread(
                target=faults.kill_workers_at_random,
                args=(app, args.kills, args.seconds - 5, 1),
            )
            killer.start()
            time.sleep(args.seconds / 2)
            broker.stop()
            time.sleep(args.outage)
            broker.start()
            killer.join()
            for load in loads:
                load.join(args.seconds + args.outage)
            counts = [load.settle(600, lambda: faults.redis_queued(url)) for load in loads]
    finally:
        for load in loads:
            load.stop()
        celery.stop()
        broker.stop()
        counters.stop()
        tmp.cleanup()
    print(
        f"\nsoak: {args.seconds:g} s at {args.rate:g} calls/s per mode,"
        f" {args.kills} worker SIGKILLs, Redis down {args.outage:g} s\n"
    )
    print(faults.HEADER)
    print(counts[0].row("mixed faults, at-most-once"))
    print(counts[1].row("mixed faults, at-least-once"))


if __name__ == "__main__":
    main()

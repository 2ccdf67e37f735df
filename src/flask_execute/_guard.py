"""``python -m flask_execute._guard FD -- ARGV...``: run ARGV and stop it when FD
(the read end of its owner's lifeline pipe) reads EOF, i.e. when the owner dies.

Used for children that cannot watch a pipe themselves (``redis-server``). SIGTERM
to the guard stops the child too. Exit code: the child's.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys


def main(argv: list[str]) -> int:
    fd = int(argv[0])
    command = argv[argv.index("--") + 1 :]
    child = subprocess.Popen(command)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while child.poll() is None and not stopping:
        try:
            readable, _, _ = select.select([fd], [], [], 0.5)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        if readable and not os.read(fd, 1):
            stopping = True  # owner gone
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

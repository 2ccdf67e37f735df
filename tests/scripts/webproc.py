"""A stand-in web process for lifecycle tests.

``WEBPROC_CONFIG=json python -m tests.scripts.webproc ACTION [ARG]``:

* ``start``: start local services, print ``READY <json list of service pids>`` and
  sleep until killed (or until the file ARG exists, then exit normally);
* ``submit``: submit ``add(1, 2)``, print ``RESULT <value>``, then wait like ``start``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from flask import Flask

from flask_execute import Celery
from tests.apps.tasks import add

app = Flask("webproc", root_path=os.path.dirname(__file__))
app.config.update(json.loads(os.environ["WEBPROC_CONFIG"]))
celery = Celery(app)


def main() -> None:
    action = sys.argv[1]
    release = sys.argv[2] if len(sys.argv) > 2 else None
    if action == "start":
        celery.start()
    else:
        print("RESULT", celery.submit(add, 1, 2).result(timeout=30), flush=True)
    pids = [c.pid for c in app.extensions["celery"].runtime(app).services.children]
    print("READY", json.dumps(pids), flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if release and os.path.exists(release):
            return
        time.sleep(0.05)


if __name__ == "__main__":
    main()

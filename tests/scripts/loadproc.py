"""A web process submitting calls until it is killed (the web-process-kill fault).

``LOADPROC=json python -m tests.scripts.loadproc``: prints ``ACCEPTED <key>`` for
each call whose ``submit`` returned, at ``rate`` per second, for at most 60 s.
"""

from __future__ import annotations

import json
import os
import time

from flask import Flask

from flask_execute import Celery
from tests.apps.tasks import incr_and_sleep

spec = json.loads(os.environ["LOADPROC"])
app = Flask("loadproc", root_path=os.path.dirname(__file__))
app.config.update(spec["config"])
celery = Celery(app)


def main() -> None:
    with app.app_context():
        deadline = time.monotonic() + 60
        i = 0
        while time.monotonic() < deadline:
            key = f"{spec['prefix']}{i}"
            celery.submit(incr_and_sleep, spec["counter"], key, 0.05, acks_late=spec["late"])
            print("ACCEPTED", key, flush=True)
            i += 1
            time.sleep(1.0 / spec["rate"])


if __name__ == "__main__":
    main()

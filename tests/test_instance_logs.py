"""Local services log, and beat keeps its schedule file, in the app's instance folder
when CELERY_LOG_DIR is unset, not in the project folder (issue 13, item 9)."""

from __future__ import annotations

import os


def test_logs_and_the_beat_schedule_go_to_the_instance_folder(
    tmp_path, tmp_modules, broker_url, monkeypatch
):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)  # where `flask run` is typed: nothing lands here
    tmp_modules.write(
        "instapp",
        "from flask import Flask\nfrom flask_execute import Celery\n"
        "app = Flask(__name__)\n"
        "app.config.update(SECRET_KEY='instance-secret-for-tests',"
        f" CELERY_BROKER_URL={broker_url!r},"
        " CELERY_WORKERS=['iw'], CELERY_FLOWER=False)\n"
        "celery = Celery(app)\n"
        "@celery.schedule(3600, name='hourly')\ndef hourly():\n    return 1\n",
    )
    module = tmp_modules.load("instapp")
    instance = module.app.instance_path
    assert instance == os.path.join(tmp_modules.directory, "instance")
    try:
        module.celery.start()
        assert [c.log_path for c in module.celery.runtime(module.app).services.children] == [
            os.path.join(instance, "iw.log"),
            os.path.join(instance, "beat.log"),
        ]
    finally:
        module.celery.stop()
    assert os.path.getsize(os.path.join(instance, "iw.log")) > 0
    assert any(name.startswith("celerybeat-schedule") for name in os.listdir(instance))
    assert os.listdir(project) == []

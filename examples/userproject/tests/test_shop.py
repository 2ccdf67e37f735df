"""How a user tests their own app with flask-execute's pytest fixtures."""

from shop import celery
from shop import invoice_total
from shop import ping


def test_invoice_on_a_real_worker(app, flask_execute_worker):
    with app.app_context():
        future = celery.submit(invoice_total, [10.0, 5.0])
        assert future.result(timeout=20) == 18.0
        assert ping.delay().get(timeout=10) == "pong"


def test_invoice_eagerly(app, flask_execute_eager):
    with app.app_context():
        assert celery.submit(invoice_total, [1.0], tax=0.5).result() == 1.5

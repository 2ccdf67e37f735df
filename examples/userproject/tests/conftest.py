import pytest
from shop import create_app


@pytest.fixture
def app(flask_execute_broker, tmp_path):
    return create_app(
        {
            "CELERY_BROKER_URL": flask_execute_broker,
            "CELERY_LOG_DIR": str(tmp_path),
            "CELERY_WORKERS": ["shop"],
        }
    )

"""The Celery application, configured as the Celery documentation's "First steps" and
"Configuration" pages show: Redis as broker and result backend, JSON serialisation.

The worker is started by ``services.start_worker`` as::

    celery -A celery_baseline.app worker --concurrency 2 --pool prefork -Q hrbatch_baseline

with ``CELERY_BASELINE_REDIS_URL`` and ``CELERY_BASELINE_DATABASE`` in its environment and
``benchmarks/`` and the repository root on ``PYTHONPATH``.
"""
import os
import threading

from celery import Celery

QUEUE = 'hrbatch_baseline'
REDIS_URL = os.environ.get('CELERY_BASELINE_REDIS_URL', 'redis://127.0.0.1:6379/0')

app = Celery('celery_baseline', broker=REDIS_URL, backend=REDIS_URL, include=['celery_baseline.tasks'])
app.conf.update(
    task_serializer='json',
    result_serializer='json',
    accept_content=['json'],
    task_default_queue=QUEUE,
    timezone='Europe/Paris',
    enable_utc=True,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)


def configure(redis_url: str) -> None:
    """Points this process's app (the client that sends tasks) at ``redis_url``, dropping the
    connections and result backend of a previous Redis (a process may start the services twice)."""
    if app.conf.broker_url == redis_url:
        return
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    app.__dict__.get('amqp') and setattr(app.amqp, '_producer_pool', None)
    app._backend_cache = None
    app._local = threading.local()
    app.conf.update(broker_url=redis_url, result_backend=redis_url)

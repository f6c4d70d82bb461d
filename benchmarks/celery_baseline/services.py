"""Starts and stops the Celery baseline's Redis server and worker, and measures them.

``Services(database, work_dir)`` is a context manager: on enter it starts ``redis-server`` on a free
loopback port (no persistence) and the worker (``celery -A celery_baseline.app worker --concurrency 2
--pool prefork -Q hrbatch_baseline``) in its own process group, and waits until the worker answers a
ping; on exit (also after an error) it stops the worker (warm shutdown, then SIGKILL of its group
after 30 s) and Redis. ``Sampler`` records the peak resident memory of the worker's process tree plus
Redis; ``ProgressObserver`` counts the ``PROGRESS`` states the tasks publish (Celery's Redis backend
publishes every state it stores on the channel ``celery-task-meta-<task id>``).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCHMARKS)
sys.path.insert(0, BENCHMARKS)

from memory import tree_rss  # noqa: E402

CONCURRENCY = 2


def missing() -> str | None:
    """Why the baseline cannot run here, or None: the benchmark-only packages or redis-server are absent."""
    problems = []
    for module in ('celery', 'redis'):
        try:
            __import__(module)
        except ImportError:
            problems.append(f'the Python package {module!r}')
    if not shutil.which('redis-server'):
        problems.append('redis-server')
    if problems:
        return (' and '.join(problems) + ' not installed (benchmark-only: run '
                'bash benchmarks/celery_baseline/install.sh)')
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Services:
    def __init__(self, database: str, work_dir: str, *, concurrency: int = CONCURRENCY, loglevel: str = 'INFO'):
        self.database, self.work_dir = database, work_dir
        self.concurrency, self.loglevel = concurrency, loglevel
        self.redis = self.worker = None
        self.redis_url = None

    def __enter__(self) -> 'Services':
        try:
            self._start_redis()
            self._start_worker()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_redis(self) -> None:
        import redis
        port = free_port()
        self.redis_url = f'redis://127.0.0.1:{port}/0'
        self.redis_log = os.path.join(self.work_dir, 'redis.log')
        with open(self.redis_log, 'w') as log:
            self.redis = subprocess.Popen(
                ['redis-server', '--port', str(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
                 '--dir', self.work_dir], stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.redis.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f'redis-server did not start; see {self.redis_log}')
                time.sleep(0.05)
        client.close()

    def _start_worker(self) -> None:
        from celery_baseline import app as celery_app
        celery_app.configure(self.redis_url)
        env = dict(os.environ, CELERY_BASELINE_REDIS_URL=self.redis_url, CELERY_BASELINE_DATABASE=self.database,
                   PYTHONPATH=os.pathsep.join([BENCHMARKS, ROOT, os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
        self.worker_log = os.path.join(self.work_dir, 'celery-worker.log')
        celery = os.path.join(os.path.dirname(sys.executable), 'celery')
        cmd = [celery if os.path.exists(celery) else 'celery', '-A', 'celery_baseline.app', 'worker',
               '--concurrency', str(self.concurrency), '--pool', 'prefork', '-Q', celery_app.QUEUE,
               '--loglevel', self.loglevel, '--hostname', f'baseline-{os.getpid()}@%h', '--logfile', self.worker_log]
        self.worker = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not celery_app.app.control.ping(timeout=0.5):
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f'the Celery worker did not start; see {self.worker_log}')
        # every pool process is forked and ready once the pool answers "stats"
        while len(((celery_app.app.control.inspect(timeout=1).stats() or {}).popitem()[1]
                   .get('pool', {}).get('processes', []))) < self.concurrency:
            if time.monotonic() > deadline:
                raise RuntimeError(f'the Celery worker pool did not start; see {self.worker_log}')
            time.sleep(0.2)

    def pids(self) -> list[int]:
        return [p.pid for p in (self.worker, self.redis) if p is not None and p.poll() is None]

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            try:
                os.killpg(self.worker.pid, signal.SIGTERM)  # warm shutdown
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
                self.worker.wait()
            except ProcessLookupError:
                pass
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            try:
                self.redis.wait(10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
                self.redis.wait()


class Sampler:
    """Peak RSS of the process trees of ``pids`` (sampled from /proc every ``interval`` s) while active."""

    def __init__(self, pids: list[int], interval: float = 0.05):
        self.pids, self.interval, self.peak = pids, interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, sum(tree_rss(pid) for pid in self.pids))
            self._done.wait(self.interval)

    def __enter__(self) -> 'Sampler':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


class ProgressObserver:
    """Counts the PROGRESS states published by the tasks, as a progress page subscribed to them would."""

    def __init__(self, redis_url: str):
        import redis
        self.count = 0
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe('celery-task-meta-*')
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            message = self._pubsub.get_message(timeout=0.2)
            if message is None:
                if self._done.is_set():
                    return
                continue
            if b'"PROGRESS"' in message['data']:
                self.count += 1

    def __enter__(self) -> 'ProgressObserver':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.3)  # the last messages in flight
        self._done.set()
        self._thread.join()
        self._pubsub.close()
        self._client.close()

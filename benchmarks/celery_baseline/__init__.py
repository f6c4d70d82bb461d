"""The Celery baseline of benchmarks/compare.py: matching and payroll as a Celery team writes them today.

Celery 5 with Redis as broker and result backend, a prefork worker of concurrency 2, tasks with
``bind=True, max_retries=3`` that retry on database errors with exponential backoff and report
progress with ``update_state``, reading their inputs from and saving their results to the same SQL
database (SQLite) as the project's pipelines.

- ``app``: the Celery application (broker and backend from ``CELERY_BASELINE_REDIS_URL``).
- ``tasks``: ``match_offer`` (one task per job offer) and ``pay_employees`` (one task per 50 employees).
- ``db``: the SQL side: connection, the tables, loading the generated inputs (outside the timed part).
- ``services``: starting and stopping Redis and the worker, and measuring their memory.

Benchmark-only dependencies: ``bash benchmarks/celery_baseline/install.sh``.
"""

"""benchmarks/compare.py on a tiny input: a real Redis, a real Celery worker (prefork, concurrency 2)
and the real pipelines produce the same matches and the same payslips, and the matching tasks report
their progress. Skipped when the benchmark-only Celery packages or redis-server are not installed
(``bash benchmarks/celery_baseline/install.sh``)."""
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'benchmarks')
sys.path.insert(0, BENCHMARKS)

from celery_baseline import services  # noqa: E402  (imports neither celery nor redis)

pytestmark = pytest.mark.skipif(services.missing() is not None, reason=str(services.missing()))


def test_celery_and_pipelines_agree(tmp_path):
    import compare
    # Celery does a sample (4 of the 5 offers, 60 of the 100 employees), as at scale; the checks cover it.
    figures = compare.run(candidates=300, offers=5, employees=100, celery_offers=4, celery_employees=60,
                          cache=str(tmp_path / 'data'), work=str(tmp_path), timeout=300, log=lambda text: None)
    # run() raises unless every match (outside the float32 threshold band) and every payslip and line agree
    assert figures['pairs'] == 1_500 and figures['celery_pairs'] == 1_200
    assert figures['matches'] > 0
    assert figures['payslips'] == 100 and figures['compared_payslips'] == 60 == figures['celery_employees']
    assert figures['compared_payslip_lines'] > 60 * 15
    # 4 offers x 6 chunks of 50 candidates: one PROGRESS state per chunk, seen by a subscriber
    assert figures['progress_expected'] == 24
    assert figures['celery_progress_updates'] == 24
    for name in ('celery_matching_pairs_per_s', 'pipeline_matching_pairs_per_s', 'celery_payslips_per_s',
                 'pipeline_payslips_per_s', 'matching_ratio_vs_celery', 'payroll_ratio_vs_celery'):
        assert figures[name] > 0


def test_a_database_error_is_retried(monkeypatch):
    """bind=True, max_retries=3: a database error asks Celery for a retry, after 2 ** retries seconds."""
    import sqlite3

    from celery_baseline import tasks
    asked = []

    class Task:  # stands for the bound task: its request and its retry()
        class request:
            retries = 1

        def retry(self, exc, countdown):
            asked.append((exc, countdown))
            return RuntimeError('retry scheduled')

    def locked(conn, offer_id):
        raise sqlite3.OperationalError('database is locked')

    monkeypatch.setattr(tasks, 'connection', lambda: None)
    monkeypatch.setattr(tasks, 'load_offer', locked)
    assert tasks.match_offer.max_retries == 3
    with pytest.raises(RuntimeError, match='retry scheduled'):
        tasks.match_offer.run.__func__(Task(), 'O1')
    [(exc, countdown)] = asked
    assert isinstance(exc, sqlite3.OperationalError) and 2 <= countdown <= 2.5

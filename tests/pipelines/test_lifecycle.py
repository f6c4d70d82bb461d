"""Matching under the run ledger and the audit trail: skip, force, fail, and a verifiable trail."""
import pytest

from pipelines import generate
from pipelines import matching
from pipelines import runs_cli
from transforms import audit
from transforms import ledger
from transforms.errors import ConfigError


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp('data')
    generate.generate(str(directory), candidates=300, offers=12, seed=5)
    return directory


def _run(data, output, *extra):
    return matching.run(['--candidates', str(data / 'candidates.parquet'), '--offers', str(data / 'offers.parquet'),
                         '--output', str(output), '--run_key', 'matching:test', '--top_k', '3', *extra])


def test_a_run_key_that_succeeded_is_not_run_again_unless_forced(tmp_path, data, capsys):
    first = _run(data, tmp_path)
    second = _run(data, tmp_path)
    assert 'already succeeded as ' + first['run_id'] in capsys.readouterr().out
    assert second == {'skipped': True, 'run_key': 'matching:test'}
    forced = _run(data, tmp_path, '--force')
    assert forced['matches_written'] == first['matches_written'] and forced['run_id'] != first['run_id']

    url = f'sqlite:///{tmp_path}/hrbatch.db'
    runs = ledger.RunLedger(url).list(run_key='matching:test')
    assert [r.state for r in runs] == ['succeeded', 'succeeded']
    latest = runs[0]
    assert latest.counts['pairs_scored'] == 300 * 12 and latest.outputs['matches'].endswith('matches')
    assert {f['path'].rsplit('/', 1)[1] for f in latest.input_fingerprints} == {'candidates.parquet', 'offers.parquet'}
    actions = [r.action for r in audit.AuditTrail(url).list()]
    assert actions == [audit.RUN_STARTED, audit.RUN_SUCCEEDED, audit.RUN_SKIPPED, audit.RUN_FORCED,
                       audit.RUN_SUCCEEDED]
    assert audit.AuditTrail(url).verify().ok
    assert runs_cli.audit_main(['verify', '--database', url]) == 0
    assert 'OK: 5 audit records verified' in capsys.readouterr().out
    # No checkpoint is left once a run has succeeded.
    assert not list((tmp_path / '.checkpoints').rglob('*.json'))


def test_a_failed_run_is_recorded_as_failed_and_audited(tmp_path, data):
    (tmp_path / 'matches').mkdir()
    (tmp_path / 'matches' / 'offer_id_bucket=00000').write_text('a file where a directory must go')
    with pytest.raises(Exception):
        _run(data, tmp_path, '--database', 'none', '--partition_buckets', '1')
    url = f'sqlite:///{tmp_path}/hrbatch.db'
    (run,) = ledger.RunLedger(url).list()
    assert run.state == 'failed' and run.error
    assert [r.action for r in audit.AuditTrail(url).list()] == [audit.RUN_STARTED, audit.RUN_FAILED]


def test_a_run_still_marked_running_is_refused_unless_resumed(tmp_path, data):
    url = f'sqlite:///{tmp_path}/hrbatch.db'
    ledger.RunLedger(url).begin('matching:test', 'matching', {}, [], 'test')  # a run that died
    with pytest.raises(ConfigError, match='--resume'):
        _run(data, tmp_path)
    summary = _run(data, tmp_path, '--resume')
    assert summary['pairs_scored'] == 300 * 12
    assert [r.state for r in ledger.RunLedger(url).list()] == ['succeeded', 'failed']
    assert audit.RUN_TAKEN_OVER in [r.action for r in audit.AuditTrail(url).list()]


def test_force_and_resume_together_are_refused(tmp_path, data):
    with pytest.raises(ConfigError, match='--force and --resume'):
        _run(data, tmp_path, '--force', '--resume')

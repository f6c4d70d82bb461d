"""``hrbatch runs`` and ``hrbatch audit``: outputs and exit codes, on SQLite and PostgreSQL."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.runs_cli import audit_main
from pipelines.runs_cli import runs_main
from tests.transforms.test_audit import TAMPERING
from tests.transforms.test_ledger import isolated_database
from transforms import audit
from transforms.audit import AuditTrail
from transforms.errors import ConfigError
from transforms.ledger import RunLedger
from transforms.ledger import fingerprint_inputs


@pytest.fixture(params=['sqlite', 'postgresql'])
def database_url(request, tmp_path, monkeypatch) -> str:
    monkeypatch.delenv('HRBATCH_DATABASE', raising=False)
    return isolated_database(request.param, request, tmp_path)


@pytest.fixture
def recorded(database_url, tmp_path):
    """A database holding one succeeded and one running run, and 8 audit records."""
    pq.write_table(pa.table({'candidate_id': ['C0000001', 'C0000002']}), tmp_path / 'candidates.parquet')
    runs = RunLedger(database_url)
    done = runs.begin('matching:2026-12-03', 'matching',
                      {'top_k': 50, 'database': 'postgresql://hr:pw@db/hr'},
                      fingerprint_inputs([str(tmp_path / 'candidates.parquet')]), operator='ops')
    runs.succeed(done.run_id, {'candidates_read': 20_000, 'matches_written': 1_234},
                 {'matches': str(tmp_path / 'out' / 'matches')})
    running = runs.begin('matching:2026-12-04', 'matching', {}, [], operator='ops')
    trail = AuditTrail(database_url)
    for i in range(8):
        trail.append(audit.RUN_SUCCEEDED if i % 2 else audit.RUN_STARTED, operation='matching',
                     run_key='matching:2026-12-03', run_id=done.run_id, operator='ops',
                     data_categories=['candidates', 'job offers', 'matches'], counts={'matches_written': i})
    return {'url': database_url, 'done': done.run_id, 'running': running.run_id}


def call(main, *argv) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_runs_list_shows_the_latest_runs(recorded):
    code, text = call(runs_main, 'list', '--database', recorded['url'])
    lines = text.splitlines()
    assert code == 0 and lines[0].split()[:3] == ['RUN', 'ID', 'STATE']
    assert lines[1].split()[:2] == [recorded['running'], 'running']
    assert lines[2].split()[:3] == [recorded['done'], 'succeeded', '1']
    code, text = call(runs_main, 'list', '--database', recorded['url'], '--limit', '1', '--json')
    assert code == 0 and [json.loads(line)['run_id'] for line in text.splitlines()] == [recorded['running']]
    code, text = call(runs_main, 'list', '--database', recorded['url'], '--operation', 'payroll')
    assert code == 0 and text == 'no runs recorded\n'


def test_runs_show_prints_parameters_inputs_counts_outputs_and_times(recorded):
    code, text = call(runs_main, 'show', recorded['done'], '--database', recorded['url'])
    assert code == 0
    assert text.startswith(f"Run {recorded['done']}\n  run key    matching:2026-12-03\n")
    for expected in ('state      succeeded', 'operator   ops', 'started    20', 'duration   0:00:0',
                     'Parameters:', 'top_k     50', 'postgresql://hr:***@db/hr',
                     'candidates.parquet  ', 'parquet, 2 rows in 1 row groups, footer sha256',
                     'candidates_read  20,000', 'matches_written  1,234', 'Outputs:', 'out/matches'):
        assert expected in text, expected
    assert ':pw@' not in text
    code, text = call(runs_main, 'show', recorded['done'], '--database', recorded['url'], '--json')
    assert code == 0 and json.loads(text)['counts'] == {'candidates_read': 20_000, 'matches_written': 1_234}


def test_runs_show_of_an_unknown_run_is_a_config_error(recorded):
    with pytest.raises(ConfigError, match="run 'matching-nope' is not in the run ledger.*hrbatch runs list"):
        call(runs_main, 'show', 'matching-nope', '--database', recorded['url'])


def test_audit_list_and_verify(recorded):
    code, text = call(audit_main, 'list', '--database', recorded['url'], '--limit', '3')
    lines = text.splitlines()
    assert code == 0 and len(lines) == 4 and [line.split()[0] for line in lines[1:]] == ['6', '7', '8']
    assert 'candidates, job offers, matches' in lines[1]
    code, text = call(audit_main, 'list', '--database', recorded['url'], '--json')
    assert code == 0 and len(text.splitlines()) == 8 and json.loads(text.splitlines()[0])['prev_hash'] == '0' * 64
    code, text = call(audit_main, 'verify', '--database', recorded['url'])
    assert code == 0 and text.startswith('OK: 8 audit records verified (seq 1..8); head hash ')


@pytest.mark.parametrize('problem', sorted(TAMPERING))
def test_audit_verify_exits_1_naming_the_tampered_record(recorded, problem):
    tamper, seq = TAMPERING[problem]
    tamper(recorded['url'])
    code, text = call(audit_main, 'verify', '--database', recorded['url'])
    assert code == 1 and text.startswith(f'FAILED: seq {seq} {problem}: '), text


def test_audit_retention_keeps_the_trail_verifiable(recorded):
    code, text = call(audit_main, 'retention', '--database', recorded['url'])
    assert code == 0 and text == 'nothing to remove: no audit record is older than 365 days\n'
    code, text = call(audit_main, 'verify', '--database', recorded['url'])
    assert code == 0
    # Tampered: retention refuses rather than erase the evidence.
    TAMPERING['modified'][0](recorded['url'])
    code, text = call(audit_main, 'retention', '--database', recorded['url'], '--days', '1')
    assert code == 1 and 'does not verify' in text and 'seq 4 modified' in text


def test_the_database_comes_from_the_option_or_the_environment(recorded, monkeypatch):
    with pytest.raises(ConfigError, match='--database is required .*HRBATCH_DATABASE'):
        call(runs_main, 'list')
    monkeypatch.setenv('HRBATCH_DATABASE', recorded['url'])
    assert call(runs_main, 'list')[0] == 0
    assert call(audit_main, 'verify')[0] == 0


def test_a_wrong_database_is_a_config_error_and_nothing_is_created(tmp_path, monkeypatch):
    monkeypatch.delenv('HRBATCH_DATABASE', raising=False)
    missing = tmp_path / 'output' / 'hrbatch.db'
    for main, command in ((runs_main, 'list'), (audit_main, 'verify')):
        with pytest.raises(ConfigError, match='no SQLite database'):
            call(main, command, '--database', f'sqlite:///{missing}')
    assert not missing.parent.exists()
    with pytest.raises(ConfigError, match='must be sqlite:///PATH'):
        call(audit_main, 'verify', '--database', 'mysql://db/hr')


@pytest.mark.parametrize('argv, message', [
    ([], 'required'),
    (['lsit'], "invalid choice: 'lsit'"),
    (['list', '--limit', '0'], "'0' must be from 1"),
    (['list', '--frobnicate'], 'unrecognized arguments: --frobnicate'),
])
def test_bad_arguments_are_config_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        call(runs_main, *argv)


def test_help_exits_0(capsys):
    assert runs_main(['--help']) == 0 and 'list' in capsys.readouterr().out
    assert audit_main(['verify', '--help']) == 0 and '--database' in capsys.readouterr().out

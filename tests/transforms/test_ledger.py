"""The run ledger on SQLite and on a real PostgreSQL; input fingerprints; parameters without secrets."""
import json
import sqlite3
import threading
import uuid

import apache_beam as beam
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics import Metrics

from transforms import ledger
from transforms.errors import ConfigError
from transforms.keyed_write import connect
from transforms.keyed_write import parse_sql_target
from transforms.ledger import InvalidTransitionError
from transforms.ledger import LedgerError
from transforms.ledger import RunInProgressError
from transforms.ledger import RunLedger

KEY = 'matching:2026-12-03'


def isolated_database(kind: str, request, tmp_path) -> str:
    """A database URL no other test uses: a SQLite file, or a fresh schema of the session's server
    (the PostgreSQL URL sets its search_path, so the fixed table names do not collide)."""
    if kind == 'sqlite':
        return f'sqlite:///{tmp_path}/hrbatch.db'
    server = request.getfixturevalue('postgres_url')
    schema = f'test_{uuid.uuid4().hex[:12]}'
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA {schema}')
    return f'{server}?options=-csearch_path%3D{schema}'


def run_sql(url: str, statement: str, params: tuple = ()) -> list[tuple]:
    """Runs one statement outside the module under test (``?`` placeholders); returns its rows."""
    target = parse_sql_target(url)
    conn = connect(target)
    try:
        if target.dialect == 'postgresql':
            statement = statement.replace('?', '%s')
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


@pytest.fixture(params=['sqlite', 'postgresql'])
def database_url(request, tmp_path) -> str:
    return isolated_database(request.param, request, tmp_path)


@pytest.fixture
def runs(database_url) -> RunLedger:
    return RunLedger(database_url)


# ------------------------------------------------------------------------------------------------
# Transitions


def test_begin_starts_a_running_run_and_succeed_records_counts_and_outputs(runs):
    begin = runs.begin(KEY, 'matching', {'top_k': 50}, [{'path': 'in.parquet', 'size': 3}], operator='ops')
    assert begin.should_run and begin.attempt == 1 and not begin.forced and begin.taken_over is None
    assert begin.message.startswith(f'start run {begin.run_id}')
    assert begin.run_id.startswith('matching-')
    started = runs.get(begin.run_id)
    assert (started.state, started.run_key, started.operation, started.operator) == (
        'running', KEY, 'matching', 'ops')
    assert started.parameters == {'top_k': 50}
    assert started.input_fingerprints == [{'path': 'in.parquet', 'size': 3}]
    assert started.started_at.endswith('Z') and started.ended_at is None

    done = runs.succeed(begin.run_id, counts={'matches_written': 12}, outputs={'matches': 'out/matches'})
    assert done.state == 'succeeded' and done.counts == {'matches_written': 12}
    assert done.outputs == {'matches': 'out/matches'} and done.ended_at >= done.started_at
    assert runs.get(begin.run_id) == done


def test_rerun_of_a_succeeded_key_is_a_noop_that_says_so(runs):
    first = runs.begin(KEY, 'matching', {}, [])
    runs.succeed(first.run_id, {}, {})
    ended_at = runs.get(first.run_id).ended_at

    again = runs.begin(KEY, 'matching', {}, [])
    assert not again.should_run and again.run_id == first.run_id
    assert again.message == f'already succeeded as {first.run_id} at {ended_at}: nothing to do'
    assert again.inputs_changed is False
    assert [r.run_id for r in runs.list(run_key=KEY)] == [first.run_id]

    changed = runs.begin(KEY, 'matching', {}, [{'path': 'new.csv', 'size': 1}])
    assert not changed.should_run and changed.inputs_changed is True


def test_force_starts_a_new_run_and_keeps_the_previous_success(runs):
    first = runs.begin(KEY, 'matching', {}, [])
    runs.succeed(first.run_id, {}, {})
    forced = runs.begin(KEY, 'matching', {}, [], force=True)
    assert forced.should_run and forced.forced and forced.attempt == 2 and forced.run_id != first.run_id
    assert forced.previous.run_id == first.run_id and f'already succeeded as {first.run_id}' in forced.message
    assert [(r.run_id, r.state) for r in runs.list(run_key=KEY)] == [(forced.run_id, 'running'),
                                                                   (first.run_id, 'succeeded')]
    assert runs.latest(KEY).run_id == forced.run_id


def test_failed_and_cancelled_keys_run_again_as_the_next_attempt(runs):
    first = runs.begin(KEY, 'matching', {}, [])
    failed = runs.fail(first.run_id, ValueError('disk full'))
    assert failed.state == 'failed' and failed.error == 'ValueError: disk full' and failed.ended_at
    second = runs.begin(KEY, 'matching', {}, [])
    assert second.should_run and second.attempt == 2
    assert runs.cancel(second.run_id).state == 'cancelled'
    third = runs.begin(KEY, 'matching', {}, [])
    assert third.should_run and third.attempt == 3 and not third.forced


def test_only_a_running_run_can_succeed_fail_or_be_cancelled(runs):
    run_id = runs.begin(KEY, 'matching', {}, []).run_id
    runs.succeed(run_id, {}, {})
    for finish in (lambda: runs.succeed(run_id, {}, {}), lambda: runs.fail(run_id, 'x'),
                   lambda: runs.cancel(run_id)):
        with pytest.raises(InvalidTransitionError, match=f'run {run_id} is succeeded'):
            finish()
    assert runs.get(run_id).state == 'succeeded'
    with pytest.raises(LedgerError, match='not in the ledger'):
        runs.succeed('matching-unknown', {}, {})
    assert runs.get('matching-unknown') is None


def test_a_running_key_is_refused_and_a_crashed_run_is_taken_over_with_resume(runs):
    crashed = runs.begin(KEY, 'matching', {}, [], operator='night-batch')
    with pytest.raises(RunInProgressError, match=f'already running as {crashed.run_id}.*--resume') as refused:
        runs.begin(KEY, 'matching', {}, [])
    assert isinstance(refused.value, ConfigError)  # the CLI reports it as a launch error

    resumed = runs.begin(KEY, 'matching', {}, [], resume=True)
    assert resumed.should_run and resumed.taken_over == crashed.run_id and resumed.attempt == 2
    assert f'took over abandoned run {crashed.run_id}' in resumed.message
    abandoned = runs.get(crashed.run_id)
    assert abandoned.state == 'failed' and abandoned.error == f'abandoned: taken over by {resumed.run_id}'
    # The crashed launcher's job, if it was alive after all, cannot record a late success.
    with pytest.raises(InvalidTransitionError, match='abandoned'):
        runs.succeed(crashed.run_id, {}, {})
    # force takes over too.
    forced = runs.begin(KEY, 'matching', {}, [], force=True)
    assert forced.taken_over == resumed.run_id and not forced.forced  # nothing had succeeded
    # resume does not rerun a success.
    runs.succeed(forced.run_id, {}, {})
    assert not runs.begin(KEY, 'matching', {}, [], resume=True).should_run


def test_concurrent_begin_of_one_key_starts_exactly_one(database_url):
    RunLedger(database_url)  # the table exists before the race: the race is about the key
    for attempt in range(3):
        key = f'matching:race-{attempt}'
        barrier = threading.Barrier(2)
        outcomes = []

        def begin():
            runs = RunLedger(database_url)
            barrier.wait()
            try:
                outcomes.append(runs.begin(key, 'matching', {}, []))
            except RunInProgressError as refused:
                outcomes.append(refused)

        threads = [threading.Thread(target=begin) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        started = [o for o in outcomes if isinstance(o, ledger.Begin) and o.should_run]
        refused = [o for o in outcomes if isinstance(o, RunInProgressError)]
        assert len(started) == 1 and len(refused) == 1, outcomes
        assert [r.state for r in RunLedger(database_url).list(run_key=key)] == ['running']


def test_list_filters_and_orders_newest_first(runs):
    ids = [runs.begin(f'matching:2026-12-0{day}', 'matching', {}, []).run_id for day in (1, 2, 3)]
    other = runs.begin('payroll:123456789:2026-11', 'payroll', {}, []).run_id
    assert [r.run_id for r in runs.list()] == [other, *reversed(ids)]
    assert [r.run_id for r in runs.list(operation='matching', limit=2)] == [ids[2], ids[1]]
    assert [r.run_id for r in runs.list(run_key='matching:2026-12-02')] == [ids[1]]
    assert runs.latest('payroll:123456789:2026-11').run_id == other and runs.latest('nothing') is None
    with pytest.raises(ValueError, match='limit=0'):
        runs.list(limit=0)


def test_parameters_never_contain_secrets(runs, database_url):
    parameters = {
        'database': 'postgresql://hr:s3cr3t-pw@db.internal:5432/hr',
        'db_password': 's3cr3t-pw', 'api_token': 's3cr3t-tok', 'service_account_key_file': '/keys/s3cr3t.json',
        'pseudonymisation_hmac_key': 's3cr3t-hmac',
        'nested': {'client_secret': 's3cr3t-cs', 'dsn': 'host=db password=s3cr3t-pw dbname=hr'},
        'beam_args': ['--runner', 'DataflowRunner', '--db_password', 's3cr3t-pw', '--token=s3cr3t-tok',
                      '--project', 'hr-prod'],
        'top_k': 50,
    }
    run_id = runs.begin(KEY, 'matching', parameters, []).run_id  # begin sanitises even if the caller forgot
    stored = runs.get(run_id).parameters
    assert stored == {
        'database': 'postgresql://hr:***@db.internal:5432/hr',
        'nested': {'dsn': 'host=db password=*** dbname=hr'},
        'beam_args': ['--runner', 'DataflowRunner', '--project', 'hr-prod'],
        'top_k': 50,
    }
    runs.succeed(run_id, {}, {'database': parameters['database']})
    raw = json.dumps(run_sql(database_url, 'SELECT * FROM hrbatch_runs'))
    assert 's3cr3t' not in raw
    assert ledger.safe_parameters(parameters) == stored


def test_failure_messages_are_short_and_hold_no_personal_data(runs):
    run_id = runs.begin(KEY, 'matching', {}, []).run_id
    message = ('bad row for jeanne.martin@example.fr, NIR 2 97 08 60 057 668 07, tel 06 12 34 56 78 '
               + 'x' * 1000)
    error = runs.fail(run_id, RuntimeError(message)).error
    assert len(error) == 500 and error.endswith('...')
    assert error.startswith('RuntimeError: bad row for <email>, NIR <nir>, tel <phone> x')


def test_a_table_with_other_columns_is_a_config_error(database_url):
    run_sql(database_url, 'CREATE TABLE hrbatch_runs (run_id TEXT PRIMARY KEY, note TEXT)')
    with pytest.raises(ConfigError, match="table 'hrbatch_runs' .* exists with columns"):
        RunLedger(database_url)


def test_reading_a_missing_ledger_is_a_config_error_and_creates_nothing(tmp_path, postgres_url):
    path = tmp_path / 'nowhere' / 'hrbatch.db'
    with pytest.raises(ConfigError, match='no SQLite database'):
        RunLedger(f'sqlite:///{path}', create=False)
    assert not path.parent.exists()
    sqlite3.connect(tmp_path / 'empty.db').close()
    with pytest.raises(ConfigError, match="no table 'hrbatch_runs'"):
        RunLedger(f'sqlite:///{tmp_path}/empty.db', create=False)
    password = psycopg.conninfo.conninfo_to_dict(postgres_url)['password']
    with pytest.raises(ConfigError, match='cannot connect') as raised:
        RunLedger(postgres_url.replace('@', 'x@', 1))
    assert password not in str(raised.value)
    for url in ('mysql://db/hr', '', 'sqlite:///'):
        with pytest.raises(ConfigError):
            RunLedger(url)


@pytest.mark.parametrize('kwargs, words', [
    (dict(run_key='', operation='matching'), 'run_key'),
    (dict(run_key=KEY, operation='Matching Job'), 'operation'),
])
def test_bad_begin_arguments_are_value_errors(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        RunLedger(f'sqlite:///{tmp_path}/h.db').begin(**kwargs)


def test_metric_counts_sums_the_pipeline_counters(test_pipeline):
    def count(x):
        Metrics.counter('hrbatch', 'rows_seen').inc()
        Metrics.counter('other', 'ignored').inc()
        return x

    with test_pipeline() as p:
        _ = p | beam.Create(range(7)) | 'CountA' >> beam.Map(count) | 'CountB' >> beam.Map(count)
    assert ledger.metric_counts(p.result) == {'rows_seen': 14}


# ------------------------------------------------------------------------------------------------
# Fingerprints


def _write_parquet(path, values):
    pq.write_table(pa.table({'candidate_id': [f'C{v:07d}' for v in values], 'score': [v / 10 for v in values]}),
                   path)


def test_fingerprints_are_stable_and_change_when_a_file_changes(tmp_path):
    _write_parquet(tmp_path / 'candidates.parquet', range(100))
    (tmp_path / 'offers.csv').write_text('offer_id,title\nO1,Data engineer\n')
    patterns = [str(tmp_path / '*.parquet'), str(tmp_path / 'offers.csv')]
    before = ledger.fingerprint_inputs(patterns)
    parquet, csv = before
    assert parquet['path'].endswith('candidates.parquet') and parquet['format'] == 'parquet'
    assert (parquet['num_rows'], parquet['num_row_groups']) == (100, 1)
    assert parquet['created_by'].startswith('parquet-cpp-arrow') and len(parquet['footer_sha256']) == 64
    assert csv['method'] == 'sha256' and csv['size'] == len('offer_id,title\nO1,Data engineer\n')
    assert ledger.fingerprint_inputs(patterns) == before

    _write_parquet(tmp_path / 'candidates.parquet', range(100))  # rewritten, same content: same bytes
    (tmp_path / 'offers.csv').write_text('offer_id,title\nO1,Data engineer\n')
    assert ledger.fingerprint_inputs(patterns) == before

    _write_parquet(tmp_path / 'candidates.parquet', [*range(99), 1000])
    (tmp_path / 'offers.csv').write_text('offer_id,title\nO1,Data engineeR\n')  # same size
    after = ledger.fingerprint_inputs(patterns)
    assert after[0]['footer_sha256'] != parquet['footer_sha256']
    assert after[1]['sha256'] != csv['sha256'] and after[1]['size'] == csv['size']


def test_large_files_are_fingerprinted_by_head_tail_and_size(tmp_path):
    path = tmp_path / 'big.jsonl'
    data = bytearray(b'x' * (3 << 20))
    path.write_bytes(data)
    limit = 2 << 20
    first = ledger.fingerprint_inputs([str(path)], full_hash_max_bytes=limit)[0]
    assert first['method'] == 'sha256_head_tail'
    data[len(data) // 2] = ord('y')  # the middle is not read: documented trade-off
    path.write_bytes(data)
    assert ledger.fingerprint_inputs([str(path)], full_hash_max_bytes=limit)[0] == first
    data[-1] = ord('y')
    path.write_bytes(data)
    assert ledger.fingerprint_inputs([str(path)], full_hash_max_bytes=limit)[0]['sha256'] != first['sha256']
    path.write_bytes(data + b'z')
    assert ledger.fingerprint_inputs([str(path)], full_hash_max_bytes=limit)[0]['size'] == first['size'] + 1
    assert ledger.fingerprint_inputs([str(path)])[0]['method'] == 'sha256'


def test_a_parquet_extension_without_parquet_bytes_is_hashed_whole(tmp_path):
    (tmp_path / 'fake.parquet').write_text('not parquet at all')
    assert ledger.fingerprint_inputs([str(tmp_path / 'fake.parquet')])[0]['method'] == 'sha256'


def test_an_input_matching_nothing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match='matches no file'):
        ledger.fingerprint_inputs([str(tmp_path / 'missing-*.csv')])

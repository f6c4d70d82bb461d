"""The audit trail on SQLite and on a real PostgreSQL: chain, tampering, retention, personal data."""
import datetime
import math
import threading

import pytest
from faker import Faker

from tests.transforms.test_ledger import isolated_database
from tests.transforms.test_ledger import run_sql
from transforms import audit
from transforms.audit import AuditIntegrityError
from transforms.audit import AuditTrail
from transforms.errors import ConfigError
from transforms.ledger import parse_time


@pytest.fixture(params=['sqlite', 'postgresql'])
def database_url(request, tmp_path) -> str:
    return isolated_database(request.param, request, tmp_path)


@pytest.fixture
def trail(database_url) -> AuditTrail:
    return AuditTrail(database_url)


def append_runs(trail: AuditTrail, n: int) -> list[audit.AuditRecord]:
    actions = (audit.RUN_STARTED, audit.RUN_SUCCEEDED)
    return [trail.append(actions[i % 2], operation='matching', run_key=f'matching:2026-12-{i // 2 + 1:02d}',
                         run_id=f'matching-20261203T1906{i:02d}Z-aa5a5a46', operator='ops',
                         data_categories=['candidates', 'job offers', 'matches'],
                         counts={'candidates_read': 20_000 + i, 'best_score': 0.87},
                         record_refs={'inputs': [{'path': 'gs://hr/candidates.parquet', 'num_rows': 20_000}],
                                      'candidate_keys': 'C0000001..C0020000'})
            for i in range(n)]


# ------------------------------------------------------------------------------------------------
# The chain


def test_records_are_numbered_and_chained_and_verify(trail):
    records = append_runs(trail, 5)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev_hash == '0' * 64
    assert all(later.prev_hash == earlier.hash for earlier, later in zip(records, records[1:]))
    assert all(r.hash == audit.record_hash(r.to_dict()) for r in records)
    assert records[0].recorded_at.endswith('Z') and records[0].operator == 'ops'
    assert trail.list() == records
    result = trail.verify()
    assert result.ok and result.records == 5 and (result.first_seq, result.last_seq) == (1, 5)
    assert result.head_hash == records[-1].hash and result.message == '5 audit records verified (seq 1..5)'


def test_an_empty_trail_verifies(trail):
    result = trail.verify()
    assert result.ok and result.records == 0


def test_operator_comes_from_the_environment_then_the_os_user(trail, monkeypatch):
    monkeypatch.setenv('HRBATCH_OPERATOR', 'hrbatch@hr-prod.iam.gserviceaccount.com')
    assert trail.append(audit.RUN_STARTED).operator == 'hrbatch@hr-prod.iam.gserviceaccount.com'
    monkeypatch.delenv('HRBATCH_OPERATOR')
    assert trail.append(audit.RUN_STARTED).operator  # the OS user name
    assert trail.append(audit.RUN_STARTED, operator='jdoe').operator == 'jdoe'


def swap_contents(url: str, a: int, b: int) -> None:
    columns = [c for c in audit._AUDIT_COLUMNS if c != 'seq']
    rows = {seq: run_sql(url, f'SELECT {", ".join(columns)} FROM hrbatch_audit WHERE seq = ?', (seq,))[0]
            for seq in (a, b)}
    assignments = ', '.join(f'{c} = ?' for c in columns)
    for seq, other in ((a, b), (b, a)):
        run_sql(url, f'UPDATE hrbatch_audit SET {assignments} WHERE seq = ?', (*rows[other], seq))


TAMPERING = {
    # An auditor's nightmare: the counts of one run quietly changed.
    'modified': (lambda url: run_sql(url, "UPDATE hrbatch_audit SET counts = '{\"candidates_read\":1}' "
                                          'WHERE seq = 4'), 4),
    'removed': (lambda url: run_sql(url, 'DELETE FROM hrbatch_audit WHERE seq = 4'), 4),
    'reordered': (lambda url: swap_contents(url, 3, 6), 3),
}


@pytest.mark.parametrize('problem', sorted(TAMPERING))
def test_verify_names_the_first_tampered_record(trail, database_url, problem):
    append_runs(trail, 8)
    tamper, seq = TAMPERING[problem]
    tamper(database_url)
    result = trail.verify()
    assert not result.ok and (result.bad_seq, result.problem) == (seq, problem), result
    assert result.message.startswith(f'seq {seq} {problem}: ')


def test_other_tampering_is_classified(trail, database_url):
    append_runs(trail, 6)
    rows = run_sql(database_url, 'SELECT * FROM hrbatch_audit ORDER BY seq')
    columns = list(audit._AUDIT_COLUMNS)

    def edited(index, **changes):
        copy = [list(r) for r in rows]
        for name, value in changes.items():
            copy[index][columns.index(name)] = value
        return copy

    # prev_hash rewritten: the record no longer matches its own hash.
    result = audit.verify_rows(edited(2, prev_hash='f' * 64))
    assert (result.bad_seq, result.problem) == (3, 'modified')
    # Adjacent records swapped.
    swapped = [list(r) for r in rows]
    swapped[1][1:], swapped[2][1:] = rows[2][1:], rows[1][1:]
    assert (audit.verify_rows(swapped).bad_seq, audit.verify_rows(swapped).problem) == (2, 'reordered')
    # A record deleted and the following ones renumbered: no gap, but the chain is broken.
    renumbered = [rows[0], rows[1]] + [[r[0] - 1, *r[1:]] for r in rows[3:]]
    assert (audit.verify_rows(renumbered).bad_seq, audit.verify_rows(renumbered).problem) == (3, 'removed')
    # The first records deleted without retention.
    assert (audit.verify_rows(rows[2:]).bad_seq, audit.verify_rows(rows[2:]).problem) == (1, 'removed')
    # A JSON column that no longer parses.
    assert audit.verify_rows(edited(4, counts='{broken')).problem == 'modified'
    assert audit.verify_rows(rows).ok


# ------------------------------------------------------------------------------------------------
# Retention


def test_retention_removes_old_records_and_keeps_the_chain_verifiable(trail, database_url):
    records = append_runs(trail, 6)
    days = 365
    # "Now" is one year after the 4th record: records 1-3 are older than the retention.
    now = parse_time(records[3].recorded_at) + datetime.timedelta(days=days)
    anchor = trail.apply_retention(days, now=now, operator='dpo')
    assert anchor.seq == 7 and anchor.action == 'retention.applied' and anchor.prev_hash == records[-1].hash
    assert anchor.record_refs['removed_through_seq'] == 3 and anchor.record_refs['removed_count'] == 3
    assert anchor.record_refs['last_removed_hash'] == records[2].hash
    assert [r.seq for r in trail.list()] == [4, 5, 6, 7]
    result = trail.verify()
    assert result.ok and (result.records, result.first_seq, result.last_seq) == (4, 4, 7), result

    assert trail.apply_retention(days, now=now) is None  # nothing more is old enough
    append_runs(trail, 2)
    assert trail.verify().ok
    # A second retention removes the first anchor too; the new anchor carries the chain.
    in_two_days = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=2)
    second = trail.apply_retention(1, now=in_two_days)
    assert second.record_refs['removed_through_seq'] == 9 and [r.seq for r in trail.list()] == [10]
    assert trail.verify().ok

    append_runs(trail, 2)
    run_sql(database_url, 'DELETE FROM hrbatch_audit WHERE seq = 10')  # the anchor itself
    result = trail.verify()
    # Without the anchor nothing tells which removals were legitimate: all of 1..10 are reported.
    assert (result.bad_seq, result.problem) == (1, 'removed') and 'seq 1..10 are missing' in result.message


def test_deleting_the_oldest_records_without_retention_is_detected(trail, database_url):
    records = append_runs(trail, 6)
    trail.apply_retention(30, now=parse_time(records[2].recorded_at) + datetime.timedelta(days=30))
    run_sql(database_url, 'DELETE FROM hrbatch_audit WHERE seq = 3')  # beyond what retention removed
    result = trail.verify()
    assert (result.bad_seq, result.problem) == (3, 'removed') and 'no retention.applied' in result.message


def test_retention_refuses_a_chain_that_does_not_verify(trail, database_url):
    records = append_runs(trail, 4)
    run_sql(database_url, "UPDATE hrbatch_audit SET operator = 'someone-else' WHERE seq = 1")
    with pytest.raises(AuditIntegrityError, match='seq 1 modified'):
        trail.apply_retention(1, now=parse_time(records[-1].recorded_at) + datetime.timedelta(days=400))
    assert len(trail.list()) == 4


def test_retention_days_must_be_positive(trail):
    with pytest.raises(ValueError, match='days=0'):
        trail.apply_retention(0)


# ------------------------------------------------------------------------------------------------
# Personal data


def _nir() -> str:
    fake = Faker('fr_FR')
    fake.seed_instance(7)
    return fake.ssn()


NIR = _nir()


@pytest.mark.parametrize('field, value', [
    ('record_refs', {'candidate': 'jeanne.martin@example.fr'}),
    ('record_refs', {'rejected': ['C0000001', f'nir {NIR}']}),
    ('record_refs', {'nir': f'{NIR[0]} {NIR[1:3]} {NIR[3:5]} {NIR[5:7]} {NIR[7:10]} {NIR[10:13]} {NIR[13:]}'}),
    ('record_refs', {'dsn_nir': NIR[:13]}),
    ('record_refs', {'as_number': int(NIR)}),
    ('record_refs', {'phone': '06 12 34 56 78'}),
    ('record_refs', ['+33 (0)4 71 00 08 06']),
    ('counts', {NIR: 1}),
    ('data_categories', ['candidates', 'contact: 0612345678']),
    ('run_key', 'subject_access:jeanne.martin@example.fr'),
])
def test_personal_data_is_refused_without_being_quoted(trail, field, value):
    with pytest.raises(ValueError, match=f'^{field}.* looks like') as refused:
        trail.append(audit.RUN_STARTED, **{field: value})
    assert all(fragment not in str(refused.value) for fragment in ('jeanne', NIR[:13], '12 34', '71 00'))
    assert trail.list() == []


def test_references_keys_hashes_and_paths_are_accepted(trail):
    refs = {
        'candidate_keys': 'C0000001..C0020000', 'offer_ids': ['O000123', 'O000124'],
        'key_hashes': ['9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'],
        'inputs': [{'path': 'gs://hr-bucket/2026-12-03/candidates-00001-of-00016.parquet', 'size': 123_456_789,
                    'footer_sha256': '0123456789012345678901234567890123456789012345678901234567890123'}],
        'run_id': 'matching-20261203T190635Z-aa5a5a46', 'window': '2026-12-03T19:06:35.123456Z',
        'siren': '123456789', 'rows': 1_000_000_000_000,
    }
    record = trail.append(audit.RUN_SUCCEEDED, operation='payroll', run_key='payroll:123456789:2026-11',
                          counts={'pairs_scored': 1_234_567_890_123, 'payslips': 250_000},
                          data_categories=['employees', 'payslips'], record_refs=refs,
                          operator='hrbatch@hr-prod.iam.gserviceaccount.com')
    assert record.record_refs == refs and trail.verify().ok


@pytest.mark.parametrize('kwargs, words', [
    (dict(action='Run Started'), 'action='),
    (dict(action='run.started', operation='Payroll!'), 'operation='),
    (dict(action='run.started', data_categories='candidates'), 'data_categories='),
    (dict(action='run.started', counts={'rows': 'many'}), 'counts='),
    (dict(action='run.started', counts={'score': math.nan}), 'plain JSON'),
    (dict(action='run.started', record_refs='a path'), 'record_refs'),
])
def test_malformed_records_are_value_errors(trail, kwargs, words):
    with pytest.raises(ValueError, match=words):
        trail.append(**kwargs)


def test_scrub_masks_personal_data_in_free_text():
    text = f'row 12: jeanne.martin@example.fr / {NIR} / 06.12.34.56.78 / C0000001'
    assert audit.scrub_personal_data(text) == 'row 12: <email> / <nir> / <phone> / C0000001'


# ------------------------------------------------------------------------------------------------
# Concurrency and reading


def test_concurrent_appends_get_distinct_seqs_and_a_valid_chain(database_url):
    AuditTrail(database_url)
    barrier = threading.Barrier(2)
    errors = []

    def writer(name: str):
        trail = AuditTrail(database_url)
        barrier.wait()
        try:
            for i in range(50):
                trail.append(audit.RUN_STARTED, operation='matching', run_id=f'{name}-{i}', counts={'i': i})
        except Exception as error:  # surfaced below: an exception in a thread is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ('a', 'b')]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    records = AuditTrail(database_url).list(limit=1000)
    assert [r.seq for r in records] == list(range(1, 101))
    assert sorted(r.run_id for r in records) == sorted(f'{n}-{i}' for n in 'ab' for i in range(50))
    result = AuditTrail(database_url).verify()
    assert result.ok and result.records == 100


def test_list_since_a_seq_or_a_time_and_limit(trail):
    records = append_runs(trail, 6)
    assert [r.seq for r in trail.list(limit=2)] == [5, 6]
    assert [r.seq for r in trail.list(since=2, limit=3)] == [3, 4, 5]
    assert [r.seq for r in trail.list(since=records[4].recorded_at)] == [5, 6]
    assert [r.seq for r in trail.list(since=parse_time(records[4].recorded_at))] == [5, 6]
    with pytest.raises(ValueError, match='time zone'):
        trail.list(since=datetime.datetime(2026, 1, 1))


def test_reading_a_database_without_a_trail_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match='no SQLite database'):
        AuditTrail(f'sqlite:///{tmp_path}/missing.db', create=False)
    AuditTrail(f'sqlite:///{tmp_path}/ledger-only.db', create=True)
    assert AuditTrail(f'sqlite:///{tmp_path}/ledger-only.db', create=False).verify().ok

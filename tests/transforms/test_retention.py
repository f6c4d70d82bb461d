"""Retention policy, keyed pseudonyms, generalisation and k-anonymity, without Beam."""
import datetime
import hmac
import json

import hypothesis.strategies as st
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import settings

from transforms import datasets
from transforms import retention
from transforms import schemas
from transforms.errors import ConfigError

KEY = b'0123456789abcdef0123456789abcdef'


def test_the_catalogue_names_only_fields_of_its_schemas():
    assert datasets.check_catalogue() == []
    assert datasets.CATALOGUE['candidates'].date_fields == ('last_contact_date',)
    assert set(datasets.CATALOGUE['payslips'].date_fields) == {'period'}


def test_pseudonyms_are_keyed_hmacs_stable_across_datasets_and_idempotent():
    values = pa.array(['C1', 'C2', 'C1', None])
    out = retention.pseudonyms(values, KEY, 'candidate_id').to_pylist()
    expected = 'anon-' + hmac.digest(KEY, b'candidate_id\x00C1', 'sha256').hex()[:20]
    assert out[0] == out[2] == expected and out[1] != out[0] and out[3] is None
    assert retention.pseudonyms(pa.array(out), KEY, 'candidate_id').to_pylist() == out
    assert retention.pseudonyms(values, b'x' * 32, 'candidate_id').to_pylist()[0] != expected  # keyed
    emails = retention.pseudonyms(pa.array([' Jane@Example.com', 'jane@example.com']), KEY, 'email', email=True)
    assert emails[0] == emails[1] and emails[0].as_py().endswith(retention.EMAIL_DOMAIN)
    assert schemas.is_email(emails).all()


def test_generalisations():
    assert retention.to_departement(pa.array(['75011', '01000', '20090', '20250', '97411', '2B', None])).to_pylist() == \
        ['75', '01', '2A', '2B', '974', '2B', None]
    assert retention.to_year(pa.array([datetime.date(1984, 7, 14)])).to_pylist() == [datetime.date(1984, 1, 1)]
    assert retention.to_band(pa.array([57_500.0]), 10_000).to_pylist() == [50_000.0]
    assert retention.to_band(pa.array([123_456], pa.int64()), 50_000).to_pylist() == [100_000]
    assert retention.to_rounded(pa.array([45.73588]), 1).to_pylist() == [45.7]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(['C1', 'C2', 'C3', 'anon-0123456789abcdef0123']),
                          st.dates(datetime.date(2020, 1, 1), datetime.date(2026, 12, 31)),
                          st.sampled_from(['75011', '13001', '20200', '97110', None]),
                          st.floats(1.0, 200_000.0, allow_nan=False)), max_size=30))
def test_anonymising_twice_equals_once_and_leaves_no_identifier(rows):
    table = pa.table({
        'candidate_id': pa.array([r[0] for r in rows], pa.string()),
        'email': pa.array([f'{r[0].lower()}@example.com' for r in rows], pa.string()),
        'last_contact_date': pa.array([r[1] for r in rows], pa.date32()),
        'postcode': pa.array([r[2] for r in rows], pa.string()),
        'expected_salary': pa.array([r[3] for r in rows], pa.float64()),
    })
    entry = _entry('candidates', quasi_identifiers=('postcode', 'expected_salary'))
    plan = retention.plan_for(entry, datetime.date(2026, 12, 1))
    once = retention.anonymise_table(table, plan, KEY)
    twice = retention.anonymise_table(once.table, plan, KEY)
    assert twice.table.equals(once.table) and twice.anonymised == 0
    expired = retention.expired_mask(table.column('last_contact_date'), 'date', datetime.date(2024, 12, 1))
    for row, gone in zip(once.table.to_pylist(), expired):
        if gone:
            assert row['candidate_id'].startswith('anon-') and row['email'].endswith(retention.EMAIL_DOMAIN)
            assert row['postcode'] is None or len(row['postcode']) <= 3
        else:
            assert not row['candidate_id'].startswith('anon-') or row['candidate_id'] == 'anon-0123456789abcdef0123'


def _entry(name, **fields):
    spec = datasets.CATALOGUE[name]
    values = dict(dataset=name, path='x', category=spec.category, period=retention.Period.parse('2y', where='t'),
                  date_field=spec.retention.date_field, date_kind='date', follows=None, follow_key=None, k=2,
                  quasi_identifiers=spec.quasi_identifiers)
    values.update(fields)
    return retention.PolicyEntry(**values)


def test_small_groups_are_suppressed_and_counted():
    table = pa.table({
        'candidate_id': ['C1', 'C2', 'C3', 'C4'], 'email': ['a@x.fr', 'b@x.fr', 'c@x.fr', 'd@x.fr'],
        'last_contact_date': pa.array([datetime.date(2020, 1, 1)] * 3 + [datetime.date(2026, 11, 1)], pa.date32()),
        'postcode': ['75001', '75019', '13001', '13001'],
    })
    plan = retention.plan_for(_entry('candidates', quasi_identifiers=('postcode',)), datetime.date(2026, 12, 1))
    counts, mask = retention.measure_table(table, plan, KEY)
    assert counts == {'75': 2, '13': 1} and mask.tolist() == [True, True, True, False]
    small = retention.small_groups(counts, 2)
    assert small == {'13': 1} and retention.k_of(counts, 2) == 2
    result = retention.anonymise_table(table, plan, KEY, suppress=small)
    assert result.suppressed == 1 and result.anonymised == 2 and result.table.num_rows == 3
    assert result.table.column('candidate_id').to_pylist()[2] == 'C4'  # recent: kept as it was


def test_retention_dates():
    cutoff = retention.Period.parse('5y', where='t').before(datetime.date(2026, 12, 1))
    assert cutoff == datetime.date(2021, 12, 1)
    assert retention.expired_mask(pa.array(['2021-10', '2021-11', '2021-12', None]), 'month', cutoff).tolist() == \
        [True, True, False, False]
    assert retention.expired_mask(pa.array([2020, 2021]), 'year', cutoff).tolist() == [True, False]
    assert retention.Period.parse('6 months', where='t').before(datetime.date(2026, 8, 31)) == datetime.date(2026, 2, 28)
    assert retention.add_months(datetime.date(2026, 1, 31), 1) == datetime.date(2026, 2, 28)


def _policy(**entry):
    base = dict(name='candidates', path='data/c', category='recruitment', retention='2y')
    base.update(entry)
    return json.dumps({'datasets': [base]})


@pytest.mark.parametrize('text, message', [
    ('datasets: []', 'non-empty "datasets" list'),
    ('{"k": 0, "datasets": [{}]}', 'k=0 must be an integer'),
    (_policy(name='dsn'), 'DSN files are declarations'),
    (_policy(name='payroll'), "unknown dataset 'payroll'"),
    (_policy(**{'from': 'birthday'}), "unknown field 'birthday'"),
    (_policy(**{'from': 'email'}), "field 'email' is not a date"),
    (_policy(follows='candidates', **{'from': 'last_contact_date'}), 'exactly one of "from"'),
    (_policy(retention='forever'), "retention 'forever' is not a period"),
    (_policy(colour='blue'), "unknown keys \\['colour'\\]"),
    (json.dumps({'datasets': [dict(name='matches', path='m', category='recruitment', retention='2y',
                                   follows='candidates')]}), "follows 'candidates', which the policy does not name"),
])
def test_policy_errors_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message):
        retention.parse_policy(text)


def test_the_example_policy_parses():
    import pathlib
    text = (pathlib.Path(__file__).parents[2] / 'pipelines' / 'policies' / 'retention.example.yaml').read_text()
    policy = retention.parse_policy(text)
    assert {e.dataset for e in policy.entries} >= {'candidates', 'matches', 'payslips'}
    assert policy.entry('matches').follows == 'candidates' and policy.entry('matches').follow_key == 'candidate_id'


def test_the_key_reference_never_shows_the_key(tmp_path, monkeypatch):
    (tmp_path / 'key').write_bytes(KEY + b'\n')
    ref = retention.KeyRef(file=str(tmp_path / 'key'))
    assert ref.load() == KEY and KEY.decode() not in repr(ref)
    monkeypatch.setenv('GDPR_KEY', KEY.decode())
    assert retention.KeyRef(env='GDPR_KEY').load() == KEY
    with pytest.raises(ConfigError, match='exactly one of'):
        retention.KeyRef(file=str(tmp_path / 'key'), env='GDPR_KEY').load()


def test_dataset_files_from_directories_globs_and_files(tmp_path):
    import pyarrow.parquet as pq
    for month in ('2026-10', '2026-11'):
        part = tmp_path / f'payroll-{month}' / 'payslips' / 'employee_id_bucket=00000'
        part.mkdir(parents=True)
        pq.write_table(pa.table({'x': [1]}), part / 'part-00000.parquet')
        (part / '.tmp-x').mkdir()
        pq.write_table(pa.table({'x': [1]}), part / '.tmp-x' / 'part-00000.parquet')
    assert len(retention.dataset_files(str(tmp_path / 'payroll-*' / 'payslips'))) == 2
    assert len(retention.dataset_files(str(tmp_path / 'payroll-2026-10' / 'payslips'))) == 1
    assert len(retention.dataset_files(str(tmp_path / 'payroll-*' / 'payslips' / '*' / 'part-*.parquet'))) == 2
    with pytest.raises(ConfigError, match='no .parquet file'):
        retention.dataset_files(str(tmp_path / 'nothing'))


def test_dataset_files_under_a_hidden_parent_directory(tmp_path):
    import pyarrow.parquet as pq
    part = tmp_path / '.data' / 'set' / 'k_bucket=00001'
    part.mkdir(parents=True)
    pq.write_table(pa.table({'x': [1]}), part / 'part-00000.parquet')
    assert retention.dataset_files(str(tmp_path / '.data' / 'set')) == [str(part / 'part-00000.parquet')]

"""gdpr_anonymize on real pipeline outputs: candidates and matches, a month of payroll, CPF credits.

Checks what the issue asks: records past retention anonymised in place and nothing else touched,
anonymising twice equals once byte for byte, a dry run changes nothing, k-anonymity suppression,
the key and the original identifiers of anonymised people in no output or log, the key in no display
data nor pipeline options, clear errors for a bad policy or a missing key, the audit trail verifying.
"""
import datetime
import json
import logging
import os
import pathlib
import shutil
import sqlite3

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import generate
from pipelines import generate_payroll
from pipelines import gdpr_anonymize
from pipelines import payroll
from pipelines import runs_cli
from pipelines.runner import pipeline_options
from transforms import keyed_write
from transforms import schemas
from transforms.errors import ConfigError

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

KEY = 'k3y-Th1s-1s-a-t3st-s3cr3t-0f-32-bytes-or-more-xyz'
AS_OF = '2026-12-01'
PERIOD = '2026-11'


def write_keyed(table: pa.Table, schema, target: pathlib.Path, key: str, buckets: int = 4) -> None:
    """``table`` as a keyed dataset, as WriteKeyed writes it (partitions by bucket of ``key``)."""
    pieces = {}
    for batch in table.to_batches():
        for directory, piece in keyed_write.split_by_partition(keyed_write.conform_batch(batch, schema), key, buckets):
            pieces.setdefault(directory, []).append(piece)
    for directory, batches in pieces.items():
        keyed_write.write_partition(batches, schema=schema, target=str(target), directory=directory,
                                    temp_dir=str(target / '.tmp-test'))
    keyed_write.remove_temp_dir(str(target / '.tmp-test'))


def make_candidates(count: int = 400) -> pa.Table:
    table = pa.Table.from_batches(list(generate.candidate_chunks(count, seed=3)))
    rows = table.to_pylist()
    # Two people with the same name: one recent, one past retention.
    for row, day in ((rows[0], datetime.date(2026, 10, 1)), (rows[1], datetime.date(2023, 1, 15))):
        row.update(first_name='Camille', last_name='Martin', last_contact_date=day)
    return pa.Table.from_pylist(rows, schema=schemas.CANDIDATES.arrow_schema())


def make_matches(candidates: pa.Table) -> pa.Table:
    ids = candidates.column('candidate_id').to_pylist()
    rows = []
    for n, candidate_id in enumerate(ids[:200]):
        for offer in ('O000001', 'O000002'):
            rows.append(dict(offer_id=offer, candidate_id=candidate_id, score=0.5 + (n % 10) / 40, rank=None,
                             **{f'score_{c}': 0.5 for c in schemas.SCORE_COMPONENTS}, distance_km=12.345,
                             weights='{"required_skills": 1.0}'))
    return pa.Table.from_pylist(rows, schema=schemas.MATCHES.arrow_schema())


def build_world(root: pathlib.Path, *, employees: int = 60) -> dict:
    """Every dataset the project holds, small: candidates and matches (keyed), payroll data and a
    month of payroll outputs (some contracts ended long ago), CPF credits of an old year."""
    root.mkdir(parents=True, exist_ok=True)
    candidates = make_candidates()
    write_keyed(candidates, schemas.CANDIDATES, root / 'candidates', 'candidate_id')
    write_keyed(make_matches(candidates), schemas.MATCHES, root / 'matches', 'offer_id')
    data = root / 'in'
    generate_payroll.generate_payroll(str(data), employees=employees, period=PERIOD, seed=5)
    args = ['--period', PERIOD, '--output', str(root / 'payroll'), '--database', 'none', '--buckets', '2',
            '--ledger', f'sqlite:///{root / "ledger.db"}']
    for name in generate_payroll.DATASETS:
        args += [f'--{name}', str(data / f'{name}.parquet')]
    payroll.run(args)
    # Contracts of the first ten employees ended in 2019: their employee records are past retention.
    contracts = pq.read_table(data / 'contracts.parquet').to_pylist()
    old = {f'E{n:08d}' for n in range(1, 11)}
    for row in contracts:
        if row['employee_id'] in old:
            row.update(start_date=datetime.date(2015, 3, 1), end_date=datetime.date(2019, 6, 30))
    write_keyed(pa.Table.from_pylist(contracts, schema=schemas.CONTRACTS.arrow_schema()), schemas.CONTRACTS,
                root / 'contracts', 'employee_id', buckets=2)
    # Old payslips (2019) of the same people, as a keyed dataset of its own.
    payslips = keyed_write.read_parquet_dataset(str(root / 'payroll' / 'payslips')).to_pylist()
    old_slips = [dict(row, period='2019-05') for row in payslips if row['employee_id'] in old]
    write_keyed(pa.Table.from_pylist(old_slips, schema=schemas.PAYSLIPS.arrow_schema()), schemas.PAYSLIPS,
                root / 'payslips-2019', 'employee_id', buckets=2)
    credits = [dict(employee_id=e, year=2019, hours_worked=1607.0, hours_absences_counted=0.0,
                    annual_credit_cents=50000, cap_cents=500000, credit_cents=50000, balance_before_cents=0,
                    balance_after_cents=50000, status='credited') for e in sorted(old)]
    write_keyed(pa.Table.from_pylist(credits, schema=schemas.CPF_CREDITS.arrow_schema()), schemas.CPF_CREDITS,
                root / 'cpf_credits', 'employee_id', buckets=2)
    return {'root': root, 'candidates': candidates, 'old_employees': sorted(old), 'data': data}


def policy_text(root: pathlib.Path, k: int = 2, **override) -> str:
    entries = [
        dict(name='candidates', path=str(root / 'candidates'), category='recruitment', retention='2y',
             **{'from': 'last_contact_date'}),
        dict(name='matches', path=str(root / 'matches'), category='recruitment', retention='2y',
             follows='candidates'),
        dict(name='contracts', path=str(root / 'contracts'), category='personnel', retention='5y',
             **{'from': 'end_date'}),
        dict(name='employees', path=str(root / 'in' / 'employees.parquet'), category='personnel', retention='5y',
             follows='contracts'),
        dict(name='payslips', path=str(root / 'payslips-2019'), category='pay', retention='5y', **{'from': 'period'}),
        dict(name='payslip_lines', path=str(root / 'payroll' / 'payslip_lines'), category='pay', retention='5y',
             **{'from': 'period'}),
        dict(name='cpf_credits', path=str(root / 'cpf_credits'), category='training', retention='5y',
             **{'from': 'year'}),
    ]
    for entry in entries:
        entry.update(override.get(entry['name'], {}))
    return json.dumps({'k': k, 'datasets': entries})  # JSON is YAML


def file_bytes(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*.parquet'))}


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp('gdpr') / 'world')


@pytest.fixture
def copy(world, tmp_path):
    """A fresh copy of the world, with its policy and key file."""
    root = tmp_path / 'world'
    shutil.copytree(world['root'], root, ignore=shutil.ignore_patterns('ledger.db*'))
    (root / 'policy.yaml').write_text(policy_text(root))
    (tmp_path / 'key').write_text(KEY + '\n')
    return root


def _run(root, tmp_path, *extra):
    return gdpr_anonymize.run(['--policy', str(root / 'policy.yaml'), '--key_file', str(tmp_path / 'key'),
                               '--output', str(tmp_path / 'gdpr'), '--as_of', AS_OF, *extra])


def test_records_past_retention_are_anonymised_and_the_rest_untouched(copy, tmp_path, world):
    summary = _run(copy, tmp_path)
    cutoff = datetime.date(2024, 12, 1)
    before = {r['candidate_id']: r for r in world['candidates'].to_pylist()}
    after = keyed_write.read_parquet_dataset(str(copy / 'candidates')).to_pylist()
    expired = {i for i, r in before.items() if r['last_contact_date'] < cutoff}
    figures = summary['datasets']['candidates']
    assert figures['expired'] == len(expired) > 0
    assert figures['anonymised'] + figures['suppressed'] == len(expired)
    assert len(after) == len(before) - figures['suppressed']
    kept = [r for r in after if r['candidate_id'] in before]
    assert {r['candidate_id'] for r in kept} == set(before) - expired
    assert all(r == before[r['candidate_id']] for r in kept)  # recent records: not a byte changed
    anonymised = [r for r in after if r['candidate_id'] not in before]
    assert len(anonymised) == figures['anonymised']
    for row in anonymised:
        assert row['candidate_id'].startswith('anon-') and row['email'].endswith('@anonymised.invalid')
        assert row['first_name'] == row['last_name'] == row['city'] == '' and row['phone'] is None
        assert row['postcode'] is None or len(row['postcode']) in (2, 3)
        assert row['expected_salary'] % 10_000 == 0 and row['years_experience'] % 5 == 0
    # k-anonymity: every group of anonymised records has at least k members.
    groups = {}
    for row in anonymised:
        key = (row['postcode'], row['years_experience'], row['expected_salary'])
        groups[key] = groups.get(key, 0) + 1
    assert min(groups.values()) >= 2 and figures['k_reached'] >= 2
    assert figures['suppressed'] == len(expired) - len(anonymised)
    # Matches follow their candidate: the same pseudonym, so anonymised data stays linked to itself only.
    matches = keyed_write.read_parquet_dataset(str(copy / 'matches')).to_pylist()
    pseudonymous = {r['candidate_id'] for r in matches if r['candidate_id'].startswith('anon-')}
    assert pseudonymous and pseudonymous >= {r['candidate_id'] for r in anonymised if r['candidate_id'] in
                                             {m['candidate_id'] for m in matches}}
    assert {r['candidate_id'] for r in matches} - pseudonymous <= set(before) - expired
    # Employees expire with their last contract; payslips, lines and CPF credits by their own dates.
    employees = pq.read_table(copy / 'in' / 'employees.parquet').to_pylist()
    assert sum(r['employee_id'].startswith('anon-') for r in employees) == summary['datasets']['employees']['anonymised']
    assert summary['datasets']['employees']['expired'] == 10
    for row in employees:
        if row['employee_id'].startswith('anon-'):
            assert row['nir'].startswith('anon-') and row['birth_date'].month == row['birth_date'].day == 1
    assert summary['datasets']['payslips']['expired'] == 10
    assert summary['datasets']['payslip_lines']['expired'] == 0  # November 2026 lines are kept
    assert summary['datasets']['cpf_credits']['anonymised'] == 10


def test_anonymising_twice_equals_once_byte_for_byte(copy, tmp_path):
    _run(copy, tmp_path)
    once = file_bytes(copy)
    summary = _run(copy, tmp_path, '--force')
    assert file_bytes(copy) == once
    assert all(f['anonymised'] == f['suppressed'] == f['files_rewritten'] == 0 for f in summary['datasets'].values())


def test_a_dry_run_counts_and_changes_nothing(copy, tmp_path, capsys):
    before = file_bytes(copy)
    summary = _run(copy, tmp_path, '--preview')
    assert file_bytes(copy) == before
    assert summary['dry_run'] and summary['datasets']['candidates']['anonymised'] > 0
    assert summary['categories']['recruitment']['anonymised'] >= summary['datasets']['candidates']['anonymised']
    real = _run(copy, tmp_path)  # the dry run's own run key does not block the real run
    assert real['datasets']['candidates']['anonymised'] == summary['datasets']['candidates']['anonymised']
    assert real['datasets']['candidates']['suppressed'] == summary['datasets']['candidates']['suppressed']
    out = capsys.readouterr().out
    assert 'dry run' in out and 'recruitment' in out


def test_no_identifier_of_an_anonymised_person_nor_the_key_in_any_output_or_log(copy, tmp_path, world, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    cutoff = datetime.date(2024, 12, 1)
    gone = [r for r in world['candidates'].to_pylist() if r['last_contact_date'] < cutoff]
    employees = {r['employee_id']: r for r in pq.read_table(world['data'] / 'employees.parquet').to_pylist()}
    needles = {r['email'] for r in gone} | {r['phone'] for r in gone if r['phone']}
    candidate_ids = {r['candidate_id'].encode() for r in gone}  # contract ids share their shape: own check
    for employee_id in world['old_employees']:
        row = employees[employee_id]
        needles |= {employee_id, row['nir']} | ({row['email']} if row['email'] else set())
    needles = {n.encode() for n in needles}
    summary = _run(copy, tmp_path)
    assert summary['datasets']['candidates']['anonymised'] > 0
    captured = capfd.readouterr()
    logs = (captured.out + captured.err + caplog.text).encode()
    assert KEY.encode() not in logs
    haystacks = {'logs': logs}
    outputs = [copy / 'candidates', copy / 'matches', copy / 'contracts', copy / 'payslips-2019', copy / 'cpf_credits',
               copy / 'in' / 'employees.parquet', tmp_path / 'gdpr']
    for place in outputs:
        for path in ([place] if place.is_file() else sorted(p for p in place.rglob('*') if p.is_file())):
            data = path.read_bytes()
            if path.suffix == '.parquet':  # compressed on disk: search the decoded values too
                data += repr(pq.read_table(path).to_pylist()).encode()
            haystacks[str(path)] = data
    db = sqlite3.connect(tmp_path / 'gdpr' / 'hrbatch.db')
    haystacks['ledger'] = repr([db.execute(f'SELECT * FROM {t}').fetchall()
                                for t in ('hrbatch_runs', 'hrbatch_audit')]).encode()
    for where, data in haystacks.items():
        assert KEY.encode() not in data, where
        found = [n for n in needles if n in data]
        assert not found, (where, found[:3])
        if 'contracts' not in where:
            found = [n for n in candidate_ids if n in data]
            assert not found, (where, found[:3])


def test_the_key_is_in_no_display_data_nor_pipeline_options(copy, tmp_path):
    values = {'policy': str(copy / 'policy.yaml'), 'key_file': str(tmp_path / 'key'), 'key_env': None,
              'output': str(tmp_path / 'gdpr'), 'as_of': AS_OF, 'preview': False}
    config = gdpr_anonymize.AnonymizeConfig.from_values(values, run_id='r1')
    pipeline = beam.Pipeline(options=pipeline_options([]))
    gdpr_anonymize.build(pipeline, config)
    proto = pipeline.to_runner_api().SerializeToString()
    options = pipeline.options.get_all_options()
    displayed = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def visit_transform(self, node):
            if node.transform is None:
                return
            displayed.append(repr(node.transform.display_data()))
            if isinstance(node.transform, beam.ParDo):
                displayed.append(repr(node.transform.fn.display_data()) + repr(vars(node.transform.fn)))

        enter_composite_transform = visit_transform

    pipeline.visit(Visitor())
    assert displayed
    for text in (proto, repr(options).encode(), ''.join(displayed).encode()):
        assert KEY.encode() not in text
    os.environ['HRBATCH_TEST_GDPR_KEY'] = KEY
    try:
        config = gdpr_anonymize.AnonymizeConfig.from_values(
            dict(values, key_file=None, key_env='HRBATCH_TEST_GDPR_KEY'), run_id='r2')
        pipeline = beam.Pipeline(options=pipeline_options([]))
        gdpr_anonymize.build(pipeline, config)
        assert KEY.encode() not in pipeline.to_runner_api().SerializeToString()
    finally:
        del os.environ['HRBATCH_TEST_GDPR_KEY']


@pytest.mark.parametrize('override, message', [
    ({'candidates': {'name': 'applicants'}}, "unknown dataset 'applicants'"),
    ({'candidates': {'from': 'contact_day'}}, "unknown field 'contact_day' in \"from\""),
    ({'candidates': {'from': 'city'}}, "field 'city' is not a date"),
    ({'payslips': {'quasi_identifiers': ['salary']}}, "unknown field 'salary' in quasi_identifiers"),
    ({'candidates': {'retention': 'two years'}}, "retention 'two years' is not a period"),
    ({'candidates': {'category': 'misc'}}, "category 'misc' is not a data category"),
])
def test_a_bad_policy_fails_at_launch_naming_the_problem(copy, tmp_path, override, message):
    (copy / 'policy.yaml').write_text(policy_text(copy, **override))
    before = file_bytes(copy)
    with pytest.raises(ConfigError, match=message.replace('(', r'\(')):
        _run(copy, tmp_path)
    assert file_bytes(copy) == before


def test_a_missing_key_is_a_clear_error(copy, tmp_path):
    with pytest.raises(ConfigError, match='--key_file=.*cannot read the pseudonymisation key'):
        gdpr_anonymize.run(['--policy', str(copy / 'policy.yaml'), '--key_file', str(tmp_path / 'nope'),
                            '--output', str(tmp_path / 'gdpr')])
    with pytest.raises(ConfigError, match='exactly one of --key_file .* or --key_env'):
        gdpr_anonymize.run(['--policy', str(copy / 'policy.yaml'), '--output', str(tmp_path / 'gdpr')])
    with pytest.raises(ConfigError, match="--key_env='HRBATCH_NO_SUCH_KEY': the environment variable is not set"):
        gdpr_anonymize.run(['--policy', str(copy / 'policy.yaml'), '--key_env', 'HRBATCH_NO_SUCH_KEY',
                            '--output', str(tmp_path / 'gdpr')])
    (tmp_path / 'short').write_text('too short')
    with pytest.raises(ConfigError, match='needs at least 32'):
        gdpr_anonymize.run(['--policy', str(copy / 'policy.yaml'), '--key_file', str(tmp_path / 'short'),
                            '--output', str(tmp_path / 'gdpr')])


def test_every_run_is_in_the_audit_trail_and_the_chain_verifies(copy, tmp_path, capsys):
    _run(copy, tmp_path, '--preview')
    summary = _run(copy, tmp_path)
    url = f'sqlite:///{tmp_path / "gdpr" / "hrbatch.db"}'
    db = sqlite3.connect(tmp_path / 'gdpr' / 'hrbatch.db')
    rows = db.execute("SELECT action, run_key, counts, record_refs FROM hrbatch_audit WHERE operation = "
                      "'gdpr_anonymize' ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ['run.forced', 'run.succeeded', 'run.started', 'run.succeeded'] or \
        [r[0] for r in rows] == ['run.started', 'run.succeeded', 'run.started', 'run.succeeded']
    assert rows[1][1] == f'gdpr_anonymize:preview:{AS_OF}' and rows[3][1] == f'gdpr_anonymize:{AS_OF}'
    counts = json.loads(rows[3][2])
    assert counts['candidates.anonymised'] == summary['datasets']['candidates']['anonymised']
    params = db.execute("SELECT parameters FROM hrbatch_runs WHERE operation = 'gdpr_anonymize'").fetchall()
    assert all('key' not in json.loads(p[0]) for p in params)
    capsys.readouterr()
    assert runs_cli.audit_main(['verify', '--database', url]) == 0

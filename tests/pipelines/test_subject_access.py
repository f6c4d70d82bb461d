"""subject_access over every dataset: one bundle per person with exactly that person's records."""
import csv
import datetime
import io
import json
import sqlite3

import pyarrow.parquet as pq
import pytest

from pipelines import dsn
from pipelines import subject_access
from pipelines import runs_cli
from tests.pipelines.test_gdpr_anonymize import build_world
from transforms import dsn_format
from transforms.errors import ConfigError

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

AS_OF = '2026-12-01'
PERIOD = '2026-11'


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    world = build_world(tmp_path_factory.mktemp('sar') / 'world')
    root, data = world['root'], world['data']
    out = root / 'payroll'
    dsn.run(['--period', PERIOD, '--output', str(root / 'dsn'),
             '--payslips', str(out / 'payslips' / '*' / 'part-*.parquet'),
             '--payslip_lines', str(out / 'payslip_lines' / '*' / 'part-*.parquet'),
             '--employees', str(data / 'employees.parquet'), '--contracts', str(data / 'contracts.parquet'),
             '--establishments', str(data / 'establishments.parquet'),
             '--withholding_rates', str(data / 'withholding_rates.parquet'),
             '--ape_code', '6201Z', '--at_risk_code', '620AA', '--urssaf_id', '78861779300013',
             '--contact_civility', '02', '--contact_name', 'Marie Martin', '--contact_email', 'paie@example.fr',
             '--contact_phone', '0102030405', '--buckets', '4', '--ledger', f'sqlite:///{root / "ledger.db"}'])
    world['employees'] = pq.read_table(data / 'employees.parquet').to_pylist()
    return world


def _requests_csv(rows) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=['request_id', 'received', 'email', 'nir', 'candidate_id', 'employee_id',
                                             'extended'])
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue()


def _dataset_args(world):
    root, data = world['root'], world['data']
    return ['--candidates', str(root / 'candidates'), '--matches', str(root / 'matches'),
            '--employees', str(data / 'employees.parquet'), '--contracts', str(root / 'contracts'),
            '--payslips', str(root / 'payroll' / 'payslips'), '--payslip_lines', str(root / 'payroll' / 'payslip_lines'),
            '--cpf_credits', str(root / 'cpf_credits'), '--dsn', str(root / 'dsn' / 'files')]


@pytest.fixture(scope='module')
def answered(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('answers')
    candidates = world['candidates'].to_pylist()
    camille_a, camille_b = candidates[0], candidates[1]  # the same name, two people
    employee = next(e for e in world['employees'] if e['employee_id'] == 'E00000003')
    other = next(e for e in world['employees'] if e['employee_id'] == 'E00000004')
    rows = [
        dict(request_id='SAR-1', received='2026-11-20', email=camille_a['email'].upper()),
        dict(request_id='SAR-2', received='2026-11-20', candidate_id=camille_b['candidate_id']),
        dict(request_id='SAR-3', received='2026-10-01', nir=employee['nir']),             # late
        dict(request_id='SAR-4', received='2026-11-25', email='nobody.here@example.org'),  # unknown
        dict(request_id='SAR-5', received='2026-10-01', employee_id='E00000005', extended='true'),
        dict(request_id='SAR-6', received='2026-11-20', email='not-an-email'),
        dict(request_id='SAR-7', received='2026-11-20', nir=other['nir'][:13] + ('01' if other['nir'][13:] != '01' else '02')),
        dict(request_id='SAR-8', received='2026-11-20', email=camille_a['email'],
             candidate_id=camille_b['candidate_id']),                                      # two people
        dict(request_id='SAR-1', received='2026-11-21', email=camille_b['email']),         # repeated id
        dict(request_id='SAR-9', received='2026-11-30', nir=other['nir'], email=other['email'] or ''),
    ]
    path = tmp / 'requests.csv'
    path.write_text(_requests_csv(rows))
    output = tmp / 'out'
    summary = subject_access.run(['--subjects', str(path), '--output', str(output), '--as_of', AS_OF,
                                  *_dataset_args(world)])
    return {'summary': summary, 'output': output, 'camille_a': camille_a, 'camille_b': camille_b,
            'employee': employee, 'other': other, 'path': path}


def _bundle(answered, request_id) -> dict:
    return json.loads((answered['output'] / 'bundles' / request_id / 'bundle.json').read_text())


def _records(bundle, dataset):
    return bundle['datasets'][dataset]['records']


def test_each_dataset_is_read_once_whatever_the_number_of_requests(answered):
    passes = answered['summary']['passes_per_dataset']
    assert set(passes) == set(subject_access.DATASET_ORDER)
    assert all(p == 1.0 for p in passes.values()), passes


def test_a_candidate_bundle_holds_their_profile_and_matches_only(answered, world):
    a, b = answered['camille_a'], answered['camille_b']
    assert (a['first_name'], a['last_name']) == (b['first_name'], b['last_name'])
    bundle = _bundle(answered, 'SAR-1')
    assert [r['candidate_id'] for r in _records(bundle, 'candidates')] == [a['candidate_id']]
    matches = _records(bundle, 'matches')
    assert len(matches) == 2 and {m['candidate_id'] for m in matches} == {a['candidate_id']}
    assert all('score_required_skills' in m and m['weights'] for m in matches)  # explanations
    assert bundle['found'] and not bundle['request']['late']
    text = (answered['output'] / 'bundles' / 'SAR-1' / 'bundle.json').read_text() + \
        ''.join(p.read_text() for p in (answered['output'] / 'bundles' / 'SAR-1').glob('*.csv')) + \
        (answered['output'] / 'bundles' / 'SAR-1' / 'summary.html').read_text()
    assert b['candidate_id'] not in text and b['email'] not in text
    other = _bundle(answered, 'SAR-2')
    assert [r['candidate_id'] for r in _records(other, 'candidates')] == [b['candidate_id']]
    assert a['email'] not in json.dumps(other)


def test_no_bundle_ever_holds_another_persons_record(answered, world):
    ids_of = {}
    for request_id in ('SAR-1', 'SAR-2', 'SAR-3', 'SAR-5', 'SAR-9'):
        bundle = _bundle(answered, request_id)
        candidates = {r['candidate_id'] for r in _records(bundle, 'candidates')}
        employees = {r['employee_id'] for r in _records(bundle, 'employees')}
        assert len(candidates) + len(employees) == 1, request_id  # exactly one person
        for dataset in ('matches',):
            assert {r['candidate_id'] for r in _records(bundle, dataset)} <= candidates
        for dataset in ('contracts', 'payslips', 'payslip_lines', 'cpf_credits'):
            assert {r['employee_id'] for r in _records(bundle, dataset)} <= employees, (request_id, dataset)
        nirs = {r['nir'][:13] for r in _records(bundle, 'employees')}
        dsn_lines = _records(bundle, 'dsn')
        assert {r['value'] for r in dsn_lines if r['rubric'] == 'S21.G00.30.001'} <= nirs
        assert {r['value'] for r in dsn_lines if r['rubric'] == 'S21.G00.30.019'} <= employees
        ids_of[request_id] = candidates | employees
    assert len(set().union(*ids_of.values())) == len(ids_of)


def test_an_employee_bundle_has_every_dataset_and_the_dsn_block(answered, world):
    employee = answered['employee']
    bundle = _bundle(answered, 'SAR-3')
    assert [r['employee_id'] for r in _records(bundle, 'employees')] == ['E00000003']
    for dataset in ('contracts', 'payslips', 'payslip_lines'):
        assert _records(bundle, dataset), dataset
    assert _records(_bundle(answered, 'SAR-5'), 'employees')[0]['employee_id'] == 'E00000005'
    lines = _records(bundle, 'dsn')
    assert lines[0]['rubric'] == 'S21.G00.30.001' and lines[0]['value'] == employee['nir'][:13]
    assert {r['rubric'][:10] for r in lines} >= {'S21.G00.30', 'S21.G00.40', 'S21.G00.50', 'S21.G00.51'}
    # the lines are the file's lines, in order
    data = (world['root'] / 'dsn' / 'files' / lines[0]['file']).read_bytes()
    parsed = dsn_format.parse(data)
    assert all(parsed[r['line'] - 1] == (r['rubric'], r['value']) for r in lines)
    csv_rows = list(csv.DictReader(open(answered['output'] / 'bundles' / 'SAR-3' / 'payslip_lines.csv')))
    assert len(csv_rows) == len(_records(bundle, 'payslip_lines'))
    html = (answered['output'] / 'bundles' / 'SAR-3' / 'summary.html').read_text()
    for words in ('Purposes', 'recipients', 'retention', 'CNIL', 'Automated decision-making', 'right'):
        assert words.lower() in html.lower()
    assert 'http://' not in html and 'https://' not in html


def test_an_unknown_person_gets_an_empty_bundle_that_says_so(answered):
    bundle = _bundle(answered, 'SAR-4')
    assert not bundle['found'] and bundle['message'] == subject_access.NOT_FOUND
    assert all(not d['records'] for d in bundle['datasets'].values())
    assert subject_access.NOT_FOUND in (answered['output'] / 'bundles' / 'SAR-4' / 'summary.html').read_text()
    assert answered['summary']['subjects_not_found'] == 1


def test_malformed_and_conflicting_requests_are_dead_letters(answered):
    letters = [json.loads(line) for path in (answered['output'] / 'dead_letters').glob('*.jsonl')
               for line in path.read_text().splitlines()]
    errors = ' | '.join(sorted(letter['error'] for letter in letters))
    assert 'SAR-6: email is not an e-mail address' in errors
    assert 'SAR-7: nir is not a valid NIR' in errors
    assert 'request_id SAR-1 is repeated' in errors
    assert 'SAR-8: its identifiers (candidate_id, email) designate different candidates' in errors
    bundles = sorted(p.name for p in (answered['output'] / 'bundles').iterdir())
    assert bundles == ['SAR-1', 'SAR-2', 'SAR-3', 'SAR-4', 'SAR-5', 'SAR-9']
    assert answered['summary']['refused'] == 1


def test_deadlines_are_in_the_ledger_and_late_requests_flagged(answered, capsys):
    summary = answered['summary']
    assert summary['late'] == ['SAR-3']  # SAR-5 was extended to three months
    assert _bundle(answered, 'SAR-3')['request']['late'] is True
    assert _bundle(answered, 'SAR-3')['request']['deadline'] == '2026-11-01'
    assert _bundle(answered, 'SAR-5')['request']['deadline'] == '2027-01-01'
    url = f'sqlite:///{answered["output"] / "hrbatch.db"}'
    db = sqlite3.connect(answered['output'] / 'hrbatch.db')
    outputs = json.loads(db.execute("SELECT outputs FROM hrbatch_runs WHERE operation='subject_access'").fetchone()[0])
    tracked = {r['request_id']: r for r in outputs['requests']}
    assert tracked['SAR-3'] == {'request_id': 'SAR-3', 'received': '2026-10-01', 'deadline': '2026-11-01',
                                'late': True, 'status': 'found'}
    assert tracked['SAR-4']['status'] == 'not_found' and tracked['SAR-8']['status'] == 'refused'
    refs = json.loads(db.execute("SELECT record_refs FROM hrbatch_audit WHERE operation='subject_access' AND "
                                 "action='run.succeeded'").fetchone()[0])
    assert refs['late'] == ['SAR-3']
    capsys.readouterr()
    assert runs_cli.audit_main(['verify', '--database', url]) == 0


def test_bundles_are_the_same_on_rerun(answered, world, tmp_path):
    again = tmp_path / 'again'
    subject_access.run(['--subjects', str(answered['path']), '--output', str(again), '--as_of', AS_OF,
                        *_dataset_args(world)])
    for request_dir in (answered['output'] / 'bundles').iterdir():
        for path in request_dir.iterdir():
            assert (again / 'bundles' / request_dir.name / path.name).read_bytes() == path.read_bytes(), path


def test_bad_inputs_fail_at_launch(world, tmp_path):
    (tmp_path / 'bad.csv').write_text('id,name\n1,Camille\n')
    with pytest.raises(ConfigError, match='the header must have request_id, received'):
        subject_access.run(['--subjects', str(tmp_path / 'bad.csv'), '--output', str(tmp_path / 'o'),
                            *_dataset_args(world)])
    (tmp_path / 'ok.csv').write_text('request_id,received,email\nSAR-1,2026-11-01,a@b.fr\n')
    with pytest.raises(ConfigError, match='--payslips: no .parquet file'):
        subject_access.run(['--subjects', str(tmp_path / 'ok.csv'), '--output', str(tmp_path / 'o'),
                            '--payslips', str(tmp_path / 'nowhere')])
    with pytest.raises(ConfigError, match='give at least one dataset'):
        subject_access.run(['--subjects', str(tmp_path / 'ok.csv'), '--output', str(tmp_path / 'o')])


def test_request_parsing_and_deadlines():
    requests, letters = subject_access.parse_requests(
        'request_id,received,email,nir\nR1,2026-01-31, Jane.Doe@Example.COM ,\nR2,2026-13-01,a@b.fr,\n'
        'jane@example.com,2026-01-01,a@b.fr,\n')
    assert [r.request_id for r in requests] == ['R1'] and requests[0].email == 'jane.doe@example.com'
    assert requests[0].deadline == datetime.date(2026, 2, 28)
    assert len(letters) == 2 and 'received must be a date' in letters[0].error
    assert 'never personal data' in letters[1].error

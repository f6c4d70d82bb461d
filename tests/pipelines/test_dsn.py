"""The DSN pipeline end to end, on the payroll pipeline's own output: one valid file per
establishment, re-parsed and checked; contributions that add up; refusals that name the problem;
reruns that change no byte; no NIR in any log."""
import collections
import json
import logging
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import dsn
from pipelines import generate_payroll
from pipelines import payroll
from transforms import dsn_format as fmt
from transforms import schemas
from transforms.keyed_write import read_parquet_dataset

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

PERIOD = '2026-11'
EMPLOYEES = 400
ACCENTED = ('Lefèvre-Œuvray', 'Hélène')     # Œ is not ISO-8859-1: written OE


@pytest.fixture(scope='module')
def paid(tmp_path_factory):
    """Generated HR data (one employee renamed with accents) and the payroll output of the month."""
    root = tmp_path_factory.mktemp('dsn')
    data = root / 'in'
    generate_payroll.generate_payroll(str(data), employees=EMPLOYEES, period=PERIOD, seed=11)
    employees = pq.read_table(data / 'employees.parquet').to_pylist()
    employees[0]['last_name'], employees[0]['first_name'] = ACCENTED
    pq.write_table(pa.Table.from_pylist(employees, schema=schemas.EMPLOYEES.arrow_schema()), data / 'employees.parquet')
    out = root / 'payroll'
    args = ['--period', PERIOD, '--output', str(out), '--database', 'none', '--buckets', '4']
    for name in ('employees', 'contracts', 'variable_elements', 'withholding_rates', 'establishments'):
        args += [f'--{name}', str(data / f'{name}.parquet')]
    payroll.run(args)
    return {'root': root, 'data': data, 'payroll': out, 'employees': employees,
            'payslips': read_parquet_dataset(str(out / 'payslips')).to_pylist(),
            'lines': read_parquet_dataset(str(out / 'payslip_lines')).to_pylist(),
            'sites': pq.read_table(data / 'establishments.parquet').to_pylist()}


def _args(paid, output, employees=None, establishments=None, *extra):
    data, out = paid['data'], paid['payroll']
    return ['--period', PERIOD, '--output', str(output),
            '--payslips', str(out / 'payslips' / '*' / 'part-*.parquet'),
            '--payslip_lines', str(out / 'payslip_lines' / '*' / 'part-*.parquet'),
            '--employees', str(employees or data / 'employees.parquet'),
            '--contracts', str(data / 'contracts.parquet'),
            '--establishments', str(establishments or data / 'establishments.parquet'),
            '--withholding_rates', str(data / 'withholding_rates.parquet'),
            '--ape_code', '6201Z', '--at_risk_code', '620AA', '--urssaf_id', '78861779300013',
            '--contact_civility', '02', '--contact_name', 'Marie Martin', '--contact_email', 'paie@example.fr',
            '--contact_phone', '0102030405', '--buckets', '4', *extra]


@pytest.fixture(scope='module')
def declared(paid):
    output = paid['root'] / 'dsn'
    summary = dsn.run(_args(paid, output))
    files = {p.name: p.read_bytes() for p in sorted((output / 'files').glob('*.dsn'))}
    return {'output': output, 'summary': summary, 'files': files,
            'index': read_parquet_dataset(str(output / 'index')).to_pylist()}


def _paid_sites(paid):
    return sorted({s['establishment_siret'] for s in paid['payslips']})


def _individuals(rubrics):
    """Per employee (S21.G00.30.019, the employee key): its rubrics, in order."""
    people, current = {}, None
    for rubric, value in rubrics:
        if rubric == 'S21.G00.30.001':
            current = []
        if rubric.startswith('S90'):
            current = None
        if current is not None:
            current.append((rubric, value))
            if rubric == 'S21.G00.30.019':
                people[value] = current
    return people


def test_one_valid_file_per_paid_establishment(paid, declared):
    sites = _paid_sites(paid)
    assert len(sites) >= 3
    assert sorted(declared['files']) == sorted(dsn.file_name(site, PERIOD) for site in sites)
    assert declared['summary']['files_written'] == len(sites) and declared['summary']['establishments_refused'] == 0
    index = {row['establishment_siret']: row for row in declared['index']}
    headcount = {s['establishment_siret']: s['company_headcount'] for s in paid['sites']}
    for site in sites:
        data = declared['files'][dsn.file_name(site, PERIOD)]
        rubrics = fmt.parse(data)
        assert fmt.check(rubrics) == []
        assert all(len(line) <= fmt.MAX_LINE for line in data.decode('iso-8859-1').splitlines())
        values = dict(rubrics)
        assert values['S20.G00.05.001'] == '01' and values['S20.G00.05.002'] == '01'
        assert values['S20.G00.05.005'] == '01112026'
        assert values['S21.G00.06.001'] + values['S21.G00.11.001'] == site
        assert values['S90.G00.90.001'] == str(len(rubrics)) and values['S90.G00.90.002'] == '1'
        assert [r for r, _ in rubrics][:3] == ['S10.G00.00.001', 'S10.G00.00.002', 'S10.G00.00.003']
        people = _individuals(rubrics)
        mine = {s['employee_id'] for s in paid['payslips'] if s['establishment_siret'] == site}
        assert set(people) == mine
        row = index[site]
        assert row['status'] == 'written' and row['lines'] == len(rubrics) and row['employees'] == len(mine)
        assert row['path'].endswith(dsn.file_name(site, PERIOD)) and json.loads(row['problems']) == []
        assert row['due_date'] == fmt.due_date(PERIOD, headcount[site])
    # Both due days occur: companies on both sides of 50 (5 Dec 2026 is a Saturday: 7 Dec).
    assert {row['due_date'].day for row in declared['index']} == {7, 15}


def test_individual_lines_add_up_to_the_payslips_and_the_bordereau_to_them(paid, declared):
    contributions = collections.Counter()
    for line in paid['lines']:
        if line['kind'] in ('contribution', 'reduction'):
            contributions[line['employee_id']] += line['employee_cents'] + line['employer_cents']
    slips = {s['employee_id']: s for s in paid['payslips']}
    codes = {(c.individual_code, c.ctp) for c in dsn.load_codes().values() if c.ctp}
    urssaf_codes = {code for code, _ in codes}
    for data in declared['files'].values():
        rubrics = fmt.parse(data)
        urssaf_lines = 0
        for employee_id, mine in _individuals(rubrics).items():
            amounts = [fmt_cents(v) for r, v in mine if r == 'S21.G00.81.004']
            assert sum(amounts) == contributions[employee_id]
            values = collections.defaultdict(list)
            for r, v in mine:
                values[r].append(v)
            slip = slips[employee_id]
            assert values['S21.G00.50.004'] == [fmt.amount(slip['net_pay_cents'])]
            assert values['S21.G00.50.002'] == [fmt.amount(slip['net_taxable_cents'])]
            assert values['S21.G00.51.013'][0] == fmt.amount(slip['gross_cents'])
            assert values['S21.G00.30.001'] == [next(e['nir'] for e in paid['employees']
                                                     if e['employee_id'] == employee_id)[:13]]
            codes_81 = values['S21.G00.81.001']
            assert '018' in codes_81 or slip['rgdu_cents'] == 0
            urssaf_lines += sum(fmt_cents(v) for (r, v), (r0, code) in zip(
                _81_amounts(mine), _81_codes(mine)) if code in urssaf_codes)
        aggregated = [fmt_cents(v) for r, v in rubrics if r == 'S21.G00.23.005']
        assert sum(aggregated) == urssaf_lines
        blocks = fmt.blocks(rubrics)
        gross = sum(fmt_cents(values['013']) for name, values in blocks
                    if name == 'S21.G00.51' and values['011'] == '001')
        assessed = {(v['001'], v['002']): fmt_cents(v['004']) for name, v in blocks if name == 'S21.G00.23'}
        assert assessed[('100', '920')] == gross    # each employee's gross once, not once per code
        total = fmt_cents(dict(rubrics)['S21.G00.22.005'])
        assert total == fmt.euros_rounded(sum(aggregated)) and total % 100 == 0


def fmt_cents(value: str) -> int:
    sign = -1 if value.startswith('-') else 1
    euros, cents = value.lstrip('-').split('.')
    return sign * (int(euros) * 100 + int(cents))


def _81_codes(rubrics):
    return [(r, v) for r, v in rubrics if r == 'S21.G00.81.001']


def _81_amounts(rubrics):
    return [(r, v) for r, v in rubrics if r == 'S21.G00.81.004']


def test_accented_names_are_iso_8859_1(paid, declared):
    first = paid['employees'][0]
    site = next(s['establishment_siret'] for s in paid['payslips'] if s['employee_id'] == first['employee_id'])
    data = declared['files'][dsn.file_name(site, PERIOD)]
    assert "S21.G00.30.002,'Lefèvre-OEuvray'".encode('iso-8859-1') in data
    assert "S21.G00.30.004,'Hélène'".encode('iso-8859-1') in data
    assert 'Hélène'.encode('utf-8') not in data


def test_a_forced_rerun_publishes_byte_identical_files(paid, declared):
    output = declared['output']
    assert dsn.run(_args(paid, output)) == {'skipped': True, 'run_key': f'dsn:{PERIOD}'}
    dsn.run(_args(paid, output, None, None, '--force'))
    assert {p.name: p.read_bytes() for p in (output / 'files').glob('*.dsn')} == declared['files']
    assert not list(output.glob('.tmp-*'))


def test_invalid_nir_or_siren_refuses_only_that_establishment(paid, declared, tmp_path, caplog, capsys):
    # Everything this project logs, at any level (Beam's own DEBUG element dumps are the runner's, off
    # in production, and left out: they would print any pipeline's data).
    caplog.set_level(logging.INFO)
    for name in ('pipelines', 'transforms'):
        caplog.set_level(logging.DEBUG, logger=name)
    sites = _paid_sites(paid)
    bad_nir_site, bad_siren_site = sites[0], sites[1]
    victim = next(s['employee_id'] for s in paid['payslips'] if s['establishment_siret'] == bad_nir_site)
    employees = [dict(e) for e in paid['employees']]
    for employee in employees:
        if employee['employee_id'] == victim:
            key = int(employee['nir'][13:])
            employee['nir'] = employee['nir'][:13] + f'{(key + 1) % 97 or 1:02d}'
    employees_path = tmp_path / 'employees.parquet'
    pq.write_table(pa.Table.from_pylist(employees, schema=schemas.EMPLOYEES.arrow_schema()), employees_path)
    establishments = [dict(s) for s in paid['sites']]
    for site in establishments:
        if site['establishment_siret'] == bad_siren_site:
            siren = site['company_siren']
            site['company_siren'] = siren[:8] + str((int(siren[8]) + 1) % 10)
    sites_path = tmp_path / 'establishments.parquet'
    pq.write_table(pa.Table.from_pylist(establishments, schema=schemas.ESTABLISHMENTS.arrow_schema()), sites_path)
    # Into a copy of the valid run's output: the two refused establishments' old files are withdrawn.
    output = tmp_path / 'dsn'
    shutil.copytree(declared['output'] / 'files', output / 'files')
    summary = dsn.run(_args(paid, output, employees_path, sites_path))
    assert summary['files_written'] == len(sites) - 2 and summary['establishments_refused'] == 2
    files = {p.name: p.read_bytes() for p in (output / 'files').glob('*.dsn')}
    assert set(files) == {dsn.file_name(s, PERIOD) for s in sites[2:]}
    for name, data in files.items():
        assert data == declared['files'][name]
    index = {row['establishment_siret']: row for row in read_parquet_dataset(str(output / 'index')).to_pylist()}
    assert index[bad_nir_site]['status'] == 'refused' and index[bad_nir_site]['path'] is None
    assert json.loads(index[bad_nir_site]['problems']) == [f'employee {victim}: invalid NIR (15 characters with '
                                                           'a valid key expected)']
    assert any('SIREN is invalid' in p for p in json.loads(index[bad_siren_site]['problems']))
    letters = [json.loads(line) for path in (output / 'dead_letters').glob('*.jsonl')
               for line in path.read_text().splitlines()]
    assert any(victim in letter['error'] and bad_nir_site in letter['error'] and 'invalid NIR' in letter['error']
               for letter in letters)
    # No NIR (whole, or the 13 characters a DSN carries) in dead letters, logs or the console.
    captured = capsys.readouterr()
    seen = caplog.text + captured.out + captured.err + json.dumps(letters)
    nirs = {e['nir'] for e in employees} | {e['nir'][:13] for e in employees}
    assert not [nir for nir in nirs if nir in seen]
    assert f'for {bad_nir_site} refused' in caplog.text

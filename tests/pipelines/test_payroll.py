"""The payroll pipeline end to end: payslips equal the engine's, bad inputs are dead letters, reruns
change nothing."""
import datetime
import json
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import payroll
from transforms import payroll_inputs
from transforms import payroll_rules
from transforms import payslips
from transforms import schemas
from transforms.errors import ConfigError
from transforms.keyed_write import read_parquet_dataset

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

PERIOD = '2026-11'
SITE_A, SITE_B = '73282932000074', '73282932000082'  # one company (SIREN 732829320), two establishments
SITE_C = '55208131766522'                            # another company, 60 employees


def _nir(i: int) -> str:
    """A valid NIR (key computed as DOMAIN.md says), different for each i."""
    body = f'1{80 + i % 20:02d}{1 + i % 12:02d}75{100 + i:03d}{i:03d}'
    return body + f'{97 - int(body) % 97:02d}'


def _employee(i, **extra):
    row = dict(employee_id=f'E{i:03d}', nir=_nir(i), last_name=f'Nom{i}', first_name=f'Prénom{i}',
               birth_date=datetime.date(1980 + i % 20, 1 + i % 12, 1), cadre=i % 4 == 0, alsace_moselle=False,
               low_qualification=False)
    row.update(extra)
    return row


def _contract(i, site=SITE_A, start=datetime.date(2020, 1, 1), end=None, hours=35.0, salary=None, suffix=''):
    return dict(contract_id=f'C{i:03d}{suffix}', employee_id=f'E{i:03d}', establishment_siret=site,
                contract_type='CDI' if end is None else 'CDD', start_date=start, end_date=end, weekly_hours=hours,
                monthly_salary=salary if salary is not None else 1900.0 + 350.0 * i)


def _write(path, rows, schema):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.arrow_schema()), path)
    return str(path)


@pytest.fixture()
def inputs(tmp_path):
    good = list(range(1, 21))
    employees = [_employee(i) for i in good]
    contracts = [_contract(i, site=SITE_B if i % 3 == 0 else SITE_A) for i in good if i != 20]
    contracts[4] = _contract(5, start=datetime.date(2026, 11, 16), salary=3000.0)      # hired mid-month
    employees.append(_employee(21, nir='185057800608499'))                               # invalid NIR key
    contracts.append(_contract(21))
    employees.append(_employee(22))                                                      # two sites at once
    contracts += [_contract(22, site=SITE_A), _contract(22, site=SITE_C, start=datetime.date(2026, 11, 10), suffix='b')]
    employees.append(_employee(23))                                                      # contract ends before it starts
    contracts.append(_contract(23, start=datetime.date(2026, 11, 20), end=datetime.date(2026, 11, 5)))
    employees.append(_employee(24))                                                      # negative overtime
    contracts.append(_contract(24))
    employees.append(_employee(25, alsace_moselle=True))
    contracts.append(_contract(25, site=SITE_C, hours=24.0, salary=1500.0))
    contracts.append(_contract(26))                                                      # no employee record
    variables = [dict(employee_id='E002', period=PERIOD, overtime_hours=12.0, bonus=250.0, unpaid_absence_hours=0.0),
                 dict(employee_id='E003', period=PERIOD, overtime_hours=0.0, bonus=0.0, unpaid_absence_hours=14.0),
                 dict(employee_id='E003', period='2026-10', overtime_hours=99.0, bonus=0.0, unpaid_absence_hours=0.0),
                 dict(employee_id='E024', period=PERIOD, overtime_hours=-3.0, bonus=0.0, unpaid_absence_hours=0.0)]
    rates = [dict(employee_id=f'E{i:03d}', period=PERIOD, pas_rate=round(1.5 * i, 1)) for i in good if i % 2]
    establishments = [
        dict(establishment_siret=SITE_A, company_siren='732829320', name='Siège', company_headcount=40,
             at_mp_rate=1.1, mobility_rate=2.95),
        dict(establishment_siret=SITE_B, company_siren='732829320', name='Dépôt', company_headcount=40,
             at_mp_rate=2.4, mobility_rate=1.6),
        dict(establishment_siret=SITE_C, company_siren='552081317', name='Usine', company_headcount=60,
             at_mp_rate=3.0, mobility_rate=0.0),
    ]
    return {
        'employees': _write(tmp_path / 'employees.parquet', employees, schemas.EMPLOYEES),
        'contracts': _write(tmp_path / 'contracts.parquet', contracts, schemas.CONTRACTS),
        'variable_elements': _write(tmp_path / 'variable_elements.parquet', variables, schemas.VARIABLE_ELEMENTS),
        'withholding_rates': _write(tmp_path / 'withholding_rates.parquet', rates, schemas.WITHHOLDING_RATES),
        'establishments': _write(tmp_path / 'establishments.parquet', establishments, schemas.ESTABLISHMENTS),
        'rows': dict(employees=employees, contracts=contracts, variables=variables, rates=rates,
                     establishments=establishments),
    }


def _run(inputs, output, *extra):
    args = ['--period', PERIOD, '--output', str(output)]
    for name in ('employees', 'contracts', 'variable_elements', 'withholding_rates', 'establishments'):
        args += [f'--{name}', inputs[name]]
    return payroll.run(args + ['--buckets', '4', *extra])


def _dead_letters(output):
    return [json.loads(line) for path in sorted((output / 'dead_letters').glob('*.jsonl'))
            for line in path.read_text().splitlines()]


def _expected(inputs):
    """The engine on the valid employees, assembled directly (no Beam)."""
    rows = inputs['rows']
    valid = {f'E{i:03d}' for i in list(range(1, 20)) + [25]}
    tables = {
        'employees': pa.Table.from_pylist([r for r in rows['employees'] if r['employee_id'] in valid],
                                          schema=schemas.EMPLOYEES.arrow_schema()),
        'contracts': pa.Table.from_pylist([r for r in rows['contracts'] if r['employee_id'] in valid],
                                          schema=schemas.CONTRACTS.arrow_schema()),
        'variables': pa.Table.from_pylist([r for r in rows['variables'] if r['employee_id'] in valid
                                           and r['period'] == PERIOD], schema=schemas.VARIABLE_ELEMENTS.arrow_schema()),
        'rates': pa.Table.from_pylist(rows['rates'], schema=schemas.WITHHOLDING_RATES.arrow_schema()),
        'sites': pa.Table.from_pylist(rows['establishments'], schema=schemas.ESTABLISHMENTS.arrow_schema()),
    }
    assembled = payroll_inputs.assemble(PERIOD, tables['employees'], tables['contracts'], tables['variables'],
                                        tables['rates'], tables['sites'], {})
    assert not assembled.dead_letters
    return payslips.compute(assembled.month, payroll_rules.PayrollRules.for_period(PERIOD))


def _sorted_rows(table, key):
    return sorted(table.to_pylist(), key=lambda r: tuple(r[k] for k in key))


def test_payslips_of_valid_employees_equal_the_engine_and_bad_ones_are_dead_letters(tmp_path, inputs):
    output = tmp_path / 'out'
    summary = _run(inputs, output)
    expected_lines, expected_totals = _expected(inputs)
    totals = read_parquet_dataset(str(output / 'payslips'))
    lines = read_parquet_dataset(str(output / 'payslip_lines'))
    assert _sorted_rows(totals, ['employee_id']) == _sorted_rows(expected_totals, ['employee_id'])
    assert _sorted_rows(lines, ['employee_id', 'line']) == _sorted_rows(expected_lines, ['employee_id', 'line'])
    assert summary['employees_paid'] == 20 and summary['employees_without_contract'] == 1  # E020
    letters = _dead_letters(output)
    by_employee = {}
    for letter in letters:
        if letter['step'] == payroll_inputs.STEP:
            by_employee[json.loads(letter['payload'])['employee_id']] = letter['error']
    assert set(by_employee) == {'E021', 'E022', 'E023', 'E024', 'E026'}
    assert 'in two establishments at once' in by_employee['E022']
    assert 'ReadEmployees' in by_employee['E021'] and 'ReadContracts' in by_employee['E023']
    assert 'ReadVariableElements' in by_employee['E024']
    assert 'no employee record' in by_employee['E026']
    # The read rejections are dead letters of their own too, naming the field.
    read_errors = [letter['error'] for letter in letters if letter['step'] != payroll_inputs.STEP]
    assert any('nir' in error for error in read_errors)
    assert any('end_date must not be before start_date' in error for error in read_errors)
    # Payroll dead letters name the employee key, never the NIR.
    for letter in letters:
        if letter['step'] == payroll_inputs.STEP:
            assert not any(row['nir'] in letter['error'] + letter['payload'] for row in inputs['rows']['employees'])
    assert summary['dead_letters'] == len(letters)


def test_control_totals_add_up_per_establishment(tmp_path, inputs):
    output = tmp_path / 'out'
    _run(inputs, output)
    totals = read_parquet_dataset(str(output / 'payslips')).to_pylist()
    lines = read_parquet_dataset(str(output / 'payslip_lines')).to_pylist()
    controls = {(r['establishment_siret'], r['item']): r['value']
                for r in read_parquet_dataset(str(output / 'controls')).to_pylist()}
    site_of = {t['employee_id']: t['establishment_siret'] for t in totals}
    for site in (SITE_A, SITE_B, SITE_C):
        mine = [t for t in totals if t['establishment_siret'] == site]
        assert controls[(site, 'headcount')] == len(mine) > 0
        for name in ('gross', 'net_pay', 'employer_cost', 'rgdu', 'pas'):
            assert controls[(site, name)] == sum(t[f'{name}_cents'] for t in mine)
        for rubric in ('vieillesse_plafonnee', 'csg_deductible', 'at_mp'):
            assert controls[(site, f'employer:{rubric}')] == sum(
                line['employer_cents'] for line in lines
                if line['rubric'] == rubric and site_of[line['employee_id']] == site)
    with sqlite3.connect(output / 'hrbatch.db') as db:
        assert db.execute('SELECT COUNT(*) FROM payroll_controls').fetchone()[0] == len(controls)


def test_rerun_gives_the_same_payslips_and_files_never_duplicates(tmp_path, inputs):
    output = tmp_path / 'out'
    _run(inputs, output)
    first = {p.relative_to(output): p.read_bytes() for p in output.rglob('*.parquet')}
    assert _run(inputs, output) == {'skipped': True, 'run_key': f'payroll:{PERIOD}'}
    _run(inputs, output, '--force')
    assert {p.relative_to(output): p.read_bytes() for p in output.rglob('*.parquet')} == first
    assert not list(output.glob('.spill/*')), 'the rows spilled for grouping are removed once paid'
    with sqlite3.connect(output / 'hrbatch.db') as db:
        assert db.execute('SELECT COUNT(*) FROM payslips').fetchone()[0] == 20
        lines = db.execute('SELECT COUNT(*) FROM payslip_lines').fetchone()[0]
    assert lines == read_parquet_dataset(str(output / 'payslip_lines')).num_rows


def test_a_month_without_rules_fails_at_launch_naming_it(tmp_path, inputs):
    args = ['--period', '2025-12', '--output', str(tmp_path / 'out')]
    for name in ('employees', 'contracts', 'establishments'):
        args += [f'--{name}', inputs[name]]
    with pytest.raises(ConfigError, match='no payroll rule for 2025-12'):
        payroll.run(args)


def test_the_rgdu_continues_from_the_previous_payslips_of_the_year(tmp_path):
    from pipelines import generate_payroll
    data = tmp_path / 'in'
    generate_payroll.generate_payroll(str(data), employees=200, period='2026-11', seed=8)

    def pay(period, *extra):
        args = ['--period', period, '--output', str(tmp_path / period), '--database', 'none', '--buckets', '4']
        for name in generate_payroll.DATASETS:
            args += [f'--{name}', str(data / f'{name}.parquet')]
        payroll.run(args + list(extra))
        return {r['employee_id']: r for r in read_parquet_dataset(str(tmp_path / period / 'payslips')).to_pylist()}

    october = pay('2026-10')
    alone = pay('2026-11')
    november = pay('2026-11', '--previous_payslips', str(tmp_path / '2026-10' / 'payslips' / '*' / 'part-*.parquet'),
                   '--run_key', 'payroll:2026-11:progressive')
    both = sorted(set(october) & set(november))
    assert len(both) > 150
    regularised = 0
    for employee_id in both:
        oct_, nov = october[employee_id], november[employee_id]
        assert nov['ytd_gross_cents'] == oct_['ytd_gross_cents'] + nov['gross_cents']
        assert nov['ytd_smic_reference_cents'] == oct_['ytd_smic_reference_cents'] + nov['smic_reference_cents']
        assert nov['rgdu_cents'] == nov['ytd_rgdu_cents'] - oct_['ytd_rgdu_cents']
        regularised += nov['rgdu_cents'] != alone[employee_id]['rgdu_cents']
        assert nov['gross_cents'] == alone[employee_id]['gross_cents']
    assert regularised > 0  # months that differ make the progressive result differ from the month alone
    for employee_id in set(november) - set(october):  # hired in November: the month alone
        assert november[employee_id]['rgdu_cents'] == alone[employee_id]['rgdu_cents']


def test_successive_contracts_in_one_establishment_are_paid_as_one_and_two_establishments_are_refused():
    employees = [_employee(1), _employee(2)]
    contracts = [
        _contract(1, start=datetime.date(2026, 6, 1), end=datetime.date(2026, 11, 15), salary=2000.0),  # CDD ends
        _contract(1, start=datetime.date(2026, 11, 16), salary=2400.0, hours=35.0, suffix='b'),        # then CDI
        _contract(2, start=datetime.date(2026, 1, 1), end=datetime.date(2026, 11, 10), salary=2000.0),
        _contract(2, site=SITE_B, start=datetime.date(2026, 11, 11), salary=2000.0, suffix='b'),
    ]
    sites = [dict(establishment_siret=site, company_siren='732829320', name='x', company_headcount=40,
                  at_mp_rate=1.0, mobility_rate=0.0) for site in (SITE_A, SITE_B)]

    def table(rows, schema):
        return pa.Table.from_pylist(rows, schema=schema.arrow_schema())
    assembled = payroll_inputs.assemble(
        PERIOD, table(employees, schemas.EMPLOYEES), table(contracts, schemas.CONTRACTS),
        table([], schemas.VARIABLE_ELEMENTS), table([], schemas.WITHHOLDING_RATES), table(sites, schemas.ESTABLISHMENTS),
        {})
    assert [letter.error for letter in assembled.dead_letters] == [
        'employee E002 not paid: contracts in 2 establishments in one month (C002, C002b): each establishment '
        'pays its own; not supported yet']
    assert assembled.month.column('employee_id').to_pylist() == ['E001']
    assert assembled.month.column('presence_days').to_pylist() == [30]
    _, totals = payslips.compute(assembled.month, payroll_rules.PayrollRules.for_period(PERIOD))
    assert totals.column('gross_cents').to_pylist() == [2200_00]  # 2,000 x 15/30 + 2,400 x 15/30

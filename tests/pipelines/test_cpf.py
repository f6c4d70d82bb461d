"""The CPF pipeline on two months of real payroll output: credits from the payslips' hours, once."""
import decimal
import sqlite3

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cpf
from pipelines import generate_payroll
from pipelines import payroll
from transforms import schemas
from transforms.keyed_write import read_parquet_dataset

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(scope='module')
def year_of_payslips(tmp_path_factory):
    """Payroll for October and November 2026 on 300 generated employees."""
    root = tmp_path_factory.mktemp('cpf')
    data = root / 'in'
    generate_payroll.generate_payroll(str(data), employees=300, period='2026-11', seed=4)
    for period in ('2026-10', '2026-11'):
        args = ['--period', period, '--output', str(root / f'payroll-{period}'), '--database', 'none', '--buckets', '4']
        for name in generate_payroll.DATASETS:
            args += [f'--{name}', str(data / f'{name}.parquet')]
        payroll.run(args)
    return root


def _run(root, output, *extra):
    return cpf.run(['--year', '2026', '--payslips', str(root / 'payroll-2026-*' / 'payslips' / '*' / 'part-*.parquet'),
                    '--employees', str(root / 'in' / 'employees.parquet'), '--output', str(output),
                    '--buckets', '4', *extra])


def test_credits_follow_the_hours_of_every_payslip_of_the_year(tmp_path, year_of_payslips):
    root = year_of_payslips
    balances = [dict(employee_id='E00000001', balance=4980.0, last_credited_year=2025),
                dict(employee_id='E00000002', balance=120.0, last_credited_year=2026)]
    pq.write_table(pa.Table.from_pylist(balances, schema=schemas.CPF_BALANCES.arrow_schema()), tmp_path / 'b.parquet')
    absences = [dict(employee_id='E00000003', year=2026, kind='maternity', hours=900.0),
                dict(employee_id='E00000004', year=2025, kind='maternity', hours=900.0)]
    pq.write_table(pa.Table.from_pylist(absences, schema=schemas.ABSENCES.arrow_schema()), tmp_path / 'a.parquet')
    summary = _run(root, tmp_path / 'out', '--balances', str(tmp_path / 'b.parquet'),
                   '--absences', str(tmp_path / 'a.parquet'))
    credits = {r['employee_id']: r for r in read_parquet_dataset(str(tmp_path / 'out' / 'cpf_credits')).to_pylist()}
    payslips = pa.concat_tables([read_parquet_dataset(str(root / f'payroll-{p}' / 'payslips'))
                                 for p in ('2026-10', '2026-11')])
    hours = {}
    for row in payslips.to_pylist():
        hours[row['employee_id']] = hours.get(row['employee_id'], 0.0) + row['hours_paid']
    employees = pq.read_table(root / 'in' / 'employees.parquet').to_pylist()
    assert len(credits) == len(employees) == summary['employees_read']
    for employee in employees:
        row = credits[employee['employee_id']]
        worked = hours.get(employee['employee_id'], 0.0) + (900.0 if employee['employee_id'] == 'E00000003' else 0)
        annual = 800 if employee['low_qualification'] else 500
        expected = annual if worked >= 803.5 else (decimal.Decimal(annual) * decimal.Decimal(repr(worked)) / 1607
                                                   ).quantize(decimal.Decimal('0.01'), decimal.ROUND_CEILING)
        assert row['hours_worked'] + row['hours_absences_counted'] == pytest.approx(worked)
        if employee['employee_id'] == 'E00000001':
            assert row['credit_cents'] == min(int(expected * 100), 20_00)  # 20 EUR of room under the cap
            assert row['balance_after_cents'] == 5000_00 and row['status'] == 'capped'
        elif employee['employee_id'] == 'E00000002':
            assert row['status'] == 'already_credited' and row['credit_cents'] == 0
        else:
            assert row['credit_cents'] == int(expected * 100), employee['employee_id']
    assert 0 < summary['employees_credited'] <= len(employees)
    # Two months of hours alone are below half the reference time; the 900 h of maternity are counted.
    assert credits['E00000003']['hours_absences_counted'] == 900.0
    assert credits['E00000003']['credit_cents'] == credits['E00000003']['annual_credit_cents']


def test_running_the_year_twice_never_credits_twice(tmp_path, year_of_payslips):
    output = tmp_path / 'out'
    first = _run(year_of_payslips, output)
    files = {p.relative_to(output): p.read_bytes() for p in output.rglob('*.parquet')}
    assert _run(year_of_payslips, output) == {'skipped': True, 'run_key': 'cpf:2026'}
    again = _run(year_of_payslips, output, '--force')
    assert again['credited_cents'] == first['credited_cents']
    assert {p.relative_to(output): p.read_bytes() for p in output.rglob('*.parquet')} == files
    with sqlite3.connect(output / 'hrbatch.db') as db:
        (rows, total), = db.execute('SELECT COUNT(*), SUM(credit_cents) FROM cpf_credits').fetchall()
    assert rows == first['credits_written'] and total == first['credited_cents']


def test_an_employee_with_a_rejected_record_gets_no_credit_and_a_dead_letter(tmp_path, year_of_payslips):
    absences = [dict(employee_id='E00000005', year=2026, kind='maternity', hours=-10.0),
                dict(employee_id='E00000006', year=2026, kind='holiday', hours=10.0)]
    pq.write_table(pa.Table.from_pylist(absences, schema=schemas.ABSENCES.arrow_schema()), tmp_path / 'a.parquet')
    summary = _run(year_of_payslips, tmp_path / 'out', '--absences', str(tmp_path / 'a.parquet'), '--database', 'none')
    credits = {r['employee_id'] for r in read_parquet_dataset(str(tmp_path / 'out' / 'cpf_credits')).to_pylist()}
    assert 'E00000005' not in credits and 'E00000006' not in credits and 'E00000007' in credits
    letters = [line for path in (tmp_path / 'out' / 'dead_letters').glob('*.jsonl')
               for line in path.read_text().splitlines()]
    not_credited = [line for line in letters if 'not credited' in line]
    assert len(not_credited) == 2 and summary['dead_letters'] == len(letters) == 4  # 2 read + 2 not credited

"""The yearly CPF credit of each employee, computed on whole Arrow tables (DOMAIN.md, CPF).

Hours = hours paid in the year (the payslips' ``hours_paid``) + absences the CPF counts as worked
(maternity, paternity, adoption, parental presence, family support, parental leave, work accident,
occupational disease). At or above half the reference time (1,607 h): the annual credit, 500 EUR
(800 EUR below qualification level 3). Below it: annual credit x hours / reference, rounded UP to
the cent. The counter is capped at 5,000 EUR (8,000 EUR): the credit is what fits under the cap.
A year up to the employee's ``last_credited_year`` is never credited again (``already_credited``):
with the output keyed by (employee, year), running a year twice never credits twice. The figures
are dated rows of transforms/rules/payroll_parameters.csv, in force on 31 December of the year.
"""
import datetime
import typing

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms import schemas
from transforms.dead_letters import DeadLetter
from transforms.payroll_rules import CPF_PARAMETERS
from transforms.payroll_rules import parameters_in_force

STEP = 'CreditCpf'


class Credits(typing.NamedTuple):
    credits: pa.Table                  # schemas.CPF_CREDITS, sorted by employee_id
    dead_letters: list[DeadLetter]


def parameters(year: int) -> dict:
    return parameters_in_force(CPF_PARAMETERS, datetime.date(year, 12, 31), f'rule for the CPF of {year}')


def _sum_by_employee(table: pa.Table, column: str) -> pa.Table:
    if not table.num_rows:
        return pa.table({'employee_id': pa.array([], pa.string()), column: pa.array([], pa.float64())})
    summed = table.group_by('employee_id').aggregate([(column, 'sum')])
    return pa.table({'employee_id': summed.column('employee_id'), column: summed.column(f'{column}_sum')})


def credit(year: int, hours: pa.Table, absences: pa.Table, employees: pa.Table, balances: pa.Table) -> Credits:
    """``hours``: (employee_id, hours_paid) rows of the year's payslips; ``absences``: schemas.ABSENCES
    rows of the year; ``employees``: schemas.EMPLOYEES; ``balances``: schemas.CPF_BALANCES."""
    p = parameters(year)
    reference = float(p['cpf_reference_hours'])
    worked = _sum_by_employee(hours.select(['employee_id', 'hours_paid']), 'hours_paid')
    counted = absences.filter(pc.is_in(absences.column('kind'), pa.array(schemas.CPF_COUNTED_ABSENCES)))
    counted = _sum_by_employee(counted.select(['employee_id', 'hours']), 'hours')
    letters = []
    known = employees.column('employee_id')
    for name, table in (('payslips', worked), ('absences', counted), ('a CPF balance', balances)):
        for employee_id in pc.filter(table.column('employee_id'), pc.invert(pc.is_in(table.column('employee_id'),
                                                                                      known))).to_pylist():
            letters.append(DeadLetter(step=STEP, error=f'employee {employee_id} not credited: {name} but no '
                                      'employee record', payload=f'{{"employee_id": "{employee_id}"}}', source=''))
    rows = (employees.select(['employee_id', 'low_qualification'])
            .join(worked, 'employee_id', join_type='left outer')
            .join(counted, 'employee_id', join_type='left outer')
            .join(balances.select(['employee_id', 'balance', 'last_credited_year']), 'employee_id',
                  join_type='left outer')
            .sort_by('employee_id'))
    n = rows.num_rows
    paid = rows.column('hours_paid').fill_null(0.0).to_numpy(zero_copy_only=False)
    absent = rows.column('hours').fill_null(0.0).to_numpy(zero_copy_only=False)
    low = rows.column('low_qualification').to_numpy(zero_copy_only=False).astype(bool)
    annual = np.where(low, int(p['cpf_low_qualification_credit'] * 100), int(p['cpf_annual_credit'] * 100))
    cap = np.where(low, int(p['cpf_low_qualification_cap'] * 100), int(p['cpf_cap'] * 100))
    total = paid + absent
    # Rounded up to the cent; the 1e-6 keeps float noise (500 x 401.75 / 1607 = 125.0000000001) from adding one.
    prorata = np.ceil(np.round(annual * total / reference, 6)).astype(np.int64)
    earned = np.where(total >= reference / 2, annual, prorata)
    before = np.round(rows.column('balance').fill_null(0.0).to_numpy(zero_copy_only=False) * 100).astype(np.int64)
    last = rows.column('last_credited_year').fill_null(0).to_numpy(zero_copy_only=False)
    done = last >= year
    room = np.maximum(cap - before, 0)
    credit_cents = np.where(done, 0, np.minimum(earned, room))
    status = np.select([done, total <= 0, before >= cap, credit_cents < earned],
                       ['already_credited', 'no_hours', 'at_cap', 'capped'], 'credited')
    table = pa.table({
        'employee_id': rows.column('employee_id'), 'year': pa.array(np.full(n, year, dtype=np.int64)),
        'hours_worked': paid, 'hours_absences_counted': absent, 'annual_credit_cents': annual, 'cap_cents': cap,
        'credit_cents': credit_cents, 'balance_before_cents': before, 'balance_after_cents': before + credit_cents,
        'status': pa.array(status.astype(object), pa.string()),
    }, schema=schemas.CPF_CREDITS.arrow_schema())
    return Credits(table, letters)

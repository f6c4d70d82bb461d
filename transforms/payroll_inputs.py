"""Assemble one month's payroll input per employee, and say exactly who cannot be paid and why.

``assemble`` works on the records of a set of employees (a hash bucket of ``employee_id``: every
record of an employee lands in the same bucket): employees, contracts, variable elements and
withholding rates, plus the ids of employees one of whose records was rejected when read. It returns
the ``payslips.MONTH_INPUT`` rows of the employees who can be paid, and a dead letter naming the
employee key (never the NIR) for each one who cannot, so that nobody is paid wrongly and everybody
valid is paid:

- a record of the employee was rejected when read (an invalid NIR, a contract ending before it
  starts, negative hours, ...): paying without it could pay a wrong amount;
- the employee record appears twice, or two variable-element or withholding rows for the month;
- contracts that overlap in time: in two establishments at once, or twice in one;
- contracts in two establishments in one month (each establishment would pay its own part: not
  supported yet). Successive contracts in one establishment (a fixed-term contract followed by a
  permanent one) are paid as one: their days of presence add up;
- a contract in an establishment that is not in the establishments input;
- a contract, variable elements or a withholding rate whose employee is not in the employees input,
  and variable elements or a withholding rate for an employee with no contract in the month.

An employee with no contract in the month gets no payslip and no dead letter (counted apart).
"""
import calendar
import collections
import datetime
import json
import typing

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms import payslips
from transforms.dead_letters import DeadLetter

STEP = 'AssemblePayroll'


class Assembled(typing.NamedTuple):
    month: pa.Table                  # payslips.MONTH_INPUT, sorted by employee_id
    dead_letters: list[DeadLetter]
    without_contract: int            # employees with no contract in the month


def month_bounds(period: str) -> tuple[datetime.date, datetime.date]:
    year, month = int(period[:4]), int(period[5:7])
    return datetime.date(year, month, 1), datetime.date(year, month, calendar.monthrange(year, month)[1])


def contracts_in_month(contracts: pa.Table, period: str) -> pa.Table:
    """The contracts running during ``period``, with their ``presence_days`` in it."""
    first, last = month_bounds(period)
    start = pc.max_element_wise(contracts.column('start_date'), pa.scalar(first, pa.date32()))
    end = pc.min_element_wise(contracts.column('end_date').fill_null(pa.scalar(last, pa.date32())),
                              pa.scalar(last, pa.date32()))
    days = pc.add(pc.days_between(start, end), 1)
    running = pc.greater(days, 0)
    return contracts.append_column('presence_days', days.cast(pa.int64())).filter(running)


def _letter(employee_id: str, error: str, records: dict) -> DeadLetter:
    payload = json.dumps({'employee_id': employee_id, **records}, ensure_ascii=False, sort_keys=True, default=str)
    return DeadLetter(step=STEP, error=f'employee {employee_id} not paid: {error}', payload=payload, source='')


def _ids(table: pa.Table) -> list[str]:
    return table.column('employee_id').to_pylist()


def _duplicates(ids: pa.Array) -> set[str]:
    if not len(ids):
        return set()
    counts = pc.value_counts(ids)
    return set(counts.field('values').filter(pc.greater(counts.field('counts'), 1)).to_pylist())


def _contract_reason(rows: list[dict]) -> str | None:
    """Why these contracts of one month cannot be paid together; None when they follow one another
    in one establishment (a fixed-term contract renewed, then a permanent one: paid as one)."""
    rows = sorted(rows, key=lambda r: (r['start_date'], r['contract_id']))
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            a_end = a['end_date'] or datetime.date.max
            if b['start_date'] <= a_end:
                if a['establishment_siret'] != b['establishment_siret']:
                    return (f'in two establishments at once: contracts {a["contract_id"]} '
                            f'({a["establishment_siret"]}) and {b["contract_id"]} ({b["establishment_siret"]}) '
                            f'overlap from {b["start_date"]}')
                return f'contracts {a["contract_id"]} and {b["contract_id"]} overlap from {b["start_date"]}'
    if len({r['establishment_siret'] for r in rows}) > 1:
        return (f'contracts in {len({r["establishment_siret"] for r in rows})} establishments in one month '
                f'({", ".join(r["contract_id"] for r in rows)}): each establishment pays its own; not supported yet')
    return None


def _one_row_per_employee(month: pa.Table, several: set[str]) -> pa.Table:
    """Successive contracts of one employee in the month (same establishment, no overlap) as one row:
    days of presence added up, the monthly salary and the weekly hours averaged over those days, so
    the base pay is the sum of each contract's prorated salary."""
    columns = ['employee_id', 'establishment_siret', 'weekly_hours', 'monthly_salary', 'presence_days']
    month = month.select(columns)
    if not several:
        return month
    multiple = pc.is_in(month.column('employee_id'), pa.array(sorted(several), pa.string()))
    grouped = month.filter(multiple)
    days = grouped.column('presence_days').cast(pa.float64())
    grouped = grouped.append_column('salary_days', pc.multiply(grouped.column('monthly_salary'), days)) \
        .append_column('hours_days', pc.multiply(grouped.column('weekly_hours'), days))
    summed = grouped.group_by(['employee_id', 'establishment_siret']).aggregate(
        [('presence_days', 'sum'), ('salary_days', 'sum'), ('hours_days', 'sum')])
    total = summed.column('presence_days_sum')
    merged = pa.table({
        'employee_id': summed.column('employee_id'), 'establishment_siret': summed.column('establishment_siret'),
        'weekly_hours': pc.divide(summed.column('hours_days_sum'), total.cast(pa.float64())),
        'monthly_salary': pc.divide(summed.column('salary_days_sum'), total.cast(pa.float64())),
        'presence_days': total,
    })
    return pa.concat_tables([month.filter(pc.invert(multiple)), merged.cast(month.schema)])


def rows_for_period(name: str, batch: pa.RecordBatch, period: str) -> pa.RecordBatch:
    """The rows of a read batch that a payroll of ``period`` uses: those of the month for inputs
    with a ``period`` (variable elements, withholding rates, the month's payslips), those of the year
    before it for ``previous_payslips``; other inputs whole."""
    if 'period' not in batch.schema.names:
        return batch
    if name == 'previous_payslips':
        return batch.filter(pc.and_(pc.starts_with(batch.column('period'), period[:5]),
                                    pc.less(batch.column('period'), period)))
    return batch.filter(pc.equal(batch.column('period'), period))


YTD_COLUMNS = ('ytd_gross_cents', 'ytd_smic_reference_cents', 'ytd_rgdu_cents')


def latest_year_to_date(previous: pa.Table, period: str) -> pa.Table:
    """(employee_id, ytd_*) of each employee's latest payslip of the same year before ``period``:
    the year-to-date totals the RGDU's progressive computation continues from."""
    mine = previous.filter(pc.and_(pc.starts_with(previous.column('period'), period[:5]),
                                   pc.less(previous.column('period'), period)))
    if not mine.num_rows:
        return pa.table({'employee_id': pa.array([], pa.string()),
                         **{name: pa.array([], pa.int64()) for name in YTD_COLUMNS}})
    latest = mine.group_by('employee_id').aggregate([('period', 'max')])
    latest = pa.table({'employee_id': latest.column('employee_id'), 'period': latest.column('period_max')})
    return mine.join(latest, ['employee_id', 'period'], join_type='inner').select(['employee_id', *YTD_COLUMNS])


def assemble(period: str, employees: pa.Table, contracts: pa.Table, variables: pa.Table, rates: pa.Table,
             establishments: pa.Table, blocked: dict[str, str], previous: pa.Table | None = None) -> Assembled:
    """See the module docstring. ``variables`` and ``rates`` hold the rows of ``period`` only;
    ``blocked`` maps an employee id to why one of its records was rejected at read; ``previous``:
    earlier payslips of the year (``schemas.PAYSLIPS`` columns employee_id, period, ytd_*), if any."""
    letters: dict[str, DeadLetter] = {}

    def refuse(employee_id, error, **records):
        letters.setdefault(employee_id, _letter(employee_id, error, records))

    for employee_id, why in sorted(blocked.items()):
        refuse(employee_id, why)
    for employee_id in sorted(_duplicates(employees.column('employee_id'))):
        refuse(employee_id, 'the employee record appears more than once')
    for name, table in (('variable elements', variables), ('withholding rate', rates)):
        for employee_id in sorted(_duplicates(table.column('employee_id'))):
            refuse(employee_id, f'more than one {name} row for {period}')

    known_ids = employees.column('employee_id')
    known = set(known_ids.to_pylist())
    month = contracts_in_month(contracts, period)
    month_ids = month.column('employee_id')
    several = _duplicates(month_ids)
    unknown = pc.invert(pc.is_in(month_ids, known_ids))
    no_site = pc.invert(pc.is_in(month.column('establishment_siret'), establishments.column('establishment_siret')))
    suspect = pc.or_(pc.or_(unknown, no_site), pc.is_in(month_ids, pa.array(sorted(several), pa.string())))
    by_employee = collections.defaultdict(list)  # only the few employees with a problem, as Python rows
    for row in month.filter(suspect).select(['employee_id', 'contract_id', 'establishment_siret', 'start_date',
                                             'end_date']).to_pylist():
        by_employee[row['employee_id']].append(row)
    sites = set(establishments.column('establishment_siret').to_pylist())
    for employee_id, rows in sorted(by_employee.items()):
        if employee_id not in known:
            refuse(employee_id, 'contract ' + ', '.join(r['contract_id'] for r in rows) +
                   ' has no employee record', contracts=rows)
        elif len(rows) > 1 and _contract_reason(rows):
            refuse(employee_id, _contract_reason(rows), contracts=rows)
        elif rows[0]['establishment_siret'] not in sites:
            refuse(employee_id, f'establishment {rows[0]["establishment_siret"]} of contract '
                   f'{rows[0]["contract_id"]} is not in the establishments input', contracts=rows)
    with_contract = set(month_ids.to_pylist())
    for name, table in (('variable elements', variables), ('a withholding rate', rates)):
        for employee_id in sorted(set(_ids(table)) - with_contract):
            refuse(employee_id, f'{name} for {period} but no contract in {period}'
                   + ('' if employee_id in known else ' and no employee record'))

    payable = pa.array(sorted(with_contract - set(letters)), pa.string())
    employees = employees.filter(pc.is_in(employees.column('employee_id'), payable))
    month = _one_row_per_employee(month.filter(pc.is_in(month.column('employee_id'), payable)), several)
    joined = (month.select(['employee_id', 'establishment_siret', 'weekly_hours', 'monthly_salary', 'presence_days'])
              .join(employees.select(['employee_id', 'cadre', 'alsace_moselle']), 'employee_id')
              .join(establishments.select(['establishment_siret', 'company_headcount', 'at_mp_rate',
                                           'mobility_rate']), 'establishment_siret')
              .join(variables.select(['employee_id', 'overtime_hours', 'bonus', 'unpaid_absence_hours']),
                    'employee_id', join_type='left outer')
              .join(rates.select(['employee_id', 'pas_rate']), 'employee_id', join_type='left outer'))
    if previous is not None:
        joined = joined.join(latest_year_to_date(previous, period), 'employee_id', join_type='left outer')
    n = joined.num_rows
    days = month_bounds(period)[1].day
    joined = (joined.set_column(joined.schema.get_field_index('overtime_hours'), 'overtime_hours',
                                joined.column('overtime_hours').fill_null(0.0))
              .set_column(joined.schema.get_field_index('bonus'), 'bonus', joined.column('bonus').fill_null(0.0))
              .set_column(joined.schema.get_field_index('unpaid_absence_hours'), 'unpaid_absence_hours',
                          joined.column('unpaid_absence_hours').fill_null(0.0))
              .append_column('days_in_month', pa.array(np.full(n, days, dtype=np.int64))))
    for name in YTD_COLUMNS:
        if name not in joined.column_names:
            joined = joined.append_column(name, pa.nulls(joined.num_rows, pa.int64()))
    ordered = joined.select(payslips.MONTH_INPUT.names).cast(payslips.MONTH_INPUT).sort_by('employee_id')
    without_contract = len(known - with_contract - set(letters))
    return Assembled(ordered, [letters[k] for k in sorted(letters)], without_contract)

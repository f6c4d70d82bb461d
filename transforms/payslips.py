"""The payslip of each employee for one month, computed on whole Arrow tables at once.

``compute(month, rules)`` takes one row per employee (``MONTH_INPUT``: the contract data of the
month, already prorated to the days of presence, with the month's variable elements) and returns
the payslip lines and the payslip totals as Arrow tables. Every amount is an integer number of
cents; every line is rounded to the cent, half up, on its own (rates are integer parts per million,
so the rounding is exact, not a float artefact).

Rules applied (DOMAIN.md, with ``transforms/rules/`` for the figures):
- Gross = base salary x days of presence / days in the month (calendar-day proration of an
  incomplete month) - unpaid absence hours x hourly rate + overtime + bonuses. Hourly rate = monthly
  salary / (weekly hours x 52 / 12). Overtime (full time): the first 8 h a week (34.67 h a month) at
  +25 %, beyond at +50 %; extra hours of a part-time contract: up to a tenth of the contract hours at
  +10 %, beyond at +25 %.
- Social security ceiling P = PMSS, x days of presence / 30 (at most 30) for an incomplete month,
  x weekly hours / 35 for part time (CSS R242-2 and L242-8). T1 = min(gross, P), T2 = the part
  between P and 8 P.
- CSG/CRDS base = 98.25 % of gross up to 4 P + gross above 4 P + the employer's prévoyance
  contribution. "CSG non déductible et CRDS" is one line at 2.90 %, as on most French payslips (this
  is what makes DOMAIN.md's worked SMIC example come out at 1,443.10).
- Net avant impôt = gross - employee contributions; net imposable = net avant impôt + CSG non
  déductible and CRDS; PAS = personal rate (else the taux neutre grid) x net imposable; net à payer =
  net avant impôt - PAS.
- RGDU, computed progressively over the year (CSS D241-7): with the year-to-date gross G and SMIC
  reference S (this month included; ``ytd_*`` inputs carry the previous months'), C = Tmin + Tdelta
  x (0.5 x (3 x S / G - 1)) ^ 1.75, at most Tmin + Tdelta, 0 at or above 3 SMIC, rounded to 4
  decimals; the month's reduction = C x G - the reduction of the previous months (negative when
  the earlier months took too much: the regularisation). SMIC reference of a month = the RGDU SMIC
  x hours paid (contract hours of the days of presence - absence hours + overtime hours). With no
  previous month (January, or no history given) it is the month's own computation.
- Employer cost = gross + employer contributions - RGDU.
"""
import numpy as np
import pyarrow as pa

from transforms import schemas
from transforms.payroll_rules import PayrollRules

PPM = 1_000_000
WEEKS_PER_MONTH = 52 / 12

MONTH_INPUT = pa.schema([
    pa.field('employee_id', pa.string(), nullable=False),
    pa.field('establishment_siret', pa.string(), nullable=False),
    pa.field('cadre', pa.bool_(), nullable=False),
    pa.field('alsace_moselle', pa.bool_(), nullable=False),
    pa.field('company_headcount', pa.int64(), nullable=False),
    pa.field('at_mp_rate', pa.float64(), nullable=False),        # percent
    pa.field('mobility_rate', pa.float64(), nullable=False),     # percent
    pa.field('weekly_hours', pa.float64(), nullable=False),
    pa.field('monthly_salary', pa.float64(), nullable=False),    # EUR for a full month of the contract
    pa.field('presence_days', pa.int64(), nullable=False),
    pa.field('days_in_month', pa.int64(), nullable=False),
    pa.field('overtime_hours', pa.float64(), nullable=False),
    pa.field('bonus', pa.float64(), nullable=False),             # EUR
    pa.field('unpaid_absence_hours', pa.float64(), nullable=False),
    pa.field('pas_rate', pa.float64(), nullable=True),           # percent; null: the taux neutre grid
    # Year to date before this month (the previous payslip's ytd_* totals); null: none this year.
    pa.field('ytd_gross_cents', pa.int64(), nullable=True),
    pa.field('ytd_smic_reference_cents', pa.int64(), nullable=True),
    pa.field('ytd_rgdu_cents', pa.int64(), nullable=True),
])

LINES = schemas.PAYSLIP_LINES.arrow_schema()
TOTALS = schemas.PAYSLIPS.arrow_schema()


def round_cents(values: np.ndarray) -> np.ndarray:
    """Float amounts in cents -> integer cents, half up (away from zero), after removing float noise."""
    values = np.round(np.asarray(values, dtype=np.float64), 6)
    return (np.sign(values) * np.floor(np.abs(values) + 0.5)).astype(np.int64)


def apply_rate(base_cents: np.ndarray, ppm) -> np.ndarray:
    """``base x rate`` rounded half up to the cent, in exact integer arithmetic."""
    product = np.abs(base_cents) * np.asarray(ppm, dtype=np.int64)
    return np.sign(base_cents) * ((product + PPM // 2) // PPM)


def _param(rules: PayrollRules, name: str) -> float:
    return float(rules.value(name))


def _cents_param(rules: PayrollRules, name: str) -> int:
    return int(rules.value(name) * 100)


def _overtime_pay(month: dict, hourly: np.ndarray, rules: PayrollRules) -> np.ndarray:
    full_time = month['weekly_hours'] >= _param(rules, 'full_time_weekly_hours')
    monthly_hours = month['weekly_hours'] * WEEKS_PER_MONTH
    threshold = np.where(full_time, _param(rules, 'overtime_first_hours_weekly') * WEEKS_PER_MONTH, monthly_hours / 10)
    first_rate = np.where(full_time, _param(rules, 'overtime_first_rate'), _param(rules, 'part_time_extra_first_rate'))
    second_rate = np.where(full_time, _param(rules, 'overtime_second_rate'), _param(rules, 'part_time_extra_second_rate'))
    hours = month['overtime_hours']
    first = np.minimum(hours, threshold)
    return round_cents(hourly * 100 * (first * first_rate + (hours - first) * second_rate))


def _conditions(month: dict, gross: np.ndarray, ceiling: np.ndarray) -> dict:
    headcount = month['company_headcount']
    everyone = np.ones(len(gross), dtype=bool)
    return {'all': everyone, 'cadre': month['cadre'], 'alsace_moselle': month['alsace_moselle'],
            'not_alsace_moselle': ~month['alsace_moselle'], 'above_pmss': gross > ceiling,
            'under_50': headcount < 50, '50_plus': headcount >= 50, 'under_11': headcount < 11,
            '11_plus': headcount >= 11}


def _establishment_ppm(rubric: str, month: dict) -> np.ndarray:
    column = {'at_mp': 'at_mp_rate', 'versement_mobilite': 'mobility_rate'}[rubric]
    return np.round(month[column] * 10_000).astype(np.int64)


class _Lines:
    """Payslip lines gathered rubric by rubric (one vectorised block each), assembled once at the end:
    numbers concatenated with numpy, strings taken once per column (no Python object per line)."""

    _NUMBERS = (('base_cents', np.int64), ('hours', np.float64), ('employee_rate', np.float64),
                ('employer_rate', np.float64), ('employee_cents', np.int64), ('employer_cents', np.int64))

    def __init__(self, employee_ids: pa.Array, period: str):
        self._ids, self._period, self._blocks = employee_ids, period, []
        self._texts = []  # (rubric, kind, label) of each line position, in rule order

    def add(self, mask, rubric, kind, label, *, employee, employer=0, base=None, hours=None,
            employee_rate=None, employer_rate=None):
        n = len(self._ids)
        position = len(self._texts)  # a rubric's line number is its place in the rule order, whoever has it
        self._texts.append((rubric, kind, label))
        rows = np.flatnonzero(np.broadcast_to(mask, (n,)))
        if not len(rows):
            return
        given = {'base_cents': base, 'hours': hours, 'employee_rate': employee_rate,
                 'employer_rate': employer_rate, 'employee_cents': employee, 'employer_cents': employer}
        block = {'rows': rows, 'position': np.full(len(rows), position, dtype=np.int32)}
        for name, dtype in self._NUMBERS:
            value = given[name]
            block[name] = None if value is None else np.broadcast_to(np.asarray(value, dtype=dtype), (n,))[rows]
        self._blocks.append(block)

    def table(self) -> pa.Table:
        if not self._blocks:
            return LINES.empty_table()
        rows = np.concatenate([b['rows'] for b in self._blocks])
        position = np.concatenate([b['position'] for b in self._blocks])
        # In key order, (employee_id, period, rubric): by employee (input order, which is sorted),
        # then rubric name, so the Parquet writer finds them sorted. ``line`` keeps the rule order.
        rubric_rank = np.argsort(np.argsort([texts[0] for texts in self._texts], kind='stable'))
        order = np.argsort(rows.astype(np.int64) * len(self._texts) + rubric_rank[position], kind='stable')
        columns = {'employee_id': self._ids.take(pa.array(rows[order])),
                   'period': pa.array([self._period]).take(pa.array(np.zeros(len(order), dtype=np.int32))),
                   'line': pa.array(position[order])}
        by_position = pa.array(position[order])
        for index, name in enumerate(('rubric', 'kind', 'label')):
            columns[name] = pa.array([texts[index] for texts in self._texts]).take(by_position)
        for name, dtype in self._NUMBERS:
            parts = [b[name] if b[name] is not None else np.zeros(len(b['rows']), dtype=dtype) for b in self._blocks]
            valid = [np.full(len(b['rows']), b[name] is not None) for b in self._blocks]
            mask = ~np.concatenate(valid)[order]
            columns[name] = pa.array(np.concatenate(parts)[order], mask=mask if mask.any() else None)
        return pa.table(columns, schema=LINES)


def compute(month: pa.Table, rules: PayrollRules) -> tuple[pa.Table, pa.Table]:
    """Payslip lines (``LINES``) and totals (``TOTALS``) of every row of ``month`` (``MONTH_INPUT``)."""
    for name in ('ytd_gross_cents', 'ytd_smic_reference_cents', 'ytd_rgdu_cents'):
        if name not in month.column_names:  # no history given: the month alone
            month = month.append_column(name, pa.nulls(month.num_rows, pa.int64()))
    month = month.select(MONTH_INPUT.names).cast(MONTH_INPUT)
    m = {name: month.column(name).fill_null(0).to_numpy(zero_copy_only=False) if name.startswith('ytd_') else
         month.column(name).to_numpy(zero_copy_only=False) for name in MONTH_INPUT.names if name != 'pas_rate'}
    for flag in ('cadre', 'alsace_moselle'):
        m[flag] = m[flag].astype(bool)
    ids = month.column('employee_id').combine_chunks()
    lines = _Lines(ids, rules.period)

    # Gross.
    monthly_hours = m['weekly_hours'] * WEEKS_PER_MONTH
    hourly = m['monthly_salary'] / monthly_hours
    presence = m['presence_days'] / m['days_in_month']
    base_pay = round_cents(m['monthly_salary'] * 100 * presence)
    absence = round_cents(hourly * 100 * m['unpaid_absence_hours'])
    overtime = _overtime_pay(m, hourly, rules)
    bonus = round_cents(m['bonus'] * 100)
    gross = base_pay - absence + overtime + bonus
    lines.add(True, 'salaire_base', 'gross', 'Salaire de base', employee=base_pay, hours=monthly_hours * presence)
    lines.add(absence != 0, 'absence_non_remuneree', 'gross', 'Absence non rémunérée', employee=-absence,
              hours=m['unpaid_absence_hours'])
    lines.add(overtime != 0, 'heures_supplementaires', 'gross', 'Heures supplémentaires ou complémentaires',
              employee=overtime, hours=m['overtime_hours'])
    lines.add(bonus != 0, 'prime', 'gross', 'Primes', employee=bonus)

    # Ceiling and bases.
    full_time_hours = _param(rules, 'full_time_weekly_hours')
    full_month = m['presence_days'] >= m['days_in_month']
    ceiling_float = _cents_param(rules, 'pmss') * np.where(full_month, 1.0, np.minimum(m['presence_days'], 30) / 30)
    ceiling = round_cents(ceiling_float * np.minimum(m['weekly_hours'] / full_time_hours, 1.0))
    t1 = np.minimum(gross, ceiling)
    t2 = np.clip(gross - ceiling, 0, 7 * ceiling)
    cap = int(rules.value('csg_abatement_cap_pmss')) * ceiling
    bases = {'gross': gross, 't1': t1, 't2': t2, 't1_t2': t1 + t2, 'gross_4pmss': np.minimum(gross, cap)}
    conditions = _conditions(m, gross, ceiling)

    employee_total = np.zeros(len(gross), dtype=np.int64)
    employer_total = np.zeros(len(gross), dtype=np.int64)
    employer_in_csg_base = np.zeros(len(gross), dtype=np.int64)
    csg_rubrics = []
    for contribution in rules.contributions:
        if contribution.base == 'csg':
            csg_rubrics.append(contribution)  # its base needs the employer's prévoyance: after the others
            continue
        employer_ppm = (_establishment_ppm(contribution.rubric, m) if contribution.employer_ppm is None
                        else contribution.employer_ppm)
        base = bases[contribution.base]
        employee_amount = apply_rate(base, contribution.employee_ppm)
        employer_amount = apply_rate(base, employer_ppm)
        mask = conditions[contribution.applies_to] & ((employee_amount != 0) | (employer_amount != 0))
        employee_amount, employer_amount = np.where(mask, employee_amount, 0), np.where(mask, employer_amount, 0)
        if contribution.rubric == 'prevoyance_cadres':
            employer_in_csg_base += employer_amount
        employee_total += employee_amount
        employer_total += employer_amount
        lines.add(mask, contribution.rubric, 'contribution', contribution.label, base=base, employee=employee_amount,
                  employer=employer_amount, employee_rate=contribution.employee_ppm / 10_000,
                  employer_rate=np.asarray(employer_ppm) / 10_000)

    csg_ratio_ppm = int(rules.value('csg_base_ratio') * PPM)
    csg_base = apply_rate(bases['gross_4pmss'], csg_ratio_ppm) + (gross - bases['gross_4pmss']) + employer_in_csg_base
    non_deductible = np.zeros(len(gross), dtype=np.int64)
    for contribution in csg_rubrics:
        amount = np.where(conditions[contribution.applies_to], apply_rate(csg_base, contribution.employee_ppm), 0)
        employee_total += amount
        if contribution.rubric != 'csg_deductible':
            non_deductible += amount
        lines.add(conditions[contribution.applies_to], contribution.rubric, 'contribution', contribution.label,
                  base=csg_base, employee=amount, employee_rate=contribution.employee_ppm / 10_000)

    # RGDU.
    hours_paid = monthly_hours * presence - m['unpaid_absence_hours'] + m['overtime_hours']
    smic_reference = round_cents(_param(rules, 'rgdu_smic_hourly') * 100 * hours_paid)
    tmin = _param(rules, 'rgdu_tmin')
    tdelta = np.where(m['company_headcount'] < 50, _param(rules, 'rgdu_tdelta_under_50'),
                      _param(rules, 'rgdu_tdelta_50_plus'))
    ytd_gross = m['ytd_gross_cents'] + gross
    ytd_smic = m['ytd_smic_reference_cents'] + smic_reference
    with np.errstate(divide='ignore', invalid='ignore'):
        ratio = np.where(ytd_gross > 0, 3 * ytd_smic / np.maximum(ytd_gross, 1), 0.0)
    raw = tmin + tdelta * np.power(np.maximum(0.5 * (ratio - 1), 0.0), _param(rules, 'rgdu_exponent'))
    coefficient_e4 = np.where(ratio > 1, round_cents(np.minimum(raw, tmin + tdelta) * 10_000), 0)
    ytd_rgdu = (coefficient_e4 * np.maximum(ytd_gross, 0) + 5_000) // 10_000
    rgdu = ytd_rgdu - m['ytd_rgdu_cents']
    lines.add(rgdu != 0, 'rgdu', 'reduction', 'Réduction générale dégressive unique', base=gross,
              employee=0, employer=-rgdu, employer_rate=coefficient_e4 / 100)

    # Net and withholding tax.
    net_before_tax = gross - employee_total
    net_taxable = net_before_tax + non_deductible
    grid_limits = np.array([limit if limit is not None else np.iinfo(np.int64).max for limit, _ in rules.taux_neutre])
    grid_rates = np.array([ppm for _, ppm in rules.taux_neutre], dtype=np.int64)
    neutral_ppm = grid_rates[np.minimum(np.searchsorted(grid_limits, net_taxable, side='left'), len(grid_rates) - 1)]
    personal = month.column('pas_rate')
    personal_ppm = np.round(personal.fill_null(0).to_numpy(zero_copy_only=False) * 10_000).astype(np.int64)
    pas_ppm = np.where(personal.is_null().to_numpy(zero_copy_only=False), neutral_ppm, personal_ppm)
    pas = apply_rate(np.maximum(net_taxable, 0), pas_ppm)
    lines.add(True, 'pas', 'tax', 'Impôt sur le revenu prélevé à la source', base=net_taxable, employee=pas,
              employee_rate=pas_ppm / 10_000)

    totals = pa.table({
        'employee_id': ids, 'period': pa.array([rules.period] * len(gross)),
        'establishment_siret': month.column('establishment_siret'),
        'gross_cents': gross, 'employee_contributions_cents': employee_total,
        'net_before_tax_cents': net_before_tax, 'net_taxable_cents': net_taxable,
        'pas_rate': pas_ppm / 10_000, 'pas_cents': pas, 'net_pay_cents': net_before_tax - pas,
        'employer_contributions_cents': employer_total, 'rgdu_coefficient': coefficient_e4 / 10_000,
        'rgdu_cents': rgdu, 'employer_cost_cents': gross + employer_total - rgdu, 'ceiling_cents': ceiling,
        'hours_paid': hours_paid, 'smic_reference_cents': smic_reference,
        'ytd_gross_cents': ytd_gross, 'ytd_smic_reference_cents': ytd_smic, 'ytd_rgdu_cents': ytd_rgdu,
    }, schema=TOTALS)
    return lines.table(), totals


"""Worked payslips, line by line.

Each case is checked against a reference written here independently of the engine: one payslip at
a time, in ``decimal`` arithmetic, with the rates typed in from DOMAIN.md's table (not read from
transforms/rules/, so a wrong row there fails here). DOMAIN.md's worked SMIC example is checked
against its published figures.
"""
import decimal
from decimal import Decimal as D

import pyarrow as pa
import pytest

from transforms import payroll_rules
from transforms import payslips
from transforms.errors import ConfigError

CENT = D('0.01')

# DOMAIN.md, "Payroll 2026": rubric -> (base, employee %, employer %, condition).
DOMAIN_RATES = {
    'maladie': ('gross', '0', '13.00', 'all'),
    'maladie_alsace_moselle': ('gross', '1.30', '0', 'alsace_moselle'),
    'csa': ('gross', '0', '0.30', 'all'),
    'vieillesse_plafonnee': ('t1', '6.90', '8.55', 'all'),
    'vieillesse_deplafonnee': ('gross', '0.40', '2.11', 'all'),
    'allocations_familiales': ('gross', '0', '5.25', 'all'),
    'chomage': ('gross_4pmss', '0', '4.00', 'all'),
    'ags': ('gross_4pmss', '0', '0.25', 'all'),
    'agirc_arrco_t1': ('t1', '3.15', '4.72', 'all'),
    'agirc_arrco_t2': ('t2', '8.64', '12.95', 'all'),
    'ceg_t1': ('t1', '0.86', '1.29', 'all'),
    'ceg_t2': ('t2', '1.08', '1.62', 'all'),
    'cet': ('t1_t2', '0.14', '0.21', 'above_pmss'),
    'apec': ('gross_4pmss', '0.024', '0.036', 'cadre'),
    'prevoyance_cadres': ('t1', '0', '1.50', 'cadre'),
    'fnal_under_50': ('t1', '0', '0.10', 'under_50'),
    'fnal_50_plus': ('gross', '0', '0.50', '50_plus'),
    'dialogue_social': ('gross', '0', '0.016', 'all'),
    'formation_under_11': ('gross', '0', '0.55', 'under_11'),
    'formation_11_plus': ('gross', '0', '1.00', '11_plus'),
    'taxe_apprentissage': ('gross', '0', '0.68', 'not_alsace_moselle'),
    'taxe_apprentissage_alsace_moselle': ('gross', '0', '0.44', 'alsace_moselle'),
    'at_mp': ('gross', '0', None, 'all'),
    'versement_mobilite': ('gross', '0', None, '11_plus'),
}


def _row(**overrides):
    row = dict(employee_id='E1', establishment_siret='73282932000074', cadre=False, alsace_moselle=False,
               company_headcount=10, at_mp_rate=0.0, mobility_rate=0.0, weekly_hours=35.0, monthly_salary=1823.03,
               presence_days=30, days_in_month=30, overtime_hours=0.0, bonus=0.0, unpaid_absence_hours=0.0,
               pas_rate=None)
    row.update(overrides)
    return row


def _compute(period, *rows):
    return payslips.compute(pa.Table.from_pylist(list(rows), schema=payslips.MONTH_INPUT),
                            payroll_rules.PayrollRules.for_period(period))


def _pct(base: D, rate: str) -> D:
    return (base * D(rate) / 100).quantize(CENT, decimal.ROUND_HALF_UP)


def reference(row: dict, smic_rgdu: str = '12.02') -> dict:
    """One payslip by the book, in euros: rubric -> (base, employee, employer), plus totals.
    Covers salary, proration and bonuses; overtime and absences are checked in their own test."""
    hours_month = D(str(row['weekly_hours'])) * 52 / 12
    presence = D(row['presence_days']) / D(row['days_in_month'])
    salary = D(str(row['monthly_salary']))
    gross = (salary * presence).quantize(CENT, decimal.ROUND_HALF_UP) + D(str(row['bonus']))
    full_month = row['presence_days'] >= row['days_in_month']
    ceiling = D('4005') * (1 if full_month else D(min(row['presence_days'], 30)) / 30)
    ceiling = (ceiling * min(D(str(row['weekly_hours'])) / 35, D(1))).quantize(CENT, decimal.ROUND_HALF_UP)
    bases = {'gross': gross, 't1': min(gross, ceiling), 't2': min(max(gross - ceiling, D(0)), 7 * ceiling),
             'gross_4pmss': min(gross, 4 * ceiling)}
    bases['t1_t2'] = bases['t1'] + bases['t2']
    holds = {'all': True, 'cadre': row['cadre'], 'alsace_moselle': row['alsace_moselle'],
             'not_alsace_moselle': not row['alsace_moselle'], 'above_pmss': gross > ceiling,
             'under_50': row['company_headcount'] < 50, '50_plus': row['company_headcount'] >= 50,
             'under_11': row['company_headcount'] < 11, '11_plus': row['company_headcount'] >= 11}
    lines = {}
    for rubric, (base_name, employee_rate, employer_rate, condition) in DOMAIN_RATES.items():
        if employer_rate is None:
            employer_rate = str(row['at_mp_rate'] if rubric == 'at_mp' else row['mobility_rate'])
        base = bases[base_name]
        amounts = (_pct(base, employee_rate), _pct(base, employer_rate))
        if holds[condition] and any(amounts):
            lines[rubric] = (base, *amounts)
    abated = (bases['gross_4pmss'] * D('0.9825')).quantize(CENT, decimal.ROUND_HALF_UP)
    csg_base = abated + gross - bases['gross_4pmss'] + lines.get('prevoyance_cadres', (0, 0, D(0)))[2]
    lines['csg_deductible'] = (csg_base, _pct(csg_base, '6.80'), D(0))
    lines['csg_crds_non_deductible'] = (csg_base, _pct(csg_base, '2.90'), D(0))
    employee = sum(v[1] for v in lines.values())
    employer = sum(v[2] for v in lines.values())
    smic = (D(smic_rgdu) * hours_month * presence).quantize(CENT, decimal.ROUND_HALF_UP)
    ratio = 3 * smic / gross
    tdelta = D('0.3781') if row['company_headcount'] < 50 else D('0.3821')
    if ratio > 1:
        c = D('0.02') + tdelta * D(float(D('0.5') * (ratio - 1)) ** 1.75)
        c = min(c, D('0.02') + tdelta).quantize(D('0.0001'), decimal.ROUND_HALF_UP)
    else:
        c = D(0)
    rgdu = (c * gross).quantize(CENT, decimal.ROUND_HALF_UP)
    net = gross - employee
    taxable = net + lines['csg_crds_non_deductible'][1]
    return {'lines': lines, 'gross': gross, 'ceiling': ceiling, 'net_before_tax': net, 'net_taxable': taxable,
            'employer': employer, 'rgdu_coefficient': c, 'rgdu': rgdu, 'employer_cost': gross + employer - rgdu}


def _euros(cents) -> D:
    return D(cents) / 100


def assert_matches_reference(row, period='2026-11'):
    lines, totals = _compute(period, row)
    expected = reference(row)
    got = {r['rubric']: (_euros(r['base_cents']), _euros(r['employee_cents']), _euros(r['employer_cents']))
           for r in lines.to_pylist() if r['kind'] == 'contribution'}
    assert got == expected['lines']  # every line: same rubrics, bases and amounts to the cent
    total = totals.to_pylist()[0]
    assert _euros(total['gross_cents']) == expected['gross']
    assert _euros(total['ceiling_cents']) == expected['ceiling']
    assert _euros(total['net_before_tax_cents']) == expected['net_before_tax']
    assert _euros(total['net_taxable_cents']) == expected['net_taxable']
    assert _euros(total['employer_contributions_cents']) == expected['employer']
    assert D(str(total['rgdu_coefficient'])) == expected['rgdu_coefficient']
    assert _euros(total['rgdu_cents']) == expected['rgdu']
    assert _euros(total['employer_cost_cents']) == expected['employer_cost']
    return lines, total


def test_domain_worked_smic_example_comes_out_exactly():
    lines, totals = _compute('2026-01', _row(presence_days=31, days_in_month=31))
    by_rubric = {r['rubric']: r for r in lines.to_pylist()}
    total = totals.to_pylist()[0]
    excluding_csg = sum(r['employee_cents'] for r in by_rubric.values()
                        if r['kind'] == 'contribution' and not r['rubric'].startswith('csg'))
    assert excluding_csg == 206_19
    assert by_rubric['csg_deductible']['employee_cents'] == 121_80
    # CSG non déductible 42.99 + CRDS 8.96 in DOMAIN.md, each rounded alone; on the payslip they are
    # one 2.90 % line (51.94), which is what makes net avant impôt 1,443.10 as DOMAIN.md states
    # (the two roundings apart would give 1,443.09 and contradict its net imposable 1,495.04).
    base = by_rubric['csg_crds_non_deductible']['base_cents']
    assert base == 1791_13
    assert payslips.apply_rate(pa.array([base]).to_numpy(), 24_000)[0] == 42_99
    assert payslips.apply_rate(pa.array([base]).to_numpy(), 5_000)[0] == 8_96
    assert by_rubric['csg_crds_non_deductible']['employee_cents'] == 51_94
    assert total['net_before_tax_cents'] == 1443_10
    assert total['net_taxable_cents'] == 1495_04
    assert total['rgdu_coefficient'] == 0.3981
    assert total['rgdu_cents'] == 725_75
    assert total['smic_reference_cents'] == 1823_03


@pytest.mark.parametrize('case', [
    dict(),                                                                   # SMIC, full time
    dict(weekly_hours=24.0, monthly_salary=1400.00),                          # part time
    dict(monthly_salary=5000.00),                                             # above 1 PMSS
    dict(monthly_salary=20000.00, company_headcount=120, at_mp_rate=1.2, mobility_rate=2.95),  # above 4 PMSS
    dict(monthly_salary=4500.00, cadre=True, company_headcount=30),            # cadre
    dict(monthly_salary=2500.00, alsace_moselle=True, company_headcount=60),   # Alsace-Moselle
    dict(monthly_salary=3000.00, presence_days=15, bonus=150.0),               # hired on the 16th of a 30-day month
], ids=['smic', 'part_time', 'above_1_pmss', 'above_4_pmss', 'cadre', 'alsace_moselle', 'mid_month_hire'])
def test_worked_payslips_line_by_line(case):
    assert_matches_reference(_row(**case))


def test_specific_figures_of_the_worked_cases():
    """A few amounts worked out by hand, so the reference above is itself checked."""
    _, total = assert_matches_reference(_row(monthly_salary=5000.00))
    assert total['ceiling_cents'] == 4005_00                     # T1 4,005.00, T2 995.00
    lines, _ = _compute('2026-11', _row(monthly_salary=5000.00))
    by_rubric = {r['rubric']: r for r in lines.to_pylist()}
    assert by_rubric['vieillesse_plafonnee']['employee_cents'] == 276_35   # 6.90 % x 4,005 = 276.345
    assert by_rubric['agirc_arrco_t2']['employee_cents'] == 85_97          # 8.64 % x 995 = 85.968
    assert by_rubric['cet']['base_cents'] == 5000_00
    _, part_time = assert_matches_reference(_row(weekly_hours=24.0, monthly_salary=1400.00))
    assert part_time['ceiling_cents'] == 2746_29                 # 4,005 x 24 / 35 = 2,746.286
    _, hire = assert_matches_reference(_row(monthly_salary=3000.00, presence_days=15, bonus=150.0))
    assert hire['gross_cents'] == 1650_00 and hire['ceiling_cents'] == 2002_50
    _, high = assert_matches_reference(_row(monthly_salary=20000.00, company_headcount=120))
    assert high['rgdu_cents'] == 0
    lines, _ = _compute('2026-11', _row(monthly_salary=20000.00, company_headcount=120))
    by_rubric = {r['rubric']: r for r in lines.to_pylist()}
    assert by_rubric['chomage']['base_cents'] == 16020_00         # capped at 4 PMSS
    # 98.25 % of 16,020 + the 3,980 above 4 PMSS, not abated
    assert by_rubric['csg_deductible']['base_cents'] == 15739_65 + 3980_00


def test_overtime_absence_and_withholding():
    row = _row(monthly_salary=2600.00, overtime_hours=40.0, unpaid_absence_hours=7.0, pas_rate=7.5)
    lines, totals = _compute('2026-11', row)
    by_rubric = {r['rubric']: r for r in lines.to_pylist()}
    hourly = D('2600') / (D(35) * 52 / 12)
    first = D(8) * 52 / 12                                      # 34.67 h at +25 %, 5.33 h at +50 %
    overtime = (hourly * (first * D('1.25') + (40 - first) * D('1.5'))).quantize(CENT, decimal.ROUND_HALF_UP)
    assert _euros(by_rubric['heures_supplementaires']['employee_cents']) == overtime
    assert _euros(by_rubric['absence_non_remuneree']['employee_cents']) == -(hourly * 7).quantize(CENT, decimal.ROUND_HALF_UP)
    total = totals.to_pylist()[0]
    assert total['gross_cents'] == 2600_00 + by_rubric['heures_supplementaires']['employee_cents'] \
        + by_rubric['absence_non_remuneree']['employee_cents']
    assert total['pas_rate'] == 7.5
    assert _euros(total['pas_cents']) == _pct(_euros(total['net_taxable_cents']), '7.5')
    assert total['net_pay_cents'] == total['net_before_tax_cents'] - total['pas_cents']


def test_taux_neutre_grid_applies_without_a_personal_rate():
    _, totals = _compute('2026-11', _row(monthly_salary=3000.00), _row(employee_id='E2', monthly_salary=1500.00))
    high, low = totals.to_pylist()
    assert 2294_00 < high['net_taxable_cents'] <= 2714_00 and high['pas_rate'] == 5.3
    assert low['net_taxable_cents'] <= 1620_00 and low['pas_rate'] == 0 and low['pas_cents'] == 0


def test_the_smic_of_june_2026_is_one_dated_row():
    january = payroll_rules.PayrollRules.for_period('2026-05')
    june = payroll_rules.PayrollRules.for_period('2026-06')
    assert january.value('smic_hourly') == D('12.02') and june.value('smic_hourly') == D('12.31')
    assert june.value('rgdu_smic_hourly') == D('12.02')  # the RGDU keeps 12.02 all year
    assert january.contributions == june.contributions


def test_a_period_without_rules_is_refused_with_the_period_named():
    with pytest.raises(ConfigError, match=r'no payroll rule for 2025-11: smic_hourly'):
        payroll_rules.PayrollRules.for_period('2025-11')
    with pytest.raises(ConfigError, match=r"--period='2026-13'"):
        payroll_rules.PayrollRules.for_period('2026-13')


def test_many_employees_at_once_equal_one_at_a_time():
    rows = [_row(employee_id=f'E{i}', monthly_salary=1800.0 + 731.37 * i, cadre=i % 3 == 0,
                 alsace_moselle=i % 5 == 0, company_headcount=[5, 20, 80][i % 3], weekly_hours=[35.0, 28.0][i % 2],
                 presence_days=30 - (i % 4), overtime_hours=float(i % 7), bonus=float(i % 2) * 99.99)
            for i in range(40)]
    together_lines, together_totals = _compute('2026-11', *rows)
    for row in rows:
        alone_lines, alone_totals = _compute('2026-11', row)
        mine = together_lines.filter(pa.compute.equal(together_lines.column('employee_id'), row['employee_id']))
        assert mine.to_pylist() == alone_lines.to_pylist()
        assert together_totals.filter(pa.compute.equal(together_totals.column('employee_id'), row['employee_id'])
                                      ).to_pylist() == alone_totals.to_pylist()


def test_rgdu_is_computed_progressively_over_the_year():
    """January at the SMIC takes the full reduction; a February bonus lifts the year-to-date pay, so
    February's reduction is the year's coefficient x the year's gross minus January's: negative here
    (the regularisation)."""
    _, january = _compute('2026-01', _row(presence_days=31, days_in_month=31))
    jan = january.to_pylist()[0]
    assert (jan['ytd_gross_cents'], jan['ytd_rgdu_cents']) == (1823_03, 725_75)
    february_row = _row(presence_days=28, days_in_month=28, bonus=3000.0, ytd_gross_cents=jan['ytd_gross_cents'],
                        ytd_smic_reference_cents=jan['ytd_smic_reference_cents'], ytd_rgdu_cents=jan['ytd_rgdu_cents'])
    lines, february = _compute('2026-02', february_row)
    feb = february.to_pylist()[0]
    gross, smic = D(jan['ytd_gross_cents'] + feb['gross_cents']) / 100, D(2 * 1823_03) / 100
    assert feb['gross_cents'] == 4823_03 and D(feb['ytd_gross_cents']) / 100 == gross
    c = D('0.02') + D('0.3781') * D(float(D('0.5') * (3 * smic / gross - 1)) ** 1.75)
    c = c.quantize(D('0.0001'), decimal.ROUND_HALF_UP)
    year = (c * gross).quantize(CENT, decimal.ROUND_HALF_UP)
    assert D(str(feb['rgdu_coefficient'])) == c
    assert _euros(feb['ytd_rgdu_cents']) == year
    assert _euros(feb['rgdu_cents']) == year - D('725.75') < 0
    rgdu_line = [r for r in lines.to_pylist() if r['rubric'] == 'rgdu'][0]
    assert rgdu_line['employer_cents'] == -feb['rgdu_cents'] > 0       # the employer pays back
    assert feb['employer_cost_cents'] == feb['gross_cents'] + feb['employer_contributions_cents'] - feb['rgdu_cents']
    # The same two months computed alone would give February its own, positive, reduction.
    alone = _compute('2026-02', _row(presence_days=28, days_in_month=28, bonus=3000.0))[1].to_pylist()[0]
    assert alone['rgdu_cents'] > 0 and alone['ytd_rgdu_cents'] == alone['rgdu_cents']

"""Cross-check of the payslip engine with OpenFisca-France 176.1.8 on 2,000 generated employees.

OpenFisca runs in its own virtualenv (``bash .ci/install_openfisca.sh``; it needs numpy<2.4), in one
subprocess: ``tests/openfisca/net_salaries.py``. Both compute November 2026 for full-month employees
with no overtime, bonus or absence; we compare net avant impôt, net imposable and the RGDU.

Every difference is explained by one of the rules below, each computed per employee from the inputs
and the rates (never from the engine's own lines) and its size checked; `pytest -s` prints, per rule,
how many employees it touches and its largest effect. Sizes are for this population (2,000 employees).

1. Alsace-Moselle employee health rate: OpenFisca still has 1.50 %, DOMAIN.md 1.30 %. OpenFisca's
   nets (avant impôt and imposable) are lower by 0.20 % of gross: 3.73 EUR at the SMIC, 39.41 EUR
   here at most (199 employees).
2. Prévoyance cadres in the CSG/CRDS base: the project adds the employer's prévoyance (1.50 % of T1)
   to the CSG/CRDS base, not abated, as the engine's docstring and test_payslips.py state (employer
   prévoyance contributions are subject to CSG/CRDS, CSS L136-1-1). OpenFisca leaves the mandatory
   cadre prévoyance out from 2018 on (``assiette_csg_non_abattue``, its docstring says why). So
   OpenFisca's net avant impôt is higher by 9.70 % (6.80 + 2.40 + 0.50) of the prévoyance and its net
   imposable by 6.80 %: at most 5.83 and 4.09 EUR, at T1 = 4,005 (678 cadres).
3. Part-time ceiling: OpenFisca prorates the ceiling by paid hours / 151.67, the project by weekly
   hours / 35 rounded to the cent; with paid hours = weekly hours x 52 / 12 = 151.666... x weekly / 35,
   OpenFisca's ceiling is 0.002 % lower (0.06 to 0.08 EUR). Above it, T1 is that much smaller and T2
   larger: the lines on T1, T2 and 4 ceilings, each rounded to the cent, move by a cent or two on the
   net. A gross between the two ceilings (here the 4,005 x hours / 35 cluster) is above OpenFisca's
   only: OpenFisca charges the CET, 0.14 % of the whole gross (3.85 to 4.80 EUR). Recomputed line by
   line with both ceilings (580 part-time employees; full time: the same 4,005 ceiling, no effect).
4. RGDU SMIC reference: both take the RGDU's 12.02 (not November's 12.31), but OpenFisca multiplies
   it by 151.67 h for full time (1,823.07) and by the paid hours unrounded for part time, the project
   by 35 x 52 / 12 h (1,823.03, DOMAIN.md) rounded to the cent. Each side's coefficient is checked to
   be its own reference's, rounded to 4 decimals. They differ (a) by 0.0001 where the two references
   put the coefficient on both sides of a rounding boundary: 0.0001 x gross on the reduction, up to
   0.42 EUR (34 employees); (b) by Tmin = 2 % where the gross lies between the two references' 3 SMIC
   (full time 5,469.09 to 5,469.22): OpenFisca still grants 2 % of gross, 109.38 EUR, the project
   nothing (14 employees, from the cluster at 3 SMIC).
5. Rounding: the project rounds every line half up to the cent, exactly. OpenFisca rounds each
   bracket of a contribution (numpy.round on binary floats: an exact half cent such as 4,005 x 6.90 %
   = 276.345 falls either way; one cent per such line) and APEC in two brackets (up to 1 ceiling, 1 to
   4 ceilings) where the project has one line: one cent (71 cadres above the ceiling). It does not
   round CSG/CRDS: 0.005 per CSG line of the project (net avant impôt: "CSG déductible" and "CSG non
   déductible et CRDS", 0.01; net imposable: CSG déductible only, 0.005), 0.005 on each Alsace-Moselle
   line, 0.005 on the RGDU. Plus OpenFisca's float32 (0.002 at 16,384 to 32,768): 0.003 allowed.
   Rounding alone leaves 2 employees over 0.01 EUR on net avant impôt (0.0106), none elsewhere.
6. AGS (employer only, no effect on the nets): OpenFisca's rate is the stale 0.20 %, the project's
   0.25 % (DOMAIN.md); checked on its own below.
Anything else fails, naming the employee, their inputs and both values.
"""
import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from transforms import payroll_rules
from transforms import payslips

REPO = Path(__file__).resolve().parents[2]
OPENFISCA_PYTHON = REPO / '.openfisca' / 'venv' / 'bin' / 'python'
SCRIPT = REPO / 'tests' / 'openfisca' / 'net_salaries.py'
PERIOD = '2026-11'
N = 2_000
OPENFISCA_FULL_TIME_HOURS = 151.67
PMSS = 4_005
ALSACE_MOSELLE_PROJECT, ALSACE_MOSELLE_OPENFISCA = 0.013, 0.015
PREVOYANCE_CADRES = 0.015  # employer, on T1
CSG_DEDUCTIBLE, CSG_CRDS_NON_DEDUCTIBLE = 0.068, 0.029
FLOAT32 = 0.003  # OpenFisca's float32 results, a few operations deep, at up to 20,000 EUR


def _population(rules: payroll_rules.PayrollRules) -> list[dict]:
    """2,000 full-month employees: full-time-equivalent salaries from the SMIC to 20,000 EUR
    (log-uniform, plus clusters at the SMIC, the ceiling, the RGDU's 3 SMIC and 4 ceilings), full or
    part time, cadre or not, 10 % in Alsace-Moselle, 10, 30 or 100 employees."""
    rng = np.random.default_rng(20261101)
    smic = float(rules.value('smic_hourly')) * 35 * 52 / 12  # 1,867.02 in November 2026
    pmss = float(rules.value('pmss'))
    fte = np.exp(rng.uniform(np.log(smic), np.log(20_000), N))
    clusters = [smic, pmss, 3 * float(rules.value('rgdu_smic_hourly')) * 35 * 52 / 12, 4 * pmss]
    fte[:400] = np.repeat(clusters, 100) + np.where(np.arange(400) % 100 < 20, 0, rng.uniform(-30, 30, 400))
    fte = np.maximum(fte, smic)
    weekly = rng.choice([35.0, 35.0, 35.0, 24.0, 28.0, 30.0, 32.0], N)
    salary = np.ceil(np.round(fte * weekly / 35 * 100, 6)) / 100
    cadre, alsace_moselle = rng.random(N) < 0.35, rng.random(N) < 0.10
    headcount = rng.choice([10, 30, 100], N)
    return [dict(employee_id=f'E{i:05d}', establishment_siret='73282932000074', cadre=bool(cadre[i]),
                 alsace_moselle=bool(alsace_moselle[i]), company_headcount=int(headcount[i]), at_mp_rate=0.0,
                 mobility_rate=0.0, weekly_hours=float(weekly[i]), monthly_salary=float(salary[i]),
                 presence_days=30, days_in_month=30, overtime_hours=0.0, bonus=0.0, unpaid_absence_hours=0.0,
                 pas_rate=0.0) for i in range(N)]


def _run_openfisca(employees: dict, workdir: Path) -> dict:
    if not OPENFISCA_PYTHON.exists():
        pytest.fail(f'{OPENFISCA_PYTHON.relative_to(REPO)} is missing: run `bash .ci/install_openfisca.sh` '
                    '(OpenFisca-France in a virtualenv of its own)', pytrace=False)
    (workdir / 'in.json').write_text(json.dumps(employees))
    done = subprocess.run([str(OPENFISCA_PYTHON), str(SCRIPT), str(workdir / 'in.json'), str(workdir / 'out.json')],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    if done.returncode:
        pytest.fail(f'{SCRIPT.relative_to(REPO)} exited with {done.returncode}:\n{done.stderr[-4000:]}', pytrace=False)
    return {k: np.asarray(v) for k, v in json.loads((workdir / 'out.json').read_text()).items()}


def _round_cents(euros):
    """Half up to the cent, as the engine rounds (float noise removed first)."""
    return np.floor(np.round(np.asarray(euros) * 100, 6) + 0.5) / 100


class _Run:
    """The population through both engines."""

    def __init__(self, workdir: Path):
        self.rules = payroll_rules.PayrollRules.for_period(PERIOD)
        self.rows = _population(self.rules)
        lines, totals = payslips.compute(pa.Table.from_pylist(self.rows, schema=payslips.MONTH_INPUT), self.rules)
        assert totals.column('employee_id').to_pylist() == [r['employee_id'] for r in self.rows]
        self.totals = {name: totals.column(name).to_numpy(zero_copy_only=False) for name in totals.column_names}
        self.gross = self.totals['gross_cents'] / 100
        self.cadre = np.array([r['cadre'] for r in self.rows])
        self.alsace_moselle = np.array([r['alsace_moselle'] for r in self.rows])
        self.weekly = np.array([r['weekly_hours'] for r in self.rows])
        self.part_time = self.weekly < 35
        self.ceiling = self.totals['ceiling_cents'] / 100
        assert np.array_equal(self.ceiling, _round_cents(PMSS * np.minimum(self.weekly / 35, 1)))
        ags = lines.filter(pc.equal(lines.column('rubric'), 'ags'))
        assert ags.column('employee_id').to_pylist() == [r['employee_id'] for r in self.rows]
        self.project_ags = ags.column('employer_cents').to_numpy() / 100
        self.openfisca = _run_openfisca(dict(
            period=PERIOD, gross=self.gross.tolist(), cadre=self.cadre.tolist(),
            hours=(self.weekly * 52 / 12).tolist(), alsace_moselle=self.alsace_moselle.tolist(),
            headcount=[r['company_headcount'] for r in self.rows]), workdir)

    def describe(self, i: int) -> str:
        row = self.rows[i]
        return (f"employee {i}: gross {self.gross[i]:.2f}, weekly_hours {row['weekly_hours']}, cadre {row['cadre']}, "
                f"alsace_moselle {row['alsace_moselle']}, headcount {row['company_headcount']}")

    def employee_lines(self, ceiling: np.ndarray, apec_brackets: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The employee lines that depend on the ceiling (on T1, T2, T1+T2 and up to 4 ceilings), as
        OpenFisca computes them for ``ceiling``: thresholds (k x ceiling) and bracket bases rounded to
        the cent, each bracket's amount rounded to the cent; APEC in two brackets (up to 1 ceiling, 1 to
        4 ceilings) unless ``apec_brackets`` is false (the project: one line). Rates: DOMAIN.md's, read
        from the project's rules. Returns their sum per employee, and per employee how many lines, these
        or vieillesse déplafonnée (on gross), end in exactly half a cent (rule 5)."""
        gross, threshold = self.gross, lambda k: np.round(k * ceiling, 2)
        t1 = np.minimum(gross, threshold(1))
        above_t1 = lambda k: np.clip(np.minimum(gross, threshold(k)) - threshold(1), 0, None)  # noqa: E731
        brackets = {'gross': [gross], 't1': [t1], 't2': [above_t1(8)], 't1_t2': [np.minimum(gross, threshold(8))],
                    'gross_4pmss': [t1, above_t1(4)] if apec_brackets else [np.minimum(gross, threshold(4))]}
        holds = {'all': True, 'cadre': self.cadre, 'above_pmss': gross > ceiling}
        total, ties = np.zeros(N), np.zeros(N, dtype=int)
        for c in self.rules.contributions:
            if c.base in brackets and c.employee_ppm and c.applies_to in holds:
                for base in brackets[c.base]:
                    exact_cents = np.round(np.round(base, 2) * c.employee_ppm / 10_000, 6)
                    ties += holds[c.applies_to] & (exact_cents % 1 == 0.5)
                    if c.base != 'gross':
                        total += np.where(holds[c.applies_to], np.floor(exact_cents + 0.5) / 100, 0)
        return total, ties

    def line_effects(self, csg_rate: float) -> tuple[dict, np.ndarray]:
        """Rules 1, 2, 3 and APEC's brackets (rule 5) per employee, as OpenFisca's net minus the
        project's, for a net that deducts ``csg_rate`` of CSG/CRDS; and the half-cent ties (rule 5).
        Computed from the inputs and the rates, not from the engine's lines."""
        at_project_ceiling, _ = self.employee_lines(self.ceiling)
        at_openfisca_ceiling, ties = self.employee_lines(self.openfisca['ceiling'])
        apec_one_line, _ = self.employee_lines(self.ceiling, apec_brackets=False)
        abatement = 1 - float(self.rules.value('csg_base_ratio'))
        abated_up_to = {name: np.minimum(self.gross, np.round(4 * ceiling, 2))
                        for name, ceiling in (('project', self.ceiling), ('openfisca', self.openfisca['ceiling']))}
        prevoyance = np.where(self.cadre, _round_cents(PREVOYANCE_CADRES * np.minimum(self.gross, self.ceiling)), 0)
        effects = {
            '1 Alsace-Moselle health 1.50 % vs 1.30 %': np.where(
                self.alsace_moselle, (ALSACE_MOSELLE_PROJECT - ALSACE_MOSELLE_OPENFISCA) * self.gross, 0),
            f'2 prevoyance not in CSG base ({csg_rate:.2%})': csg_rate * prevoyance,
            '3 part-time ceiling by hours / 151.67': at_project_ceiling - at_openfisca_ceiling
                - csg_rate * abatement * (abated_up_to['project'] - abated_up_to['openfisca']),
            '5 APEC rounded per bracket': apec_one_line - at_project_ceiling,
        }
        return effects, ties


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    return _Run(tmp_path_factory.mktemp('openfisca'))


def _check(run: _Run, what: str, difference: np.ndarray, explained: dict, tolerance: np.ndarray):
    """Every |difference - sum(explained)| within ``tolerance``, else fail naming the employees. Prints
    per rule how many employees it applies to, how many of them differ by more than 0.01 EUR and the
    rule's largest effect; then the differences above 0.01 EUR that rounding alone explains."""
    residual = difference - sum(explained.values())
    unexplained = np.flatnonzero(np.abs(residual) > tolerance)
    big = np.abs(difference) > 0.01
    print(f'\n{what}: {big.sum()} of {N} employees differ by more than 0.01 EUR, '
          f'largest {np.abs(difference).max():.4f}; residual after the rules at most {np.abs(residual).max():.4f} '
          f'(tolerance {tolerance.min():.3f} to {tolerance.max():.3f}); unexplained {len(unexplained)}')
    for rule, delta in explained.items():
        hit = np.abs(delta) > 1e-9
        print(f'  {rule:42s} applies to {hit.sum():4d}, {(hit & big).sum():4d} of them > 0.01; '
              f'its effect up to {np.abs(delta).max():8.4f}')
    rounding_only = big & (np.abs(sum(np.abs(d) for d in explained.values())) < 1e-9)
    print(f'  {"5 rounding and float32 alone":42s} {rounding_only.sum():4d} differences > 0.01, up to '
          f'{np.abs(difference[rounding_only]).max() if rounding_only.any() else 0:.4f}')
    messages = []
    for i in unexplained[:20]:
        parts = ', '.join(f'{rule} {delta[i]:+.4f}' for rule, delta in explained.items())
        messages.append(f'{what} unexplained, {run.describe(i)}: OpenFisca - project = {difference[i]:+.4f}; '
                        f'explained: {parts}; tolerance {tolerance[i]:.4f}')
    assert not messages, '\n'.join(messages)


def test_net_before_tax_differences_are_all_explained(run):
    explained, ties = run.line_effects(CSG_DEDUCTIBLE + CSG_CRDS_NON_DEDUCTIBLE)
    # Rule 5: the project's two CSG/CRDS lines, both Alsace-Moselle lines, half-cent ties.
    tolerance = 2 * 0.005 + 2 * 0.005 * run.alsace_moselle + 0.01 * ties + FLOAT32
    difference = run.openfisca['net_before_tax'] - run.totals['net_before_tax_cents'] / 100
    _check(run, 'net avant impot', difference, explained, tolerance)
    # Each rule is at work in this population, with the size the docstring gives.
    am, cadre, full_time = run.alsace_moselle, run.cadre, ~run.part_time
    plain_am = am & ~cadre & full_time
    assert np.allclose(difference[plain_am] + 0.002 * run.gross[plain_am], 0, atol=0.025)
    assert 5.8 < difference[cadre & ~am & full_time].max() < 5.9  # 9.70 % x 1.50 % x 4,005
    rule_3 = explained['3 part-time ceiling by hours / 151.67']
    assert not rule_3[full_time].any() and np.abs(rule_3[run.part_time]).max() >= 0.02
    assert 0 < np.count_nonzero(explained['5 APEC rounded per bracket']) and not ties.all()


def test_net_taxable_differences_are_all_explained(run):
    explained, ties = run.line_effects(CSG_DEDUCTIBLE)  # net imposable only deducts CSG déductible
    tolerance = 0.005 + 2 * 0.005 * run.alsace_moselle + 0.01 * ties + FLOAT32
    difference = run.openfisca['net_taxable'] - run.totals['net_taxable_cents'] / 100
    _check(run, 'net imposable', difference, explained, tolerance)


def test_rgdu_differences_are_all_explained(run):
    of = run.openfisca
    project_smic = run.totals['smic_reference_cents'] / 100
    # Rule 4, the SMIC references themselves.
    hours = run.weekly * 52 / 12
    rgdu_smic = float(run.rules.value('rgdu_smic_hourly'))
    assert np.allclose(of['rgdu_smic_reference'],
                       rgdu_smic * np.where(run.part_time, hours, OPENFISCA_FULL_TIME_HOURS), atol=1e-3)
    assert np.array_equal(project_smic, _round_cents(rgdu_smic * hours))
    assert np.abs(of['rgdu_smic_reference'] - project_smic).max() < 0.05

    def unrounded(smic, gross, headcount_under_50):
        tmin = float(run.rules.value('rgdu_tmin'))
        tdelta = np.where(headcount_under_50, float(run.rules.value('rgdu_tdelta_under_50')),
                          float(run.rules.value('rgdu_tdelta_50_plus')))
        ratio = 3 * smic / gross
        c = tmin + tdelta * np.maximum(0.5 * (ratio - 1), 0) ** float(run.rules.value('rgdu_exponent'))
        return np.where(ratio > 1, np.minimum(c, tmin + tdelta), 0)

    under_50 = np.array([r['company_headcount'] < 50 for r in run.rows])
    project_rate, openfisca_rate = run.totals['rgdu_coefficient'], of['rgdu_rate']
    # Each coefficient is its own SMIC reference's, rounded to 4 decimals (within float32).
    for rate, smic in ((project_rate, project_smic), (openfisca_rate, of['rgdu_smic_reference'])):
        off = np.flatnonzero(np.abs(rate - unrounded(smic, run.gross, under_50)) > 0.5e-4 + 1e-6)
        assert not len(off), [f'{run.describe(i)}: rate {rate[i]}' for i in off[:10]]
    # So the coefficients differ by 0.0001 across a rounding boundary, or by Tmin (2 %) where the gross
    # lies between the two references' 3 SMIC: OpenFisca still grants 2 %, the project nothing.
    rate_difference = openfisca_rate - project_rate
    boundary = np.abs(rate_difference) <= 1e-4 + 1e-6
    exit_point = ((np.abs(rate_difference - float(run.rules.value('rgdu_tmin'))) < 1e-6)
                  & (3 * project_smic <= run.gross) & (run.gross < 3 * of['rgdu_smic_reference']))
    assert (boundary | exit_point).all(), [run.describe(i) for i in np.flatnonzero(~(boundary | exit_point))[:10]]
    explained = {'4 SMIC reference: coefficient +-0.0001': np.where(boundary, rate_difference * run.gross, 0),
                 '4 SMIC reference: 2 % between 3 SMICs': np.where(exit_point, rate_difference * run.gross, 0)}
    difference = of['rgdu'] - run.totals['rgdu_cents'] / 100
    _check(run, 'RGDU', difference, explained, np.full(N, 0.005 + FLOAT32))  # rule 5: the project's cent
    assert (np.abs(rate_difference) > 5e-5).sum() > 0 and exit_point.sum() > 0  # rule 4 is at work here
    assert (run.totals['rgdu_cents'] > 0).sum() > 500 and (run.totals['rgdu_cents'] == 0).sum() > 500


def test_openfisca_ags_rate_is_the_stale_one(run):
    """Rule 6: same base (gross up to 4 ceilings), OpenFisca 0.20 %, the project 0.25 %."""
    ags = {c.rubric: c for c in run.rules.contributions}['ags']
    assert ags.employer_ppm == 2_500 and run.openfisca['ags_rate'] == pytest.approx(0.002)
    assert np.abs(run.openfisca['ags'] - run.project_ags * 0.20 / 0.25).max() <= 0.005 + 0.004 + FLOAT32

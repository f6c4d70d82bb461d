"""French payroll rules as dated data: the parameters, contributions and withholding grid in force.

The rules live in CSV files beside this module (``transforms/rules/``), one row per value with the
date it takes effect from and its source: a rate change is one new row (the SMIC of 2026-06-01 is
the second ``smic_hourly`` row), never an edit of code. ``PayrollRules.for_period`` picks, for each
parameter and each contribution, the row with the latest ``effective_from`` on or before the first
day of the period, and refuses a period for which a parameter has no row at all.

Rates are held as integer parts per million (6.90 % -> 69,000) so that amounts computed from integer
cents round exactly, half up, to the cent.
"""
import csv
import dataclasses
import datetime
import decimal
import importlib.resources
import re

from transforms.errors import ConfigError

PERIOD_RE = re.compile(r'^(\d{4})-(0[1-9]|1[0-2])$')
BASES = ('gross', 't1', 't2', 't1_t2', 'gross_4pmss', 'csg')
CONDITIONS = ('all', 'cadre', 'alsace_moselle', 'not_alsace_moselle', 'above_pmss', 'under_50', '50_plus',
              'under_11', '11_plus')
# An employer rate read from the establishment's own data (AT/MP rate, versement mobilité rate).
ESTABLISHMENT_RATE = 'establishment'
REQUIRED_PARAMETERS = (
    'smic_hourly', 'rgdu_smic_hourly', 'pmss', 'pass', 'csg_base_ratio', 'csg_abatement_cap_pmss', 'rgdu_tmin',
    'rgdu_tdelta_under_50', 'rgdu_tdelta_50_plus', 'rgdu_exponent', 'overtime_first_rate', 'overtime_second_rate',
    'overtime_first_hours_weekly', 'part_time_extra_first_rate', 'part_time_extra_second_rate',
    'full_time_weekly_hours')


def period_start(period: str) -> datetime.date:
    match = PERIOD_RE.match(period or '')
    if not match:
        raise ConfigError(f'--period={period!r}: must be a month YYYY-MM, e.g. 2026-11')
    return datetime.date(int(match.group(1)), int(match.group(2)), 1)


def percent_to_ppm(text: str) -> int:
    """``'6.90'`` (percent) -> 69,000 parts per million, exactly."""
    ppm = decimal.Decimal(text) * 10_000
    if ppm != ppm.to_integral_value():
        raise ValueError(f'rate {text} % has more than 4 decimals')
    return int(ppm)


@dataclasses.dataclass(frozen=True)
class Contribution:
    rubric: str
    label: str
    base: str                    # one of BASES
    employee_ppm: int
    employer_ppm: int | None     # None: the establishment's own rate (ESTABLISHMENT_RATE)
    applies_to: str              # one of CONDITIONS
    source: str


@dataclasses.dataclass(frozen=True)
class PayrollRules:
    """The rules in force for one period (month)."""
    period: str
    parameters: dict            # name -> decimal.Decimal
    contributions: tuple        # Contribution, in file order (the payslip's line order)
    taux_neutre: tuple          # (monthly taxable up to, in cents, or None for the last row; rate ppm)

    def value(self, name: str) -> decimal.Decimal:
        return self.parameters[name]

    @classmethod
    def for_period(cls, period: str) -> 'PayrollRules':
        start = period_start(period)
        parameters = parameters_in_force(REQUIRED_PARAMETERS, start, f'payroll rule for {period}')
        latest = {}
        for row in _rows('contributions.csv'):
            if _date(row['effective_from']) <= start:
                latest[row['rubric']] = row  # rows are in date order per rubric: the last one in force wins
        contributions = tuple(_contribution(row) for row in latest.values())
        grids = {}
        for row in _rows('taux_neutre_metropole.csv'):
            if _date(row['effective_from']) <= start:
                grids.setdefault(row['effective_from'], []).append(row)
        if not grids:
            raise ConfigError(f'no taux neutre grid in force on {start} (transforms/rules/taux_neutre_metropole.csv)')
        grid = grids[max(grids)]
        taux_neutre = tuple((None if not r['monthly_taxable_up_to'] else int(decimal.Decimal(r['monthly_taxable_up_to']) * 100),
                             percent_to_ppm(r['rate'])) for r in grid)
        return cls(period=period, parameters=parameters, contributions=contributions, taux_neutre=taux_neutre)


CPF_PARAMETERS = ('cpf_annual_credit', 'cpf_cap', 'cpf_low_qualification_credit', 'cpf_low_qualification_cap',
                  'cpf_reference_hours')


def parameters_in_force(names: tuple[str, ...], on: datetime.date, what: str) -> dict:
    """The value of each parameter in force on ``on`` (its latest row on or before that day)."""
    found = {}
    for row in _rows('payroll_parameters.csv'):
        if row['parameter'] in names and _date(row['effective_from']) <= on:
            found[row['parameter']] = decimal.Decimal(row['value'])
    missing = [name for name in names if name not in found]
    if missing:
        raise ConfigError(f'no {what}: {", ".join(missing)} has no value in force on {on} '
                          '(transforms/rules/payroll_parameters.csv)')
    return found


def _rows(name: str) -> list[dict]:
    text = importlib.resources.files('transforms').joinpath('rules', name).read_text(encoding='utf-8')
    rows = list(csv.DictReader(text.splitlines()))
    return sorted(rows, key=lambda r: r['effective_from'])  # stable: file order kept within a date


def _date(text: str) -> datetime.date:
    return datetime.date.fromisoformat(text)


def _contribution(row: dict) -> Contribution:
    if row['base'] not in BASES or row['applies_to'] not in CONDITIONS:
        raise ValueError(f'contributions.csv, rubric {row["rubric"]}: base must be one of {BASES} and '
                         f'applies_to one of {CONDITIONS}')
    employer = None if row['employer_rate'] == ESTABLISHMENT_RATE else percent_to_ppm(row['employer_rate'])
    return Contribution(rubric=row['rubric'], label=row['label'], base=row['base'],
                        employee_ppm=percent_to_ppm(row['employee_rate']), employer_ppm=employer,
                        applies_to=row['applies_to'], source=row['source'])

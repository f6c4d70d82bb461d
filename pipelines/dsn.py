"""DSN: the monthly Déclaration Sociale Nominative (nature 01, type 01) of every establishment.

Inputs: the payroll output of the month (``--payslips`` and ``--payslip_lines``, e.g.
``OUT/payslips/*/part-*.parquet``), the HR data (employees, contracts, establishments, and the
withholding rates if payroll had them), and the declarant's fixed data (contact, APE, IDCC, AT risk
code, Urssaf identifier). Output, under ``--output``:

- ``files/DSN_<SIRET>_<YYYYMM>_01_01.dsn``: one NEODeS file per establishment (ISO-8859-1), the
  blocks of ``transforms.dsn_format.TREE``: envoi, émetteur, contact, déclaration, entreprise,
  établissement, the Urssaf bordereau (S21.G00.22 and one S21.G00.23 per CTP and assiette
  qualifier, summing the individual lines), then per employee: individu, contrat (with retraite
  complémentaire), versement, rémunérations, bases assujetties with the individual contributions
  (S21.G00.81, one per code and base: they add up to the payslip's contribution and RGDU lines), and
  the S90 totals;
- ``index/``: one row per establishment (Parquet, keyed by SIRET and period): status ``written`` or
  ``refused``, the file, its due date, line count, totals and SHA-256, or every problem found;
- ``dead_letters/``: one JSON line per problem, naming the establishment and the employee key.

Guarantees: identifiers are validated before anything is written: SIREN and SIRET (Luhn, La
Poste exception, the SIRET within its SIREN) and each employee's NIR. An establishment with any
problem gets no file (and a stale file of an earlier run is withdrawn) but a report of every
problem; the others are written. File names depend only on (SIRET, month, nature, type) and the
bytes only on the inputs and options (the file date defaults to the last day of the month, not to
today), so a rerun publishes byte-identical files, each written to a temporary name and renamed
into place. Nothing personal is logged: logs and dead letters carry SIRETs and employee keys only.

The mapping from payslip rubrics to DSN codes is data: ``transforms/rules/dsn_codes.csv``, with the
status of each code (confirmed, third-party, placeholder). Not implemented: the S21.G00.20
payment block, prévoyance affiliations (S21.G00.70), primes (S21.G00.52), activity (S21.G00.53),
the S21.G00.79 components (SMIC retenu of the RGDU), néant / annule-et-remplace declarations,
several contracts of one employee in the month, and the versement mobilité commune code.

    hrbatch run dsn --period 2026-11 --payslips 'out/payroll-2026-11/payslips/*/part-*.parquet' \\
        --payslip_lines 'out/payroll-2026-11/payslip_lines/*/part-*.parquet' \\
        --employees in/employees.parquet --contracts in/contracts.parquet \\
        --establishments in/establishments.parquet --ape_code 6201Z --at_risk_code 620AA \\
        --urssaf_id 78861779300013 --contact_civility 02 --contact_name 'Marie Martin' \\
        --contact_email paie@example.fr --contact_phone 0102030405 --output out/dsn-2026-11
"""
import csv
import dataclasses
import datetime
import decimal
import functools
import hashlib
import importlib.resources
import json
import logging
import re
import sys
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from stdnum.fr import siren as stdnum_siren
from stdnum.fr import siret as stdnum_siret

from pipelines import lifecycle
from pipelines import options as opts
from transforms import dsn_format as fmt
from transforms import schemas
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.dead_letters import DeadLetter
from transforms.dead_letters import WriteDeadLetters
from transforms.errors import ConfigError
from transforms.keyed_write import WriteKeyed
from transforms.keyed_write import publish
from transforms.keyed_write import remove_temp_dir
from transforms.payroll_inputs import contracts_in_month
from transforms.payroll_inputs import rows_for_period
from transforms.payroll_rules import PayrollRules
from transforms.read import ReadRecords
from transforms.routing import ReadGroupedByKey
from transforms.routing import RemoveWhenDone
from transforms.routing import split_blocked
from transforms.routing import tagged_tables

NAME = 'dsn'
STEP = 'BuildDsn'
NATURE, TYPE = '01', '01'
NORM_VERSION = 'P26V01'
SOFTWARE, SOFTWARE_VERSION = 'hrbatch', '1.0'
_LOGGER = logging.getLogger(__name__)
_DATA_CATEGORIES = ['employees (identity, NIR)', 'contracts', 'pay', 'social contributions', 'withholding tax']
_REFUSED = 'refused'
_DEAD_LETTERS = 'dead_letters'
_SITE = 'site'
_EMPLOYEE = 'employee'


def _unchecked(schema: schemas.RecordSchema) -> schemas.RecordSchema:
    """``schema`` without its identifier checks (and row checks): the DSN validates SIREN, SIRET and
    NIR itself, per establishment, so that an invalid one refuses its establishment's file instead of
    silently dropping a record from it."""
    identifiers = (schemas.SIRET, schemas.SIREN, schemas.NIR)
    fields = tuple(dataclasses.replace(f, check=None) if f.check in identifiers else f for f in schema.fields)
    return schemas.RecordSchema(name=schema.name, fields=fields, key=schema.key)


# Inputs routed by employee: name -> schema (which are required is said in OPTIONS).
_BY_EMPLOYEE = {
    'payslips': schemas.PAYSLIPS,
    'payslip_lines': schemas.PAYSLIP_LINES,
    'employees': _unchecked(schemas.EMPLOYEES),
    'contracts': _unchecked(schemas.CONTRACTS),
    'withholding_rates': schemas.WITHHOLDING_RATES,
}

DSN_INDEX = schemas.RecordSchema(
    name='dsn_index',
    key=('establishment_siret', 'period'),
    fields=(
        schemas.Field('establishment_siret', pa.string()),
        schemas.Field('period', pa.string()),
        schemas.Field('nature', pa.string()),
        schemas.Field('type', pa.string()),
        schemas.Field('status', pa.string(), allowed=('written', 'refused')),
        schemas.Field('path', pa.string(), nullable=True, doc='The published file; null when refused.'),
        schemas.Field('due_date', pa.date32(), nullable=True, doc='5th or 15th of M+1, next working day.'),
        schemas.Field('employees', pa.int64()),
        schemas.Field('lines', pa.int64(), doc='Rubric lines of the file (S90.G00.90.001); 0 when refused.'),
        schemas.Field('gross_cents', pa.int64()),
        schemas.Field('contributions_cents', pa.int64(), doc='Sum of the S21.G00.81 amounts.'),
        schemas.Field('urssaf_cents', pa.int64(), doc='S21.G00.22.005, rounded to the euro, in cents.'),
        schemas.Field('sha256', pa.string(), nullable=True),
        schemas.Field('problems', pa.string(), doc='JSON list of the problems (keys only, never a NIR).'),
    ),
)



OPTIONS = (
    opts.Option('period', 'The month to declare, YYYY-MM.', required=True),
    opts.Option('payslips', "Payroll's payslips, e.g. 'OUT/payslips/*/part-*.parquet'.", required=True),
    opts.Option('payslip_lines', "Payroll's payslip lines, e.g. 'OUT/payslip_lines/*/part-*.parquet'.", required=True),
    opts.Option('employees', 'Employees file or glob (identity and NIR).', required=True),
    opts.Option('contracts', 'Employment contracts file or glob.', required=True),
    opts.Option('establishments', 'Establishments file or glob.', required=True),
    opts.Option('withholding_rates', 'The personal PAS rates payroll used (an employee without one was taxed at '
                'the taux neutre grid). Default: none, every employee on the grid.'),
    opts.Option('output', 'Output directory (local or gs://): files/, index/, dead_letters/.', required=True),
    opts.Option('ape_code', 'NAF code (APEN/APET) of the companies and establishments, e.g. 6201Z.', required=True),
    opts.Option('idcc', 'Collective agreement (IDCC) of the establishments; 9999 = none.', default='9999'),
    opts.Option('at_risk_code', 'AT/MP risk code notified to the establishments (S21.G00.40.040), e.g. 620AA.',
                required=True),
    opts.Option('urssaf_id', 'Identifier of the Urssaf (OPS) in the bordereau S21.G00.22.001.', required=True),
    opts.Option('emitter_siret', 'SIRET of the emitter (a payroll provider); default: each establishment itself.'),
    opts.Option('emitter_name', 'Name of the emitter; default: the establishment name.'),
    opts.Option('contact_civility', 'Contact civility: 01 Monsieur, 02 Madame.', required=True, choices=('01', '02')),
    opts.Option('contact_name', 'Contact name and first name (S10.G00.02.002).', required=True),
    opts.Option('contact_email', 'Contact e-mail.', required=True),
    opts.Option('contact_phone', 'Contact phone.', required=True),
    opts.Option('send_mode', 'test (S10.G00.00.005 = 01) or real (02).', default='test', choices=('test', 'real')),
    opts.Option('payment_date', 'Pay date, YYYY-MM-DD (S21.G00.50.001). Default: the last day of the month.'),
    opts.Option('file_date', 'Date the file is made, YYYY-MM-DD (S20.G00.05.007). Default: the last day of the '
                'month, so that a rerun is byte-identical.'),
    opts.Option('buckets', 'Hash buckets of employee_id for the join of the inputs.', type='int', default=64,
                min_value=1, max_value=100_000),
) + lifecycle.LIFECYCLE_OPTIONS


# ------------------------------------------------------------------------------------------------
# Configuration

@dataclasses.dataclass(frozen=True)
class Code:
    rubric: str
    base_code: str
    individual_code: str
    ctp: str | None
    qualifier: str | None
    code_status: str
    ctp_status: str
    source: str


def load_codes() -> dict[str, Code]:
    """``transforms/rules/dsn_codes.csv`` by payslip rubric."""
    text = importlib.resources.files('transforms').joinpath('rules', 'dsn_codes.csv').read_text(encoding='utf-8')
    codes = {}
    for row in csv.DictReader(text.splitlines()):
        code = Code(row['rubric'], row['base_code'], row['individual_code'], row['ctp'] or None,
                    row['qualifier'] or None, row['code_status'], row['ctp_status'], row['source'])
        if code.rubric in codes:
            raise ConfigError(f'dsn_codes.csv: rubric {code.rubric} appears twice')
        for name, value in (('base_code', code.base_code), ('individual_code', code.individual_code)):
            if not re.match(fmt.FORMATS['S21.G00.78.001' if name == 'base_code' else 'S21.G00.81.001'] + '$', value):
                raise ConfigError(f'dsn_codes.csv: rubric {code.rubric}: {name} {value!r} is malformed')
        codes[code.rubric] = code
    return codes


def _date_option(values: dict, name: str, default: datetime.date) -> datetime.date:
    text = values[name]
    if text is None:
        return default
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f'--{name}={text!r}: must be a date YYYY-MM-DD') from None


@dataclasses.dataclass(frozen=True)
class Declarant:
    """Everything of a file that does not come from the data: checked at launch."""
    send_mode: str
    emitter_siret: str | None
    emitter_name: str | None
    contact_civility: str
    contact_name: str
    contact_email: str
    contact_phone: str
    ape_code: str
    idcc: str
    at_risk_code: str
    urssaf_id: str
    payment_date: datetime.date
    file_date: datetime.date

    @classmethod
    def from_values(cls, values: dict) -> 'Declarant':
        period = values['period']
        try:
            end = fmt.month_end(period)
        except fmt.DsnFormatError:
            raise ConfigError(f'--period={period!r}: must be a month YYYY-MM, e.g. 2026-11') from None
        checks = {'ape_code': 'S21.G00.06.003', 'idcc': 'S21.G00.11.022', 'at_risk_code': 'S21.G00.40.040',
                  'urssaf_id': 'S21.G00.22.001', 'contact_email': 'S10.G00.02.004',
                  'contact_phone': 'S10.G00.02.005', 'contact_name': 'S10.G00.02.002'}
        for name, rubric in checks.items():
            if not re.match(f'^(?:{fmt.FORMATS[rubric]})$', values[name] or ''):
                raise ConfigError(f'--{name}={values[name]!r}: must match {fmt.FORMATS[rubric]} ({rubric})')
        emitter = values['emitter_siret']
        if emitter is not None and not stdnum_siret.is_valid(emitter):
            raise ConfigError(f'--emitter_siret={emitter!r}: must be a SIRET, 14 digits with a valid Luhn key')
        payment = _date_option(values, 'payment_date', end)
        made = _date_option(values, 'file_date', end)
        return cls(send_mode='02' if values['send_mode'] == 'real' else '01', emitter_siret=emitter,
                   emitter_name=values['emitter_name'], contact_civility=values['contact_civility'],
                   contact_name=values['contact_name'], contact_email=values['contact_email'],
                   contact_phone=values['contact_phone'], ape_code=values['ape_code'], idcc=values['idcc'],
                   at_risk_code=values['at_risk_code'], urssaf_id=values['urssaf_id'], payment_date=payment,
                   file_date=made)


@dataclasses.dataclass(frozen=True)
class DsnConfig:
    period: str
    inputs: dict
    output: str
    buckets: int
    run_id: str
    declarant: Declarant

    def path(self, name: str) -> str:
        return FileSystems.join(self.output, name)

    @classmethod
    def from_values(cls, values: dict, *, run_id: str) -> 'DsnConfig':
        declarant = Declarant.from_values(values)
        PayrollRules.for_period(values['period'])  # the RGDU split needs the month's rules
        load_codes()
        inputs = {name: values[name] for name in (*_BY_EMPLOYEE, 'establishments')}
        return cls(period=values['period'], inputs=inputs, output=values['output'], buckets=values['buckets'],
                   run_id=run_id, declarant=declarant)


def file_name(siret: str, period: str) -> str:
    """Deterministic per (SIRET, month, nature, type)."""
    return f'DSN_{siret}_{period.replace("-", "")}_{NATURE}_{TYPE}.dsn'


# ------------------------------------------------------------------------------------------------
# Stage 1: every record of an employee in one bucket; one record per paid employee, keyed by SIRET

def employee_records(period: str, tables: dict, blocked: dict) -> list[tuple[str, dict]]:
    """``(SIRET, record)`` of every employee with a payslip of ``period`` in ``tables``: identity,
    the contract in that establishment, payslip totals and lines, and the problems found."""
    by_id = {}
    for row in tables['employees'].to_pylist():
        by_id.setdefault(row['employee_id'], []).append(row)
    contracts = {}
    if tables['contracts'].num_rows:
        for row in contracts_in_month(tables['contracts'], period).to_pylist():
            contracts.setdefault((row['employee_id'], row['establishment_siret']), []).append(row)
    lines = {}
    for row in tables['payslip_lines'].to_pylist():
        lines.setdefault(row['employee_id'], []).append(row)
    personal = {row['employee_id'] for row in tables['withholding_rates'].to_pylist()}
    out = []
    for slip in sorted(tables['payslips'].to_pylist(), key=lambda r: r['employee_id']):
        employee_id, siret = slip['employee_id'], slip['establishment_siret']
        problems = []
        if employee_id in blocked:
            problems.append(blocked[employee_id])
        people = by_id.get(employee_id, [])
        if len(people) != 1:
            problems.append('no employee record' if not people else 'two employee records')
        mine = sorted(contracts.get((employee_id, siret), []), key=lambda c: (c['start_date'], c['contract_id']))
        if not mine:
            problems.append('no contract in this establishment during the month')
        person = people[0] if len(people) == 1 else {}
        out.append((siret, {
            'employee_id': employee_id, 'nir': person.get('nir'), 'last_name': person.get('last_name'),
            'first_name': person.get('first_name'), 'birth_date': person.get('birth_date'),
            'cadre': bool(person.get('cadre')),
            'contract': ({k: mine[-1][k] for k in ('contract_id', 'contract_type', 'start_date', 'end_date',
                                                   'weekly_hours')} if mine else None),
            'payslip': {k: v for k, v in slip.items() if not k.startswith('_')},
            'lines': sorted(({k: v for k, v in line.items() if not k.startswith('_')}
                             for line in lines.get(employee_id, [])), key=lambda r: r['line']),
            'personal_rate': employee_id in personal,
            'problems': problems,
        }))
    return out


class _JoinBucketFn(beam.DoFn):
    def __init__(self, period: str):
        self._period = period

    def process(self, element):
        _, items = element
        records, blocked = split_blocked(items)
        tables = tagged_tables(records, _BY_EMPLOYEE)
        for siret, record in employee_records(self._period, tables, blocked):
            yield siret, (_EMPLOYEE, record)


# ------------------------------------------------------------------------------------------------
# Stage 2: one establishment -> its file, or its problems

@dataclasses.dataclass
class Declaration:
    siret: str
    content: bytes | None              # None: refused
    problems: list                     # (employee_id or None, text)
    employees: int
    gross_cents: int
    contributions_cents: int
    urssaf_cents: int
    due_date: datetime.date | None
    lines: int


_NIR_SEX = {'1': '01', '3': '01', '7': '01', '2': '02', '4': '02', '8': '02'}
_NATURE = {'CDI': '01', 'CDD': '02', 'INTERIM': '03', 'ALTERNANCE': '02', 'STAGE': '29'}
_RETIREMENT_SHARE_RUBRICS = ('agirc_arrco_t1', 'ceg_t1')


def _site_problems(siret: str, site: dict | None) -> list[str]:
    problems = []
    if not stdnum_siret.is_valid(siret or ''):
        problems.append('the SIRET is invalid (14 digits with a valid Luhn key expected)')
    if site is None:
        problems.append('the establishment is not in the establishments input')
        return problems
    company = site.get('company_siren') or ''
    if not stdnum_siren.is_valid(company):
        problems.append('the company SIREN is invalid (9 digits with a valid Luhn key expected)')
    elif not (siret or '').startswith(company):
        problems.append('the SIRET does not start with the company SIREN')
    if not fmt.text(site.get('name') or '', 80):
        problems.append('the establishment has no name')
    return problems


def _rgdu_split(total_cents: int, headcount: int, rules: PayrollRules) -> tuple[int, int]:
    """The payslip's RGDU (negative) as (Urssaf part 018, complementary pension part 106).

    Assumption (unconfirmed for the RGDU, the rule of the former Fillon reduction): the pension part
    is the reduction x (AGIRC-ARRCO T1 + CEG T1 employer rates) / the maximum coefficient
    (Tmin + Tdelta of the company's size)."""
    share_ppm = sum(c.employer_ppm for c in rules.contributions if c.rubric in _RETIREMENT_SHARE_RUBRICS)
    tdelta = rules.value('rgdu_tdelta_under_50' if headcount < 50 else 'rgdu_tdelta_50_plus')
    maximum = rules.value('rgdu_tmin') + tdelta
    pension = (decimal.Decimal(total_cents) * decimal.Decimal(share_ppm) / decimal.Decimal(1_000_000) / maximum)
    pension = int(pension.to_integral_value(decimal.ROUND_HALF_UP))
    return total_cents - pension, pension


def _individual(record: dict, codes: dict, headcount: int, rules: PayrollRules, problems: list) -> dict:
    """(base code, individual code, CTP, qualifier) -> [base cents, amount cents] of one employee: rubrics
    sharing all four are one S21.G00.81 line (maladie and its Alsace-Moselle part, for instance)."""
    entries = {}

    def add(rubric, base, cents):
        code = codes.get(rubric)
        if code is None:
            problems.append(f'payslip rubric {rubric} has no DSN code in transforms/rules/dsn_codes.csv')
            return
        entry = entries.setdefault((code.base_code, code.individual_code, code.ctp or '', code.qualifier or ''), [0, 0])
        entry[0] = max(entry[0], int(base or 0))
        entry[1] += int(cents)

    for item in record['lines']:
        if item['kind'] == 'contribution':
            add(item['rubric'], item['base_cents'], item['employee_cents'] + item['employer_cents'])
        elif item['kind'] == 'reduction' and item['rubric'] == 'rgdu':
            urssaf, pension = _rgdu_split(item['employer_cents'] + item['employee_cents'], headcount, rules)
            add('rgdu_urssaf', item['base_cents'], urssaf)
            add('rgdu_retraite_complementaire', item['base_cents'], pension)
        elif item['kind'] == 'reduction':
            problems.append(f'payslip reduction {item["rubric"]} has no DSN code')
    return entries


def _person_problems(record: dict) -> list[str]:
    problems = list(record['problems'])
    nir = record['nir']
    if nir is not None and not schemas.is_valid_nir(pa.array([nir], pa.string()))[0]:
        problems.append('invalid NIR (15 characters with a valid key expected)')
    elif nir is not None and nir[5:7] == '99':
        problems.append('born abroad: the birth country is not in the employee data')
    if record['nir'] is not None and (not fmt.text(record['last_name'] or '', 80)
                                      or not fmt.text(record['first_name'] or '', 80)):
        problems.append('empty last or first name')
    contract = record['contract']
    if contract is not None and contract['contract_type'] not in _NATURE:
        problems.append(f'a {contract["contract_type"]} contract is not declared in a DSN')
    return problems


def declare(siret: str, site: dict | None, records: list[dict], period: str, declarant: Declarant,
            codes: dict, rules: PayrollRules) -> Declaration:
    """The whole DSN file of one establishment, or every problem that keeps it from being written."""
    records = sorted(records, key=lambda r: r['employee_id'])
    problems = [(None, text) for text in _site_problems(siret, site)]
    for record in records:
        problems += [(record['employee_id'], text) for text in _person_problems(record)]
    headcount = int(site['company_headcount']) if site else 0
    individual = {}
    for record in records:
        found = []
        individual[record['employee_id']] = _individual(record, codes, headcount, rules, found)
        problems += [(record['employee_id'], text) for text in found]
    gross = sum(r['payslip']['gross_cents'] for r in records)
    contributions = sum(e[1] for entries in individual.values() for e in entries.values())
    if problems:
        return Declaration(siret, None, problems, len(records), gross, contributions, 0, None, 0)

    start, end = fmt.month_start(period), fmt.month_end(period)
    out = []

    def put(rubric, value):
        out.append((rubric, value))

    # Envoi, émetteur, contact.
    for number, value in (('001', SOFTWARE), ('002', SOFTWARE), ('003', SOFTWARE_VERSION),
                          ('005', declarant.send_mode), ('006', NORM_VERSION), ('007', '01'), ('008', '01')):
        put(f'S10.G00.00.{number}', value)
    emitter = declarant.emitter_siret or siret
    put('S10.G00.01.001', emitter[:9])
    put('S10.G00.01.002', emitter[9:])
    put('S10.G00.01.003', fmt.text(declarant.emitter_name or site['name'], 80))
    put('S10.G00.02.001', declarant.contact_civility)
    put('S10.G00.02.002', fmt.text(declarant.contact_name, 80))
    put('S10.G00.02.004', declarant.contact_email)
    put('S10.G00.02.005', declarant.contact_phone)
    # Déclaration, entreprise, établissement.
    put('S20.G00.05.001', NATURE)
    put('S20.G00.05.002', TYPE)
    put('S20.G00.05.003', '11')
    put('S20.G00.05.004', f'{period.replace("-", "")}{NATURE}{TYPE}')
    put('S20.G00.05.005', fmt.declared_month(period))
    put('S20.G00.05.007', fmt.date(declarant.file_date))
    put('S20.G00.05.008', '01')
    put('S20.G00.05.010', '01')
    put('S21.G00.06.001', siret[:9])
    put('S21.G00.06.003', declarant.ape_code)
    put('S21.G00.11.001', siret[9:])
    put('S21.G00.11.002', declarant.ape_code)
    put('S21.G00.11.022', declarant.idcc)
    # Urssaf bordereau: one S21.G00.23 per (CTP, qualifier), summing the individual lines.
    # The assiette of a CTP is each employee's base once (its codes share it), summed over employees.
    aggregated = {}
    for entries in individual.values():
        bases = {}
        for (_, _, ctp, qualifier), (base_cents, cents) in entries.items():
            if not ctp:
                continue
            bases[(ctp, qualifier)] = max(bases.get((ctp, qualifier), 0), base_cents)
            aggregated.setdefault((ctp, qualifier), [0, 0])[1] += cents
        for key, base_cents in bases.items():
            aggregated[key][0] += base_cents
    urssaf = fmt.euros_rounded(sum(cents for _, cents in aggregated.values()))
    if aggregated:
        put('S21.G00.22.001', declarant.urssaf_id)
        put('S21.G00.22.003', fmt.date(start))
        put('S21.G00.22.004', fmt.date(end))
        put('S21.G00.22.005', fmt.amount(urssaf))
        for (ctp, qualifier), (base_cents, cents) in sorted(aggregated.items()):
            put('S21.G00.23.001', ctp)
            put('S21.G00.23.002', qualifier)
            put('S21.G00.23.004', fmt.amount(base_cents))
            put('S21.G00.23.005', fmt.amount(cents))
    # Individuals.
    for record in records:
        slip, contract, nir = record['payslip'], record['contract'], record['nir']
        birth_department = nir[5:8] if nir[5:7] in ('97', '98') else nir[5:7]
        put('S21.G00.30.001', nir[:13])
        put('S21.G00.30.002', fmt.text(record['last_name'], 80))
        put('S21.G00.30.004', fmt.text(record['first_name'], 80))
        put('S21.G00.30.005', _NIR_SEX.get(nir[0], '01'))
        put('S21.G00.30.006', fmt.date(record['birth_date']))
        put('S21.G00.30.013', '01')
        put('S21.G00.30.014', birth_department)
        put('S21.G00.30.015', 'FR')
        put('S21.G00.30.019', fmt.text(record['employee_id'], 30))
        cadre = record['cadre']
        full_time = contract['weekly_hours'] >= 35
        first = max(start, contract['start_date'])
        last = min(end, contract['end_date'] or end)
        put('S21.G00.40.001', fmt.date(contract['start_date']))
        put('S21.G00.40.002', '04' if cadre else '06')
        put('S21.G00.40.003', '01' if cadre else '04')
        put('S21.G00.40.004', '372c' if cadre else '543d')
        put('S21.G00.40.006', 'Cadre' if cadre else 'Employé')
        put('S21.G00.40.007', _NATURE[contract['contract_type']])
        put('S21.G00.40.008', '99')
        put('S21.G00.40.009', re.sub('[^0-9A-Za-z]', '', contract['contract_id'])[:20] or '1')
        if contract['end_date'] is not None:
            put('S21.G00.40.010', fmt.date(contract['end_date']))
        put('S21.G00.40.011', '10')
        put('S21.G00.40.012', '151.67')
        put('S21.G00.40.013', fmt.amount(round(contract['weekly_hours'] * 52 / 12 * 100)))
        put('S21.G00.40.014', '10' if full_time else '20')
        put('S21.G00.40.016', '99')
        put('S21.G00.40.017', declarant.idcc)
        put('S21.G00.40.018', '200')
        put('S21.G00.40.019', siret)
        put('S21.G00.40.020', '200')
        put('S21.G00.40.024', '99')
        put('S21.G00.40.026', '99')
        put('S21.G00.40.036', '02')
        put('S21.G00.40.037', '02')
        put('S21.G00.40.039', '200')
        put('S21.G00.40.040', declarant.at_risk_code)
        put('S21.G00.71.002', 'RUAA')
        put('S21.G00.50.001', fmt.date(declarant.payment_date))
        put('S21.G00.50.002', fmt.amount(slip['net_taxable_cents']))
        put('S21.G00.50.004', fmt.amount(slip['net_pay_cents']))
        put('S21.G00.50.006', fmt.rate(slip['pas_rate']))
        put('S21.G00.50.007', '01' if record['personal_rate'] else '13')
        put('S21.G00.50.009', fmt.amount(slip['pas_cents']))
        put('S21.G00.50.013', fmt.amount(slip['net_taxable_cents']))
        base_pay = sum(i['employee_cents'] for i in record['lines'] if i['rubric'] == 'salaire_base')
        for kind, cents in (('001', slip['gross_cents']), ('002', slip['gross_cents']), ('010', base_pay)):
            put('S21.G00.51.001', fmt.date(first))
            put('S21.G00.51.002', fmt.date(last))
            put('S21.G00.51.010', re.sub('[^0-9A-Za-z]', '', contract['contract_id'])[:20] or '1')
            put('S21.G00.51.011', kind)
            put('S21.G00.51.013', fmt.amount(cents))
        entries = individual[record['employee_id']]
        bases = {'02': min(slip['gross_cents'], slip['ceiling_cents']), '03': slip['gross_cents']}
        for base_code in sorted({'02', '03'} | {key[0] for key in entries}):
            mine = sorted((key[1:], entry) for key, entry in entries.items() if key[0] == base_code)
            put('S21.G00.78.001', base_code)
            put('S21.G00.78.002', fmt.date(first))
            put('S21.G00.78.003', fmt.date(last))
            put('S21.G00.78.004', fmt.amount(bases.get(base_code, max([e[0] for _, e in mine], default=0))))
            for (code, _, _), (base_cents, cents) in mine:
                put('S21.G00.81.001', code)
                put('S21.G00.81.003', fmt.amount(base_cents))
                put('S21.G00.81.004', fmt.amount(cents))
    put('S90.G00.90.001', str(len(out) + 2))
    put('S90.G00.90.002', '1')
    due = fmt.due_date(period, headcount, paid_within_month=declarant.payment_date <= end)
    return Declaration(siret, fmt.render(out), [], len(records), gross, contributions, urssaf, due, len(out))


class _DeclareFn(beam.DoFn):
    """One establishment: its file (main output) or its refusal (``refused``) and dead letters."""

    def __init__(self, period: str, declarant: Declarant):
        self._period, self._declarant = period, declarant
        self._written = Metrics.counter(METRICS_NAMESPACE, 'dsn_files_built')
        self._refused = Metrics.counter(METRICS_NAMESPACE, 'dsn_establishments_refused')

    def setup(self):
        self._codes = load_codes()
        self._rules = PayrollRules.for_period(self._period)

    def process(self, element):
        siret, items = element
        sites = [value for name, value in items if name == _SITE]
        records = [value for name, value in items if name == _EMPLOYEE]
        declaration = declare(siret, sites[0] if len(sites) == 1 else None, records, self._period,
                              self._declarant, self._codes, self._rules)
        if len(sites) > 1:
            declaration.problems.append((None, 'the establishment appears twice in the establishments input'))
            declaration.content = None
        if declaration.content is not None:
            self._written.inc()
            yield declaration
            return
        self._refused.inc()
        # Keys only: the SIRET is the company's, the employee id is an internal key; never the NIR.
        _LOGGER.warning('DSN %s for %s refused: %d problems (see the index and the dead letters)',
                        self._period, siret, len(declaration.problems))
        yield beam.pvalue.TaggedOutput(_REFUSED, declaration)
        for employee_id, text in declaration.problems:
            who = f'employee {employee_id}' if employee_id else 'the establishment'
            yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, DeadLetter(
                step=STEP, error=f'establishment {siret}, {who}: {text}; no DSN file for this establishment',
                payload=json.dumps({'establishment_siret': siret, 'employee_id': employee_id, 'period': self._period,
                                    'problem': text}, ensure_ascii=False, sort_keys=True),
                source=''))


def _index_row(declaration: Declaration, period: str, path: str | None) -> dict:
    return {
        'establishment_siret': declaration.siret, 'period': period, 'nature': NATURE, 'type': TYPE,
        'status': 'written' if path else 'refused', 'path': path, 'due_date': declaration.due_date,
        'employees': declaration.employees, 'lines': declaration.lines, 'gross_cents': declaration.gross_cents,
        'contributions_cents': declaration.contributions_cents, 'urssaf_cents': declaration.urssaf_cents,
        'sha256': hashlib.sha256(declaration.content).hexdigest() if path else None,
        'problems': json.dumps([f'{f"employee {e}: " if e else ""}{t}' for e, t in declaration.problems],
                               ensure_ascii=False),
    }


class _PublishFn(beam.DoFn):
    """Writes a file to a temporary name, then renames it into place (same bytes on every attempt)."""

    def __init__(self, directory: str, temp_dir: str, period: str):
        self._directory, self._temp_dir, self._period = directory, temp_dir, period
        self._files = Metrics.counter(METRICS_NAMESPACE, 'dsn_files_written')

    def process(self, declaration: Declaration):
        final = FileSystems.join(self._directory, file_name(declaration.siret, self._period))
        temp = FileSystems.join(self._temp_dir, f'{uuid.uuid4().hex}.dsn.tmp')
        with FileSystems.create(temp, mime_type='text/plain', compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(declaration.content)
        publish(temp, final)
        self._files.inc()
        yield _index_row(declaration, self._period, final)


class _WithdrawFn(beam.DoFn):
    """A refused establishment keeps no file of an earlier run: a stale DSN must not be sent."""

    def __init__(self, directory: str, period: str):
        self._directory, self._period = directory, period

    def process(self, declaration: Declaration):
        final = FileSystems.join(self._directory, file_name(declaration.siret, self._period))
        if FileSystems.exists(final):
            FileSystems.delete([final])
        yield _index_row(declaration, self._period, None)


def _index_batch(rows: list) -> pa.RecordBatch:
    rows = sorted(rows, key=lambda r: r['establishment_siret'])
    return pa.RecordBatch.from_pylist(rows, schema=DSN_INDEX.arrow_schema())


def _site_items(batch: pa.RecordBatch):
    for row in batch.to_pylist():
        yield row['establishment_siret'], (_SITE, {k: v for k, v in row.items() if not k.startswith('_')})


def build(pipeline: beam.Pipeline, config: DsnConfig, store=None) -> dict:
    """Adds the DSN graph to ``pipeline``; returns its PCollections by name."""
    del store  # the files are rebuilt whole on every run; publishing makes that idempotent
    read = pipeline | 'ByEmployee' >> ReadGroupedByKey(
        inputs={name: (config.inputs[name], schema) for name, schema in _BY_EMPLOYEE.items()},
        key='employee_id', buckets=config.buckets, spill_dir=lifecycle.spill_dir(config.output, config.run_id),
        keep=functools.partial(rows_for_period, period=config.period))
    sites = pipeline | 'ReadEstablishments' >> ReadRecords(
        file_pattern=config.inputs['establishments'], schema=_unchecked(schemas.ESTABLISHMENTS),
        step='ReadEstablishments')
    read_letters = read['rejected']
    people = (
        read['grouped']
        | 'JoinBuckets' >> beam.ParDo(_JoinBucketFn(config.period)))
    people | 'RemoveSpill' >> RemoveWhenDone(lifecycle.spill_dir(config.output, config.run_id))
    site_items = sites.records | 'KeySites' >> beam.FlatMap(_site_items)
    declared = (
        (people, site_items)
        | 'AllBySite' >> beam.Flatten()
        | 'GroupBySite' >> beam.GroupByKey()
        | 'Declare' >> beam.ParDo(_DeclareFn(config.period, config.declarant))
        .with_outputs(_REFUSED, _DEAD_LETTERS, main='files'))
    directory = config.path('files')
    temp_dir = FileSystems.join(config.output, f'.tmp-{uuid.uuid4().hex}')
    written = declared.files | 'Publish' >> beam.ParDo(_PublishFn(directory, temp_dir, config.period))
    withdrawn = declared[_REFUSED] | 'Withdraw' >> beam.ParDo(_WithdrawFn(directory, config.period))
    rows = (written, withdrawn) | 'AllIndexRows' >> beam.Flatten()
    (pipeline
     | 'Once' >> beam.Create([None])
     | 'RemoveTempDir' >> beam.Map(lambda _, done, path: remove_temp_dir(path), beam.pvalue.AsList(written), temp_dir))
    index = (rows
             | 'AllRows' >> beam.combiners.ToList()
             | 'IndexBatch' >> beam.Map(_index_batch))
    index | 'WriteIndex' >> WriteKeyed(schema=DSN_INDEX, target=config.path('index'))
    dead_letters = (read_letters, sites.dead_letters, declared[_DEAD_LETTERS]) | 'AllDeadLetters' >> beam.Flatten()
    dead_letters | 'WriteDeadLetters' >> WriteDeadLetters(
        output_prefix=FileSystems.join(config.output, 'dead_letters', 'dead_letters'), run_id=config.run_id)
    return {'files': declared.files, 'refused': declared[_REFUSED], 'index': rows, 'dead_letters': dead_letters}


def summarize(result, config: DsnConfig, built) -> tuple[dict, lifecycle.Outcome]:
    summary = {
        'run_id': config.run_id, 'period': config.period,
        'files_written': lifecycle.counter(result, 'dsn_files_written'),
        'establishments_refused': lifecycle.counter(result, 'dsn_establishments_refused'),
        'dead_letters': lifecycle.counter(result, 'dead_letters'),
        'files': config.path('files'), 'index': config.path('index'), 'output': config.output,
    }
    counts = {k: summary[k] for k in ('files_written', 'establishments_refused', 'dead_letters')}
    outputs = {name: config.path(name) for name in ('files', 'index', 'dead_letters')}
    return summary, lifecycle.Outcome(counts=counts, outputs=outputs,
                                      record_refs={'period': config.period, 'files_written': summary['files_written']})


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, builds the month's DSN files under the run ledger, returns the summary."""
    values, beam_args = opts.parse(OPTIONS, list(sys.argv[1:] if argv is None else argv), prog=f'hrbatch run {NAME}')
    values['run_key'] = values['run_key'] or f'{NAME}:{values["period"]}'
    spec, summary = lifecycle.run_pipeline(
        NAME, values, beam_args, output=values['output'],
        make_config=lambda run_id: DsnConfig.from_values(values, run_id=run_id), build=build, summarize=summarize,
        inputs=lambda config: [p for p in config.inputs.values() if p], data_categories=_DATA_CATEGORIES,
        private=('contact_name', 'contact_email', 'contact_phone'))
    if 'files_written' not in summary:
        return summary
    print(f"DSN {summary['period']}, run {summary['run_id']}: {summary['files_written']:,} files written, "
          f"{summary['establishments_refused']:,} establishments refused, {summary['dead_letters']:,} dead letters.")
    print(f"DSN files:             {summary['files']}/")
    print(f"Index (due dates):     {summary['index']}/")
    print(f'Dead letters (JSONL):  {FileSystems.join(summary["output"], "dead_letters")}/')
    print(lifecycle.ledger_line(spec))
    return summary


if __name__ == '__main__':
    from pipelines.cli import main_for
    sys.exit(main_for(NAME))

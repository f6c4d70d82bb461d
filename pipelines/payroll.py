"""Payroll: the payslip of every employee for one month, with control totals per establishment.

Inputs: employees (NIR, cadre, Alsace-Moselle), establishments (SIRET, company SIREN and headcount,
AT/MP and versement mobilité rates), contracts (dates, weekly hours, monthly salary), and optionally
the month's variable elements (overtime, bonuses, unpaid absences) and personal withholding rates
(else the taux neutre grid applies). The rules in force for the month are dated rows in
``transforms/rules/`` (``transforms.payroll_rules``); the payslip itself is ``transforms.payslips``.

Outputs, keyed, so a rerun rewrites the same rows and never duplicates: payslip lines keyed by
(employee, period, rubric), payslip totals by (employee, period), and control totals by
(establishment, period, item): headcount, gross mass, net pay, employer cost, RGDU, withholding, and
every contribution, employee and employer side. Parquet under ``--output`` and the same rows in the
SQL database. An employee who cannot be paid correctly (see ``transforms.payroll_inputs``) gets no
payslip and a dead letter naming the employee key; every other employee is paid.

Scaling: every record of an employee is routed to one hash bucket of ``employee_id``
(``--buckets``); a bucket is joined and computed at once on Arrow tables, buckets run in parallel,
and each bucket is exactly one Parquet partition of the payslips and of their lines, written by the
step that computed it (no second shuffle of the 20-odd lines per payslip). Establishments are a
side input.

With ``--previous_payslips`` (the earlier months of the year), the RGDU is computed progressively
from their year-to-date totals (``transforms.payslips``). Not implemented yet: contracts in two
establishments in one month, the reduced maladie and family rates, and the tax and social exemption
of overtime.

    hrbatch run payroll --period 2026-11 --employees in/employees.parquet \\
        --establishments in/establishments.parquet --contracts in/contracts.parquet \\
        --variable_elements in/variable_elements.parquet --withholding_rates in/withholding_rates.parquet \\
        --output out/payroll-2026-11
"""
import dataclasses
import functools
import logging
import sys

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines import lifecycle
from pipelines import options as opts
from transforms import payroll_inputs
from transforms import payslips
from transforms import schemas
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.dead_letters import WriteDeadLetters
from transforms.keyed_write import WriteKeyed
from transforms.keyed_write import WritePartitions
from transforms.keyed_write import bucket_dir
from transforms.payroll_rules import PayrollRules
from transforms.read import ReadRecords
from transforms.routing import ReadGroupedByKey
from transforms.routing import RemoveWhenDone
from transforms.routing import split_blocked
from transforms.routing import tagged_tables

NAME = 'payroll'
_LOGGER = logging.getLogger(__name__)
_DEAD_LETTERS = 'dead_letters'
_CONTROLS = 'controls'
_TOTALS = 'totals'
_DATA_CATEGORIES = ['employees', 'contracts', 'pay', 'withholding tax rates']
# Inputs routed by employee: name -> schema (which are required is said in OPTIONS).
_BY_EMPLOYEE = {
    'employees': schemas.EMPLOYEES,
    'contracts': schemas.CONTRACTS,
    'variable_elements': schemas.VARIABLE_ELEMENTS,
    'withholding_rates': schemas.WITHHOLDING_RATES,
    'previous_payslips': schemas.PAYSLIPS.project(('employee_id', 'period', *payroll_inputs.YTD_COLUMNS),
                                                  name='previous_payslips'),
}
_CONTROL_TOTALS = ('gross_cents', 'employee_contributions_cents', 'net_before_tax_cents', 'net_taxable_cents',
                   'pas_cents', 'net_pay_cents', 'employer_contributions_cents', 'rgdu_cents', 'employer_cost_cents')

OPTIONS = (
    opts.Option('period', 'The month to pay, YYYY-MM.', required=True),
    opts.Option('employees', 'Employees file or glob (local or gs://): Parquet, Avro, CSV or JSONL.', required=True),
    opts.Option('establishments', 'Establishments file or glob.', required=True),
    opts.Option('contracts', 'Employment contracts file or glob.', required=True),
    opts.Option('variable_elements', "The month's variable elements (overtime, bonuses, unpaid absences). "
                'Rows of other months are ignored. Default: none.'),
    opts.Option('withholding_rates', 'Personal withholding (PAS) rates; without one the taux neutre grid applies.'),
    opts.Option('previous_payslips', "Earlier payslips of the year (this pipeline's payslips output, a glob): the "
                'RGDU is computed progressively from their year-to-date totals. Default: none (the month alone).'),
    opts.Option('output', 'Output directory (local or gs://): payslip_lines/, payslips/, controls/, dead_letters/.',
                required=True),
    opts.Option('database', 'Where payslips are upserted: sqlite:///PATH, postgresql://..., or "none". '
                'Default: sqlite:///OUTPUT/hrbatch.db for a local output, none for gs://.'),
    opts.Option('buckets', 'Hash buckets of employee_id: the unit of parallel work, and the Parquet partitions '
                'of the payslips.', type='int', default=64, min_value=1, max_value=100_000),
) + lifecycle.LIFECYCLE_OPTIONS


@dataclasses.dataclass(frozen=True)
class PayrollConfig:
    period: str
    inputs: dict                # input name -> file pattern (None for an absent optional input)
    output: str
    database: str | None
    buckets: int
    run_id: str

    def path(self, name: str) -> str:
        return FileSystems.join(self.output, name)

    @classmethod
    def from_values(cls, values: dict, *, run_id: str) -> 'PayrollConfig':
        PayrollRules.for_period(values['period'])  # a month without rules fails now, naming it
        inputs = {name: values[name] for name in (*_BY_EMPLOYEE, 'establishments')}
        return cls(period=values['period'], inputs=inputs, output=values['output'],
                   database=lifecycle.database_target(values['database'], values['output']),
                   buckets=values['buckets'], run_id=run_id)


class _PayBucketFn(beam.DoFn):
    """Joins and pays the employees of one bucket; yields lines, totals, control items, dead letters."""

    def __init__(self, period: str):
        self._period = period
        self._paid = Metrics.counter(METRICS_NAMESPACE, 'employees_paid')
        self._without_contract = Metrics.counter(METRICS_NAMESPACE, 'employees_without_contract')

    def setup(self):
        self._rules = PayrollRules.for_period(self._period)

    def process(self, element, establishments):
        bucket, items = element
        records, blocked = split_blocked(items)
        tables = tagged_tables(records, _BY_EMPLOYEE)
        assembled = payroll_inputs.assemble(
            self._period, tables['employees'], tables['contracts'], tables['variable_elements'],
            tables['withholding_rates'], tagged_tables([('sites', b) for b in establishments],
                                                       {'sites': schemas.ESTABLISHMENTS})['sites'], blocked,
            previous=tables['previous_payslips'])
        self._without_contract.inc(assembled.without_contract)
        for letter in assembled.dead_letters:
            yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, letter)
        if not assembled.month.num_rows:
            return
        lines, totals = payslips.compute(assembled.month, self._rules)
        self._paid.inc(totals.num_rows)
        # A bucket is exactly one Parquet partition of each output: written as it is, no shuffle.
        partition = bucket_dir('employee_id', bucket)
        yield partition, lines
        yield beam.pvalue.TaggedOutput(_TOTALS, (partition, totals))
        for site_vector in _control_vectors(lines, totals, control_items(self._rules)):
            yield beam.pvalue.TaggedOutput(_CONTROLS, site_vector)


def control_items(rules: PayrollRules) -> tuple[str, ...]:
    """The control totals of an establishment, in a fixed order: counts and totals, then every rubric."""
    rubrics = [c.rubric for c in rules.contributions]
    return ('headcount', *(name.removesuffix('_cents') for name in _CONTROL_TOTALS),
            *(f'{side}:{rubric}' for rubric in rubrics for side in ('employee', 'employer')))


def _control_vectors(lines: pa.Table, totals: pa.Table, items: tuple[str, ...]):
    """(establishment, int64 vector of ``items``): the partial sums of one bucket, one per establishment."""
    index = {item: i for i, item in enumerate(items)}
    by_site = totals.group_by('establishment_siret').aggregate(
        [('employee_id', 'count')] + [(name, 'sum') for name in _CONTROL_TOTALS])
    vectors = {}
    for row in by_site.to_pylist():
        vector = np.zeros(len(items), dtype=np.int64)
        vector[0] = row['employee_id_count']
        for i, name in enumerate(_CONTROL_TOTALS, start=1):
            vector[i] = row[f'{name}_sum']
        vectors[row['establishment_siret']] = vector
    contributions = lines.filter(pc.equal(lines.column('kind'), 'contribution'))
    # Each line's establishment: its employee's row in the totals (a hash lookup, cheaper than a join).
    payslip = pc.index_in(contributions.column('employee_id'), value_set=totals.column('employee_id'))
    contributions = contributions.append_column('establishment_siret',
                                                totals.column('establishment_siret').take(payslip))
    by_rubric = contributions.group_by(['establishment_siret', 'rubric']).aggregate(
        [('employee_cents', 'sum'), ('employer_cents', 'sum')])
    for row in by_rubric.to_pylist():
        vector = vectors[row['establishment_siret']]
        vector[index[f'employee:{row["rubric"]}']] += row['employee_cents_sum']
        vector[index[f'employer:{row["rubric"]}']] += row['employer_cents_sum']
    return vectors.items()


def _sum_vectors(vectors) -> np.ndarray:
    return np.sum(list(vectors), axis=0)


def _controls_batch(sums: list, period: str, items: tuple[str, ...]) -> pa.RecordBatch:
    sums = sorted(sums, key=lambda pair: pair[0])
    n = len(items)
    return pa.RecordBatch.from_pydict({
        'establishment_siret': [site for site, _ in sums for _ in range(n)], 'period': [period] * (n * len(sums)),
        'item': list(items) * len(sums),
        'value': np.concatenate([vector for _, vector in sums]) if sums else np.zeros(0, dtype=np.int64),
    }, schema=schemas.PAYROLL_CONTROLS.arrow_schema())


def build(pipeline: beam.Pipeline, config: PayrollConfig, store=None) -> dict:
    """Adds the payroll graph to ``pipeline``; returns its PCollections by name."""
    del store  # every run recomputes the month; the keyed writes make that idempotent
    read = pipeline | 'ByEmployee' >> ReadGroupedByKey(
        inputs={name: (config.inputs[name], schema) for name, schema in _BY_EMPLOYEE.items()},
        key='employee_id', buckets=config.buckets, keep=functools.partial(payroll_inputs.rows_for_period, period=config.period),
        spill_dir=lifecycle.spill_dir(config.output, config.run_id))
    sites = pipeline | 'ReadEstablishments' >> ReadRecords(
        file_pattern=config.inputs['establishments'], schema=schemas.ESTABLISHMENTS, step='ReadEstablishments')
    read_letters = read['rejected']
    paid = (
        read['grouped']
        | 'PayBuckets' >> beam.ParDo(_PayBucketFn(config.period), establishments=beam.pvalue.AsList(sites.records))
        .with_outputs(_TOTALS, _CONTROLS, _DEAD_LETTERS, main='lines'))
    paid[_CONTROLS] | 'RemoveSpill' >> RemoveWhenDone(lifecycle.spill_dir(config.output, config.run_id))
    controls = (
        paid[_CONTROLS]
        | 'SumControls' >> beam.CombinePerKey(_sum_vectors)
        | 'AllControls' >> beam.combiners.ToList()
        | 'ControlsBatch' >> beam.Map(_controls_batch, config.period, control_items(PayrollRules.for_period(config.period))))
    for name, schema, partitions in (('payslip_lines', schemas.PAYSLIP_LINES, paid.lines),
                                     ('payslips', schemas.PAYSLIPS, paid[_TOTALS])):
        label = ''.join(part.title() for part in name.split('_'))
        partitions | f'Write{label}' >> WritePartitions(schema=schema, target=config.path(name))
        if config.database:
            (partitions
             | f'{label}Batches' >> beam.FlatMap(lambda partition: partition[1].to_batches())
             | f'Write{label}ToDatabase' >> WriteKeyed(schema=schema, target=config.database))
    controls | 'WriteControls' >> WriteKeyed(schema=schemas.PAYROLL_CONTROLS, target=config.path('controls'))
    if config.database:
        controls | 'WriteControlsToDatabase' >> WriteKeyed(schema=schemas.PAYROLL_CONTROLS, target=config.database)
    dead_letters = (read_letters, sites.dead_letters, paid[_DEAD_LETTERS]) | 'AllDeadLetters' >> beam.Flatten()
    dead_letters | 'WriteDeadLetters' >> WriteDeadLetters(
        output_prefix=FileSystems.join(config.output, 'dead_letters', 'dead_letters'), run_id=config.run_id)
    return {'lines': paid.lines, 'totals': paid[_TOTALS], 'controls': controls, 'dead_letters': dead_letters}


def summarize(result, config: PayrollConfig, built) -> tuple[dict, lifecycle.Outcome]:
    summary = {
        'run_id': config.run_id, 'period': config.period,
        **{name: lifecycle.counter(result, name) for name in (
            'employees_read', 'contracts_read', 'employees_paid', 'employees_without_contract', 'dead_letters')},
        'payslip_lines_written': lifecycle.counter(result, 'payslip_lines_parquet_rows'),
        'output': config.output, 'database': config.database,
    }
    counts = {k: summary[k] for k in ('employees_read', 'contracts_read', 'employees_paid',
                                      'employees_without_contract', 'payslip_lines_written', 'dead_letters')}
    outputs = {name: config.path(name) for name in ('payslip_lines', 'payslips', 'controls', 'dead_letters')}
    return summary, lifecycle.Outcome(counts=counts, outputs={**outputs, 'database': config.database},
                                      record_refs={'period': config.period, 'employees_paid': summary['employees_paid']})


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, pays the month under the run ledger, returns the summary (or ``skipped``)."""
    values, beam_args = opts.parse(OPTIONS, list(sys.argv[1:] if argv is None else argv), prog=f'hrbatch run {NAME}')
    values['run_key'] = values['run_key'] or f'{NAME}:{values["period"]}'
    spec, summary = lifecycle.run_pipeline(
        NAME, values, beam_args, output=values['output'],
        make_config=lambda run_id: PayrollConfig.from_values(values, run_id=run_id), build=build, summarize=summarize,
        inputs=lambda config: [p for p in config.inputs.values() if p], data_categories=_DATA_CATEGORIES)
    if 'employees_paid' not in summary:
        return summary
    path = summary['output']
    print(f"Payroll {summary['period']}, run {summary['run_id']}: {summary['employees_paid']:,} employees paid, "
          f"{summary['dead_letters']:,} dead letters, {summary['employees_without_contract']:,} without a contract "
          'this month.')
    print(f'Payslips (Parquet):    {FileSystems.join(path, "payslips")}/ and {FileSystems.join(path, "payslip_lines")}/')
    print(f'Control totals:        {FileSystems.join(path, "controls")}/')
    if summary['database']:
        print(f"Payslips (SQL):        {summary['database']}  tables payslips, payslip_lines, payroll_controls")
    print(f'Dead letters (JSONL):  {FileSystems.join(path, "dead_letters")}/')
    print(lifecycle.ledger_line(spec))
    return summary


if __name__ == '__main__':
    from pipelines.cli import main_for
    sys.exit(main_for(NAME))

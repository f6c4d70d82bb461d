"""CPF: the yearly credit of every employee's Compte personnel de formation, credited once.

Hours come from the year's payslips (the payroll pipeline's ``payslips`` output of each month,
given as one glob), plus the absences the CPF counts as worked; the employees give the
qualification level, and the current counters (``--balances``) the balance and the last year
already credited. The credit rules are ``transforms.cpf``. Output keyed by (employee, year), in
Parquet and the SQL database: running a year twice never credits twice (same rows), and a counter
whose ``last_credited_year`` already covers the year is reported ``already_credited`` with no credit.

    hrbatch run cpf --year 2026 --payslips 'out/payroll-2026-*/payslips/*/part-*.parquet' \\
        --employees in/employees.parquet --balances in/cpf_balances.parquet --output out/cpf-2026
"""
import dataclasses
import functools
import json
import sys

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines import lifecycle
from pipelines import options as opts
from transforms import cpf
from transforms import schemas
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.dead_letters import DeadLetter
from transforms.dead_letters import WriteDeadLetters
from transforms.keyed_write import WriteKeyed
from transforms.keyed_write import WritePartitions
from transforms.keyed_write import bucket_dir
from transforms.routing import ReadGroupedByKey
from transforms.routing import RemoveWhenDone
from transforms.routing import split_blocked
from transforms.routing import tagged_tables

NAME = 'cpf'
_DEAD_LETTERS = 'dead_letters'
_DATA_CATEGORIES = ['employees', 'hours worked', 'absences', 'CPF counters']
_HOURS = schemas.PAYSLIPS.project(('employee_id', 'period', 'hours_paid'), name='payslip_hours')
_INPUTS = {  # name -> schema (which are required is said in OPTIONS)
    'payslips': _HOURS,
    'employees': schemas.EMPLOYEES,
    'absences': schemas.ABSENCES,
    'balances': schemas.CPF_BALANCES,
}

OPTIONS = (
    opts.Option('year', 'The year whose hours are credited.', type='int', required=True, min_value=2019,
                max_value=2100),
    opts.Option('payslips', "The year's payslips (the payroll pipeline's payslips output): file or glob.",
                required=True),
    opts.Option('employees', 'Employees file or glob (qualification level).', required=True),
    opts.Option('absences', 'Absences of the year (kind, hours); the CPF counts some as worked. Default: none.'),
    opts.Option('balances', 'Current CPF counters (balance, last credited year). Default: every counter at 0.'),
    opts.Option('output', 'Output directory (local or gs://): cpf_credits/ and dead_letters/.', required=True),
    opts.Option('database', 'Where credits are upserted: sqlite:///PATH, postgresql://..., or "none". '
                'Default: sqlite:///OUTPUT/hrbatch.db for a local output, none for gs://.'),
    opts.Option('buckets', 'Hash buckets of employee_id: the unit of parallel work and the Parquet partitions.',
                type='int', default=64, min_value=1, max_value=100_000),
) + lifecycle.LIFECYCLE_OPTIONS


@dataclasses.dataclass(frozen=True)
class CpfConfig:
    year: int
    inputs: dict
    output: str
    database: str | None
    buckets: int
    run_id: str

    @classmethod
    def from_values(cls, values: dict, *, run_id: str) -> 'CpfConfig':
        cpf.parameters(values['year'])  # a year without rules fails now, naming it
        return cls(year=values['year'], inputs={name: values[name] for name in _INPUTS}, output=values['output'],
                   database=lifecycle.database_target(values['database'], values['output']),
                   buckets=values['buckets'], run_id=run_id)


def _of_year(name: str, batch: pa.RecordBatch, year: int) -> pa.RecordBatch:
    """The rows of ``year``: payslips by their period, absences by their year; others whole."""
    if name not in ('payslips', 'absences'):
        return batch
    if 'period' in batch.schema.names:
        return batch.filter(pc.starts_with(batch.column('period'), f'{year}-'))
    return batch.filter(pc.equal(batch.column('year'), year))


class _CreditBucketFn(beam.DoFn):

    def __init__(self, year: int):
        self._year = year
        self._credited = Metrics.counter(METRICS_NAMESPACE, 'employees_credited')
        self._cents = Metrics.counter(METRICS_NAMESPACE, 'cpf_credited_cents')

    def process(self, element):
        bucket, items = element
        records, blocked = split_blocked(items)
        tables = tagged_tables(records, _INPUTS)
        result = cpf.credit(self._year, tables['payslips'], tables['absences'], tables['employees'],
                            tables['balances'])
        for letter in result.dead_letters:
            yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, letter)
        credits = result.credits
        if blocked:  # a rejected record (an absence, a counter) could change the credit: none is given
            for employee_id, reason in sorted(blocked.items()):
                yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, DeadLetter(
                    step=cpf.STEP, error=f'employee {employee_id} not credited: {reason}',
                    payload=json.dumps({'employee_id': employee_id}), source=''))
            credits = credits.filter(pc.invert(pc.is_in(credits.column('employee_id'), pa.array(sorted(blocked)))))
        if credits.num_rows:
            credited = pc.greater(credits.column('credit_cents'), 0)
            self._credited.inc(pc.sum(credited).as_py() or 0)
            self._cents.inc(pc.sum(credits.column('credit_cents')).as_py() or 0)
            yield bucket_dir('employee_id', bucket), credits


def build(pipeline: beam.Pipeline, config: CpfConfig, store=None) -> dict:
    del store  # the credits are recomputed from the inputs; the keyed writes make that idempotent
    read = pipeline | 'ByEmployee' >> ReadGroupedByKey(
        inputs={name: (config.inputs[name], schema) for name, schema in _INPUTS.items()},
        key='employee_id', buckets=config.buckets, spill_dir=lifecycle.spill_dir(config.output, config.run_id),
        keep=functools.partial(_of_year, year=config.year))
    credited = (
        read['grouped']
        | 'Credit' >> beam.ParDo(_CreditBucketFn(config.year)).with_outputs(_DEAD_LETTERS, main='credits'))
    credited.credits | 'RemoveSpill' >> RemoveWhenDone(lifecycle.spill_dir(config.output, config.run_id))
    credited.credits | 'WriteCredits' >> WritePartitions(schema=schemas.CPF_CREDITS,
                                                         target=FileSystems.join(config.output, 'cpf_credits'))
    if config.database:
        (credited.credits
         | 'CreditBatches' >> beam.FlatMap(lambda partition: partition[1].to_batches())
         | 'WriteCreditsToDatabase' >> WriteKeyed(schema=schemas.CPF_CREDITS, target=config.database))
    dead_letters = (read['rejected'], credited[_DEAD_LETTERS]) | 'AllDeadLetters' >> beam.Flatten()
    dead_letters | 'WriteDeadLetters' >> WriteDeadLetters(
        output_prefix=FileSystems.join(config.output, 'dead_letters', 'dead_letters'), run_id=config.run_id)
    return {'credits': credited.credits, 'dead_letters': dead_letters}


def summarize(result, config: CpfConfig, built) -> tuple[dict, lifecycle.Outcome]:
    summary = {
        'run_id': config.run_id, 'year': config.year,
        **{name: lifecycle.counter(result, name) for name in ('employees_read', 'employees_credited', 'dead_letters')},
        'credited_cents': lifecycle.counter(result, 'cpf_credited_cents'),
        'credits_written': lifecycle.counter(result, 'cpf_credits_parquet_rows'),
        'output': config.output, 'database': config.database,
    }
    counts = {k: summary[k] for k in ('employees_read', 'employees_credited', 'credited_cents', 'credits_written',
                                      'dead_letters')}
    return summary, lifecycle.Outcome(
        counts=counts, outputs={'cpf_credits': FileSystems.join(config.output, 'cpf_credits'), 'database': config.database},
        record_refs={'year': config.year, 'employees_credited': summary['employees_credited']})


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, credits the year under the run ledger, returns the summary (or ``skipped``)."""
    values, beam_args = opts.parse(OPTIONS, list(sys.argv[1:] if argv is None else argv), prog=f'hrbatch run {NAME}')
    values['run_key'] = values['run_key'] or f'{NAME}:{values["year"]}'
    spec, summary = lifecycle.run_pipeline(
        NAME, values, beam_args, output=values['output'],
        make_config=lambda run_id: CpfConfig.from_values(values, run_id=run_id), build=build, summarize=summarize,
        inputs=lambda config: [p for p in config.inputs.values() if p], data_categories=_DATA_CATEGORIES)
    if 'employees_credited' not in summary:
        return summary
    print(f"CPF {summary['year']}, run {summary['run_id']}: {summary['employees_credited']:,} employees credited, "
          f"{summary['credited_cents'] / 100:,.2f} EUR in all, {summary['dead_letters']:,} dead letters.")
    print(f"Credits (Parquet):     {FileSystems.join(summary['output'], 'cpf_credits')}/")
    if summary['database']:
        print(f"Credits (SQL):         {summary['database']}  table cpf_credits")
    print(lifecycle.ledger_line(spec))
    return summary


if __name__ == '__main__':
    from pipelines.cli import main_for
    sys.exit(main_for(NAME))

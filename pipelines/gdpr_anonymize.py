"""GDPR retention: anonymise, in place, every record kept longer than its purpose needs.

A retention policy (YAML, see ``pipelines/policies/retention.example.yaml``) names each dataset
(``transforms.datasets``: candidates, matches, employees, contracts, payslips, payslip_lines,
cpf_credits), where it is, its data category, its retention period and the date field it counts
from (``from``), or the dataset whose person records it expires with (``follows``: a match expires
with its candidate, an employee record 5 years after the end of the last contract). A record past
retention is anonymised as the catalogue says (``transforms.retention``): direct identifiers
removed or replaced with keyed pseudonyms (HMAC-SHA256 with a secret key), quasi-identifiers
generalised (birth date to year, postcode to département, amounts to bands), free text cleared.
The anonymised records of a dataset are then grouped by their generalised quasi-identifiers, and
every group smaller than k (``k`` in the policy, 5 by default) is suppressed (its records deleted)
and counted: what remains is k-anonymous.

Guarantees:

- Idempotent: every treatment leaves an anonymised value as it is, so a second run with the same
  ``--as_of`` changes nothing and rewrites no file (anonymising twice equals anonymising once, byte
  for byte). A file is rewritten only if one of its rows changes.
- Crash-safe: each Parquet file is read whole, anonymised, written to a hidden temporary file in its
  own directory and renamed over the original (atomic on POSIX, an overwriting copy on GCS). A run
  that dies leaves every file either as it was or anonymised; rerun it (``--force``) to finish.
  Keyed files (``WriteKeyed``/``WritePartitions``) stay sorted by key, with their metadata.
- The key is read from ``--key_file`` (local or gs://) or the environment variable named by
  ``--key_env`` on the workers, in ``DoFn.setup``: only the reference is in the options, the job
  graph, the display data and the run ledger; the key itself is in no output or log.
- ``--preview`` (the dry run): the same two passes, counting what would change (per dataset and
  category, no values), writing nothing but the report; recorded in the ledger and audit trail under
  its own run key, so it never blocks the real run. (It is not called ``--dry_run``: that is Beam's
  option to describe a Dataflow job without running it, which every hrbatch pipeline honours.)
- Nothing personal is logged or reported: counts only. The audit trail gets one record per run
  with the counts per dataset.

Two passes over each dataset that needs them (one to measure the k-anonymity groups and which
persons expired, one to rewrite); a dataset with no quasi-identifier that nothing follows is read
once.

Not covered: the SQL copies of the datasets (``--database`` of matching, payroll and cpf: rerun
those pipelines' keyed writes or delete the rows), the DSN files (declarations: deleted, not
anonymised, once their retention runs out) and the audit trail (``hrbatch audit retention``).

    hrbatch run gdpr_anonymize --policy policy.yaml --key_file /run/secrets/hrbatch-gdpr-key \\
        --output out/gdpr [--preview] [--as_of 2026-12-31]
    hrbatch run gdpr_anonymize --policy gs://BUCKET/policy.yaml --key_file gs://SECRETS/gdpr.key \\
        --output gs://BUCKET/gdpr --ledger postgresql://... --runner DataflowRunner --project P \\
        --region europe-west9 --temp_location gs://BUCKET/tmp
"""
import dataclasses
import datetime
import json
import sys
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from pipelines import lifecycle
from pipelines import options as opts
from transforms import keyed_write
from transforms import retention
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.errors import ConfigError

NAME = 'gdpr_anonymize'
_GROUPS = 'groups'
_PERSONS = 'persons'
_KEY_METADATA = b'hrbatch.key'

OPTIONS = (
    opts.Option('policy', 'Retention policy file (YAML, local or gs://): each dataset, its path, data category, '
                'retention period and the date field it counts from (see pipelines/policies/'
                'retention.example.yaml).', required=True),
    opts.Option('key_file', 'File holding the pseudonymisation key (HMAC, at least 32 bytes), read by the workers; '
                'the key is never copied into options, outputs or logs.'),
    opts.Option('key_env', 'Or: name of the environment variable holding the key on the workers.'),
    opts.Option('output', 'Directory (local or gs://) for the run report (reports/RUN_ID.json: counts only).',
                required=True),
    opts.Option('as_of', 'The day retention is measured at, YYYY-MM-DD. Default: today (UTC).'),
    opts.Option('preview', 'Dry run: count what would be anonymised and suppressed, per dataset and category, and change '
                'nothing.', type='bool', default=False),
) + lifecycle.LIFECYCLE_OPTIONS


def parse_day(text: str | None, flag: str) -> datetime.date:
    if text is None:
        return datetime.datetime.now(datetime.timezone.utc).date()
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f'{flag}={text!r}: must be a date YYYY-MM-DD') from None


@dataclasses.dataclass(frozen=True)
class DatasetRun:
    entry: retention.PolicyEntry
    plan: retention.TablePlan
    files: tuple[str, ...]
    measured: bool     # read twice: quasi-identifiers to group, or another dataset follows it


@dataclasses.dataclass(frozen=True)
class AnonymizeConfig:
    policy_path: str
    runs: tuple[DatasetRun, ...]
    key: retention.KeyRef
    output: str
    as_of: datetime.date
    dry_run: bool
    run_id: str

    @classmethod
    def from_values(cls, values: dict, *, run_id: str) -> 'AnonymizeConfig':
        key = retention.KeyRef(file=values['key_file'], env=values['key_env'])
        key.load()  # a missing or short key fails now, naming the option; the key is not kept
        policy = retention.read_policy(values['policy'])
        as_of = parse_day(values['as_of'], '--as_of')
        followed = set(policy.followed)
        ordered = sorted(policy.entries, key=lambda e: (e.follows is not None, e.dataset))
        runs = tuple(DatasetRun(
            entry=e, plan=retention.plan_for(e, as_of),
            files=tuple(retention.dataset_files(e.path, where=f'--policy dataset {e.dataset!r}')),
            measured=bool(e.quasi_identifiers) or e.dataset in followed) for e in ordered)
        return cls(policy_path=values['policy'], runs=runs, key=key, output=values['output'], as_of=as_of,
                   dry_run=values['preview'], run_id=run_id)


def read_table(path: str) -> pa.Table:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        with pq.ParquetFile(handle) as parquet_file:
            return parquet_file.read()


def write_in_place(table: pa.Table, path: str) -> None:
    """Replaces the file at ``path`` with ``table``: written beside it under a hidden name, then renamed."""
    directory, name = FileSystems.split(path)
    temp = FileSystems.join(directory, f'.{name}.{uuid.uuid4().hex}.tmp')
    metadata = table.schema.metadata or {}
    if _KEY_METADATA in metadata:  # a keyed file: rows sorted by key, as WriteKeyed writes them
        key = json.loads(metadata[_KEY_METADATA])
        table = table.sort_by([(k, 'ascending') for k in key])
        keyed_write.write_parquet(table, temp)
    else:
        with FileSystems.create(temp, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            pq.write_table(table, handle, compression='zstd')
    keyed_write.publish(temp, path)


def _counter(dataset: str, name: str):
    return Metrics.counter(METRICS_NAMESPACE, f'{dataset}_{name}')


class _KeyedFn(beam.DoFn):
    """Reads the key where it is used; only its reference is pickled with the DoFn."""

    def __init__(self, dataset: str, plan: retention.TablePlan, key: retention.KeyRef):
        self._dataset, self._plan, self._key_ref = dataset, plan, key
        self._files_read = _counter(dataset, 'files_read')

    def setup(self):
        self._key = self._key_ref.load()

    def teardown(self):
        self._key = None


class _MeasureFileFn(_KeyedFn):
    """First pass over one file: quasi-identifier group sizes of the expired rows, and for a dataset
    that others follow, (person pseudonym, expired) pairs."""

    def __init__(self, dataset, plan, key, *, emit_persons: bool):
        super().__init__(dataset, plan, key)
        self._emit_persons = emit_persons

    def process(self, path: str, follow_set=None):
        table = read_table(path)
        self._files_read.inc()
        counts, mask = retention.measure_table(table, self._plan, self._key, follow_set=follow_set)
        for group, count in counts.items():
            yield beam.pvalue.TaggedOutput(_GROUPS, (group, count))
        if self._emit_persons:
            for pair in retention.person_pairs(table, self._plan, self._key, mask):
                yield beam.pvalue.TaggedOutput(_PERSONS, pair)


class _AnonymiseFileFn(_KeyedFn):
    """Second pass: anonymises one file's expired rows, deletes those of small groups, rewrites the
    file in place if anything changed (never in a dry run). Emits nothing personal: counts."""

    def __init__(self, dataset, plan, key, *, dry_run: bool):
        super().__init__(dataset, plan, key)
        self._dry_run = dry_run
        self._rows = _counter(dataset, 'rows')
        self._expired = _counter(dataset, 'expired')
        self._anonymised = _counter(dataset, 'anonymised')
        self._suppressed = _counter(dataset, 'suppressed')
        self._rewritten = _counter(dataset, 'files_rewritten')

    def process(self, path: str, follow_set=None, suppress=()):
        table = read_table(path)
        self._files_read.inc()
        result = retention.anonymise_table(table, self._plan, self._key, follow_set=follow_set,
                                           suppress=frozenset(suppress))
        self._rows.inc(result.rows)
        self._expired.inc(result.expired)
        self._anonymised.inc(result.anonymised)
        self._suppressed.inc(result.suppressed)
        if result.changed and not self._dry_run:
            write_in_place(result.table.replace_schema_metadata(table.schema.metadata), path)
            self._rewritten.inc()
        yield path


def _count_small(group_count, dataset: str, k: int):
    group, count = group_count
    if count < k:
        Metrics.counter(METRICS_NAMESPACE, f'{dataset}_small_groups').inc()
        yield group
    else:
        Metrics.distribution(METRICS_NAMESPACE, f'{dataset}_group_size').update(count)


def _as_value_set(ids: list) -> pa.Array:
    return pa.array(sorted(ids), pa.string())


def build(pipeline: beam.Pipeline, config: AnonymizeConfig, store=None) -> dict:
    """Adds the two passes of every dataset of the policy; returns the rewritten paths per dataset."""
    del store  # a rerun re-reads the files; anonymisation is idempotent
    follow_sets, rewritten = {}, {}
    for run in config.runs:  # followed datasets first (from_values orders them)
        name, entry = run.entry.dataset, run.entry
        label = ''.join(part.title() for part in name.split('_'))
        files = pipeline | f'List{label}' >> beam.Create(list(run.files))
        follow = {}
        if entry.follows:
            follow['follow_set'] = beam.pvalue.AsSingleton(follow_sets[entry.follows])
        suppress = {}
        if run.measured:
            measured = files | f'Measure{label}' >> beam.ParDo(
                _MeasureFileFn(name, run.plan, config.key, emit_persons=name in {r.entry.follows for r in config.runs}),
                **follow).with_outputs(_GROUPS, _PERSONS)
            if entry.quasi_identifiers:
                small = (measured[_GROUPS]
                         | f'SumGroups{label}' >> beam.CombinePerKey(sum)
                         | f'SmallGroups{label}' >> beam.FlatMap(_count_small, name, entry.k))
                suppress['suppress'] = beam.pvalue.AsList(small)
            follow_sets[name] = (
                measured[_PERSONS]
                | f'AllExpired{label}' >> beam.CombinePerKey(all)
                | f'Expired{label}' >> beam.FlatMap(lambda pair: [pair[0]] if pair[1] else [])
                | f'ExpiredSet{label}' >> beam.combiners.ToList()
                | f'ValueSet{label}' >> beam.Map(_as_value_set))
        rewritten[name] = files | f'Anonymise{label}' >> beam.ParDo(
            _AnonymiseFileFn(name, run.plan, config.key, dry_run=config.dry_run), **follow, **suppress)
    return rewritten


def _distribution_min(result, name: str) -> int | None:
    query = MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name)
    values = [r.committed for r in result.metrics().query(query)['distributions'] if r.committed]
    return min((v.min for v in values if v.count), default=None)


def summarize(result, config: AnonymizeConfig, built) -> tuple[dict, lifecycle.Outcome]:
    per_dataset, per_category = {}, {}
    for run in config.runs:
        name = run.entry.dataset
        figures = {k: lifecycle.counter(result, f'{name}_{k}') for k in (
            'rows', 'expired', 'anonymised', 'suppressed', 'small_groups', 'files_read', 'files_rewritten')}
        figures['already_anonymised'] = figures['expired'] - figures['anonymised'] - figures['suppressed']
        figures['k'] = run.entry.k
        figures['k_reached'] = _distribution_min(result, f'{name}_group_size') if run.entry.quasi_identifiers else None
        figures['files'] = len(run.files)
        figures['passes'] = round(figures.pop('files_read') / max(len(run.files), 1), 3)
        figures['category'] = run.entry.category
        figures['retention'] = str(run.entry.period)
        figures['counted_from'] = run.entry.date_field or f'follows {run.entry.follows}'
        per_dataset[name] = figures
        totals = per_category.setdefault(run.entry.category, {})
        for k in ('rows', 'expired', 'anonymised', 'suppressed', 'already_anonymised'):
            totals[k] = totals.get(k, 0) + figures[k]
    summary = {'run_id': config.run_id, 'dry_run': config.dry_run, 'as_of': config.as_of.isoformat(),
               'datasets': per_dataset, 'categories': per_category, 'output': config.output}
    report = FileSystems.join(config.output, 'reports', f'{config.run_id}.json')
    _write_text(report, json.dumps(summary, indent=2, sort_keys=True) + '\n')
    summary['report'] = report
    counts = {f'{name}.{k}': v for name, f in per_dataset.items()
              for k, v in f.items() if k in ('rows', 'expired', 'anonymised', 'suppressed', 'files_rewritten')}
    refs = {'as_of': config.as_of.isoformat(), 'dry_run': config.dry_run, 'report': report,
            'datasets': {name: {'category': f['category'], 'files': f['files'], 'retention': f['retention']}
                         for name, f in per_dataset.items()}}
    return summary, lifecycle.Outcome(counts=counts, outputs={'report': report}, record_refs=refs)


def _write_text(path: str, text: str) -> None:
    directory = FileSystems.split(path)[0]
    if FileSystems.get_filesystem(directory).has_dirs() and not FileSystems.exists(directory):
        FileSystems.mkdirs(directory)
    temp = path + f'.{uuid.uuid4().hex}.tmp'
    with FileSystems.create(temp, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(text.encode('utf-8'))
    keyed_write.publish(temp, path)


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, anonymises (or counts, ``--preview``) under the run ledger, returns the summary."""
    values, beam_args = opts.parse(OPTIONS, list(sys.argv[1:] if argv is None else argv), prog=f'hrbatch run {NAME}')
    as_of = parse_day(values['as_of'], '--as_of').isoformat()
    if values['preview']:
        # A dry run changes nothing: it may run any number of times and never blocks the real run's key.
        values['run_key'] = values['run_key'] or f'{NAME}:preview:{as_of}'
        values['force'] = not values['resume']
    values['run_key'] = values['run_key'] or f'{NAME}:{as_of}'
    categories = sorted({entry.category for entry in retention.read_policy(values['policy']).entries})
    spec, summary = lifecycle.run_pipeline(
        NAME, values, beam_args, output=values['output'],
        make_config=lambda run_id: AnonymizeConfig.from_values(values, run_id=run_id), build=build,
        summarize=summarize, inputs=lambda config: [config.policy_path],
        data_categories=categories, private=('key_file', 'key_env'))
    if 'datasets' not in summary:
        return summary
    verb = 'would be' if summary['dry_run'] else 'were'
    print(f"GDPR retention at {summary['as_of']}, run {summary['run_id']}{' (dry run: nothing changed)' if summary['dry_run'] else ''}:")
    print(f"{'dataset':<15} {'category':<12} {'rows':>10} {'expired':>10} {'anonymised':>11} {'already':>10} "
          f"{'suppressed':>10} {'k':>4} {'reached':>7}")
    for name, f in summary['datasets'].items():
        print(f"{name:<15} {f['category']:<12} {f['rows']:>10,} {f['expired']:>10,} {f['anonymised']:>11,} "
              f"{f['already_anonymised']:>10,} {f['suppressed']:>10,} {f['k']:>4} {f['k_reached'] or '-':>7}")
    for category, t in summary['categories'].items():
        print(f"category {category}: {t['anonymised']:,} records {verb} anonymised, {t['suppressed']:,} suppressed")
    print(f"Report (counts only):  {summary['report']}")
    print(lifecycle.ledger_line(spec))
    return summary


if __name__ == '__main__':
    from pipelines.cli import main_for
    sys.exit(main_for(NAME))

"""Migration: rewrite a stored dataset from one declared version to another, step by declared step.

The steps, the versions and the rule that tells a dataset's version are in ``transforms.migrations``
(candidates v1 -> v2: full name split, phones to E.164, old skill codes to ESCO). At launch the
version of ``--input`` is read from its files' footers: data not at ``--from``, or no declared chain
of steps from ``--from`` to ``--to``, fails with a ConfigError naming the found and asked versions.

Guarantees: the input is never modified. The migrated dataset is written to ``OUTPUT/DATASET/``
(``candidate_id_bucket=NNNNN/part-00000.parquet``, ``--buckets`` hash buckets of the key), every file
stamped with the new version, each partition published by rename, so a rerun rewrites identical
bytes. Rows that cannot be migrated go to ``OUTPUT/dead_letters/`` with every reason; every other row
is migrated. ``OUTPUT/controls.json`` holds the control totals before and after (rows, rows per
file and per partition, non-null values per field, sums of the numeric fields) and the checks
(rows in = rows out + rows dead-lettered, the files hold the rows out, numeric sums unchanged); a
check that fails fails the run. Runs are recorded in the run ledger and the audit trail; a run that
died resumes with ``--resume``: each read task (a Parquet row group) commits its migrated rows under
``OUTPUT/.checkpoints/`` and is not redone, and the result is byte-identical to a clean run's.
``--plan`` reads the input in this process and prints the counts, the control totals and a sample of
before/after differences with personal data masked; it writes nothing (no file, no ledger entry).
Once the run succeeded, point readers at ``OUTPUT/DATASET/`` (the old version stays as it was).

    hrbatch run migration --dataset candidates --from 1 --to 2 --input data/candidates-v1 \\
        --output out/candidates-v2 --plan
    hrbatch run migration --dataset candidates --from 1 --to 2 --input data/candidates-v1 \\
        --output out/candidates-v2

On Dataflow::

    hrbatch run migration --dataset candidates --from 1 --to 2 --input gs://BUCKET/candidates \\
        --output gs://BUCKET/migrations/candidates-v2 --ledger postgresql://... --runner DataflowRunner \\
        --project PROJECT --region europe-west1 --temp_location gs://BUCKET/tmp
"""
import dataclasses
import json
import logging
import math
import os
import sys
import typing
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines import lifecycle
from pipelines import options as opts
from transforms import migrations
from transforms.checkpoints import CheckpointStore
from transforms.checkpoints import unit_id
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.dead_letters import DeadLetter
from transforms.dead_letters import WriteDeadLetters
from transforms.dead_letters import locator
from transforms.errors import ConfigError
from transforms.keyed_write import partition_file
from transforms.keyed_write import publish
from transforms.keyed_write import remove_temp_dir
from transforms.keyed_write import sort_partition
from transforms.keyed_write import split_by_partition
from transforms.keyed_write import write_parquet
from transforms.read import ReadTask
from transforms.read import parquet_tasks
from transforms.read import with_metadata
from transforms.schemas import ROW_COLUMN
from transforms.validation import cast_columns
from transforms.validation import validate_batch

NAME = 'migration'
_LOGGER = logging.getLogger(__name__)
_DEAD_LETTERS = 'dead_letters'
_CONTROLS = 'controls'
_CONTROLS_FILE = 'controls.json'
# Data errors of one row group; a network failure is re-raised so that the runner retries the bundle.
_READ_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError)
_TRANSIENT = (ConnectionError, TimeoutError)

OPTIONS = (
    opts.Option('dataset', 'The stored dataset to migrate.', required=True, choices=migrations.DATASETS),
    opts.Option('from', 'The version the data is at now (read from its files; unmarked files are version 1).',
                type='int', required=True, min_value=1),
    opts.Option('to', 'The version to migrate to, through the declared steps.', type='int', required=True,
                min_value=1),
    opts.Option('input', 'The stored dataset: a directory of Parquet files (part-*.parquet or */part-*.parquet, '
                'local or gs://) or a glob. Never modified.', required=True),
    opts.Option('output', 'Output directory: DATASET/ (the migrated dataset), dead_letters/ and controls.json.',
                required=True),
    opts.Option('buckets', 'Hash buckets of the key: the Parquet partitions of the migrated dataset.', type='int',
                default=16, min_value=1, max_value=100_000),
    opts.Option('batch_rows', 'Rows migrated at once.', type='int', default=8192, min_value=1),
    opts.Option('plan', 'Only print the counts, the control totals and a sample of before/after differences '
                '(personal data masked); change nothing.', type='bool', default=False),
    opts.Option('plan_sample', 'With --plan: how many migrated rows to show.', type='int', default=5,
                min_value=0, max_value=1000),
) + lifecycle.LIFECYCLE_OPTIONS


def _normalised(location: str) -> str:
    location = location.rstrip('/')
    return location if '://' in location else os.path.abspath(location)


@dataclasses.dataclass(frozen=True)
class MigrationConfig:
    dataset: str
    from_version: int
    to_version: int
    input: str
    output: str
    buckets: int
    batch_rows: int
    tasks: tuple            # ReadTasks: one per Parquet row group of the input
    input_files: tuple
    run_id: str

    @property
    def steps(self) -> list:
        return migrations.chain(self.dataset, self.from_version, self.to_version)

    @property
    def source(self):
        return migrations.SCHEMAS[(self.dataset, self.from_version)]

    @property
    def target(self):
        return migrations.SCHEMAS[(self.dataset, self.to_version)]

    @property
    def dataset_dir(self) -> str:
        return FileSystems.join(self.output, self.dataset)

    @property
    def dead_letters_prefix(self) -> str:
        return FileSystems.join(self.output, 'dead_letters', 'dead_letters')

    @property
    def controls_path(self) -> str:
        return FileSystems.join(self.output, _CONTROLS_FILE)

    @property
    def partition_by(self) -> str:
        return self.target.key[0]

    @classmethod
    def from_values(cls, values: dict, *, run_id: str) -> 'MigrationConfig':
        dataset, start, end = values['dataset'], values['from'], values['to']
        if end <= start:
            migrations.chain(dataset, start, end)  # names both flags
        version, files = migrations.dataset_version(values['input'], dataset)
        if version != start:
            done = ' nothing to migrate: it is already there' if version == end else ''
            raise ConfigError(f'--input={values["input"]!r} is at {dataset} version {version} (read from its files), '
                              f'not at --from={start};{done or f" pass --from={version} to migrate it from there"}')
        steps = migrations.chain(dataset, start, end)
        target_dir = _normalised(FileSystems.join(values['output'], dataset))
        source = _normalised(values['input'])
        if source == target_dir or source.startswith(target_dir + '/') or target_dir.startswith(source + '/'):
            raise ConfigError(f'--output={values["output"]!r}: the migrated dataset {target_dir} would overlap the '
                              f'input {source}; migrations never rewrite their input: choose another --output')
        _check_output(FileSystems.join(values['output'], dataset), dataset, end)
        tasks = tuple(task for path in files for task in parquet_tasks(path, steps[0].source, values['input']))
        return cls(dataset=dataset, from_version=start, to_version=end, input=values['input'],
                   output=values['output'], buckets=values['buckets'], batch_rows=values['batch_rows'],
                   tasks=tasks, input_files=tuple(files), run_id=run_id)


def _check_output(dataset_dir: str, dataset: str, version: int) -> None:
    """The output dataset may only hold files of this migration's target version (an earlier run)."""
    for path in migrations.dataset_files(dataset_dir):
        found = (migrations.read_footer_schema(path).metadata or {}).get(migrations.VERSION_METADATA_KEY)
        if found != str(version).encode():
            raise ConfigError(f'--output: {path} already holds data that is not {dataset} version {version} written '
                              'by a migration; choose an empty --output')


# ------------------------------------------------------------------------------------------------
# One read task: pure, no Beam


class TaskResult(typing.NamedTuple):
    rows: pa.Table                 # migrated rows: target schema plus _source/_row
    dead_letters: list[DeadLetter]
    counts: dict                   # JSON: row counts and control totals of the task
    before: pa.Table               # the rows as stored (for --plan)


def migrate_task(task: ReadTask, *, steps: list, batch_rows: int) -> TaskResult:
    """Reads one row group as stored, migrates it, and counts before and after."""
    source, target = steps[0].source, steps[-1].target
    read_step = f'Read{source.name.title().replace("_", "")}'
    empty_rows = target.arrow_schema(with_metadata=True).empty_table()
    with FileSystems.open(task.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle, \
            pq.ParquetFile(handle) as parquet_file:
        stored_rows = parquet_file.metadata.row_group(task.row_group).num_rows
        columns = [n for n in source.names if n in parquet_file.schema_arrow.names]
        try:
            raw = parquet_file.read_row_group(task.row_group, columns=columns, use_threads=False)
        except _READ_ERRORS as err:
            if isinstance(err, _TRANSIENT):
                raise
            letter = DeadLetter(step=read_step, payload='', source=locator(task.path, task.first_row),
                                error=f'Parquet row group {task.row_group} ({stored_rows} rows) could not be read: {err}')
            unread = {'rows': stored_rows, 'non_null': {}, 'sums': {}}
            counts = _counts(task, unread, migrations.controls(empty_rows, target), unread, 0, stored_rows)
            return TaskResult(empty_rows, [letter], counts, empty_rows)
    letters, parts, first = [], [], task.first_row
    for batch in raw.to_batches(max_chunksize=batch_rows):
        batch = with_metadata(batch, source, task.path, np.arange(first, first + batch.num_rows))
        first += batch.num_rows
        cast, more = cast_columns(batch, source, step=read_step)
        letters += more
        valid, more = validate_batch(cast, source, step=read_step)
        letters += more
        migrated, more = migrations.migrate_batch(valid, steps)
        letters += more
        parts.append(migrated)
    rows = pa.Table.from_batches(parts, schema=parts[0].schema) if parts else empty_rows
    rows = rows.combine_chunks()
    kept = np.isin(np.arange(task.first_row, task.first_row + raw.num_rows),
                   rows.column(ROW_COLUMN).to_numpy(zero_copy_only=False))
    before = migrations.controls(raw, source)
    dead = migrations.controls(raw.filter(pa.array(~kept)), source)
    return TaskResult(rows, letters, _counts(task, before, migrations.controls(rows, target), dead, len(letters), 0),
                      raw.append_column(ROW_COLUMN, pa.array(np.arange(task.first_row, first), pa.int64())))


def _counts(task: ReadTask, before: dict, after: dict, dead: dict, row_letters: int, unreadable: int) -> dict:
    """``row_letters``: dead letters of one row each; ``unreadable``: rows of a row group that could not be
    read at all (one dead letter for the group)."""
    return {'file': task.path, 'rows_read': before['rows'], 'rows_migrated': after['rows'],
            'rows_dead_lettered': dead['rows'], 'row_dead_letters': row_letters, 'rows_unreadable': unreadable,
            'before': before, 'after': after, 'dead_lettered': dead}


def total_controls(config: MigrationConfig, unit_counts: list[dict], partitions: dict[str, int] | None) -> dict:
    """The controls file: totals of every task (in task order), the partitions' rows, the checks."""
    before, after, dead, per_file, letters, unreadable = {}, {}, {}, {}, 0, 0
    for counts in unit_counts:
        before = migrations.add_controls(before, counts['before'])
        after = migrations.add_controls(after, counts['after'])
        dead = migrations.add_controls(dead, counts['dead_lettered'])
        name = _relative(counts['file'], config.input)
        per_file[name] = per_file.get(name, 0) + counts['rows_read']
        letters += counts['row_dead_letters']
        unreadable += counts['rows_unreadable']
    empty = {'rows': 0, 'non_null': {}, 'sums': {}}
    before, after, dead = before or empty, after or empty, dead or empty
    # Every row read is migrated or has its own dead letter (a row group that cannot be read at all has
    # one dead letter for its rows, counted as unreadable).
    checks = {'rows_in_equal_rows_out_plus_dead_letters': before['rows'] == after['rows'] + letters + unreadable,
              'rows_dead_lettered_have_a_dead_letter': dead['rows'] == letters + unreadable}
    for name, total in before['sums'].items():
        if name in after['sums']:  # a field kept by the migration: its sum moves only by the rows set aside
            expected = math.fsum([after['sums'][name], dead['sums'].get(name, 0.0)])
            checks[f'sum_{name}_in_equals_out_plus_dead_lettered'] = math.isclose(
                total, expected, rel_tol=1e-9, abs_tol=1e-6)
    if partitions is not None:
        checks['files_hold_rows_out'] = sum(partitions.values()) == after['rows']
    return {
        'dataset': config.dataset, 'from_version': config.from_version, 'to_version': config.to_version,
        'steps': [str(step) for step in config.steps],
        'before': {**before, 'rows_per_file': dict(sorted(per_file.items()))},
        'after': {**after, **({'rows_per_partition': dict(sorted(partitions.items()))} if partitions is not None else {})},
        'dead_lettered': {**dead, 'dead_letters': letters, 'rows_unreadable': unreadable},
        'checks': checks,
        'balanced': all(checks.values()),
    }


def _relative(path: str, base: str) -> str:
    base = base.rstrip('/') + '/'
    return path[len(base):] if path.startswith(base) else path


# ------------------------------------------------------------------------------------------------
# The Beam graph


class _MigrateTaskFn(beam.DoFn):
    """Migrates one read task and commits its rows, dead letters and counts: the unit of resumption."""

    def __init__(self, config: MigrationConfig, store_root: str):
        self._config = config
        self._store_root = store_root

    def setup(self):
        self._store = CheckpointStore(self._store_root)

    def process(self, task: ReadTask):
        result = migrate_task(task, steps=self._config.steps, batch_rows=self._config.batch_rows)
        self._store.commit(unit_id(*task), result.rows, result.dead_letters, result.counts)
        yield unit_id(*task)


class _LoadUnitFn(beam.DoFn):
    """Emits one committed unit: its rows split by partition, its dead letters, its counts."""

    def __init__(self, config: MigrationConfig, store_root: str):
        self._config = config
        self._store_root = store_root

    def setup(self):
        self._store = CheckpointStore(self._store_root)

    def process(self, unit: str):
        committed = self._store.load(unit)
        counts = committed.counts
        for name in ('rows_read', 'rows_migrated', 'rows_dead_lettered'):
            Metrics.counter(METRICS_NAMESPACE, f'migration_{name}').inc(counts[name])
        for letter in committed.dead_letters:
            yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, letter)
        yield beam.pvalue.TaggedOutput(_CONTROLS, (unit, counts))
        for batch in committed.rows.to_batches():
            yield from split_by_partition(batch, self._config.partition_by, self._config.buckets)


class _WriteVersionedPartitionFn(beam.DoFn):
    """Writes one partition as its single file, sorted by key and stamped with the dataset version."""

    def __init__(self, config: MigrationConfig, temp_dir: str):
        self._config = config
        self._temp_dir = temp_dir

    def process(self, element):
        directory, batches = element
        config = self._config
        table = migrations.stamp(sort_partition(list(batches), config.target, label=directory),
                                 config.dataset, config.to_version)
        temp_path = FileSystems.join(self._temp_dir, f'{uuid.uuid4().hex}.parquet.tmp')
        write_parquet(table, temp_path)
        publish(temp_path, partition_file(config.dataset_dir, directory))
        Metrics.counter(METRICS_NAMESPACE, 'migration_partitions').inc()
        yield directory


class _WriteControlsFn(beam.DoFn):
    """Once every partition is published: removes the temporary directory, reads the row counts back
    from the files' footers, writes the controls file, and fails the run if a check fails."""

    def __init__(self, config: MigrationConfig, temp_dir: str, units: list[str]):
        self._config = config
        self._temp_dir = temp_dir
        self._units = units

    def process(self, _, written, unit_counts):
        config = self._config
        remove_temp_dir(self._temp_dir)
        partitions = {}
        for directory in written:
            path = partition_file(config.dataset_dir, directory)
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle, \
                    pq.ParquetFile(handle) as parquet_file:
                partitions[directory] = parquet_file.metadata.num_rows
        by_unit = dict(unit_counts)
        totals = total_controls(config, [by_unit[unit] for unit in self._units], partitions)
        with FileSystems.create(config.controls_path, mime_type='application/json',
                                compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write((json.dumps(totals, indent=2, sort_keys=True) + '\n').encode())
        if not totals['balanced']:
            failed = [name for name, ok in totals['checks'].items() if not ok]
            raise RuntimeError(f'migration control totals do not balance ({failed}); see {config.controls_path}')
        yield config.controls_path


class Outputs(typing.NamedTuple):
    rows: beam.PCollection           # (partition directory, RecordBatch) of migrated rows
    dead_letters: beam.PCollection
    controls: beam.PCollection       # the controls file's path, once written
    tasks: int
    tasks_resumed: int


def build(pipeline: beam.Pipeline, config: MigrationConfig, store: CheckpointStore) -> Outputs:
    """Adds the migration graph to ``pipeline``; read tasks committed in ``store`` are not redone."""
    units = [unit_id(*task) for task in config.tasks]
    done = store.committed()
    todo = [task for task, unit in zip(config.tasks, units) if unit not in done]
    _LOGGER.info('migration: %d of %d read tasks already committed', len(units) - len(todo), len(units))
    committed_now = (
        pipeline
        | 'ListReadTasks' >> beam.Create(todo).with_output_types(ReadTask)
        | 'MigrateTasks' >> beam.ParDo(_MigrateTaskFn(config, store.root)).with_output_types(str))
    loaded = (
        pipeline
        | 'AfterAllTasks' >> beam.Impulse()
        | 'ListUnits' >> beam.FlatMap(lambda _, now: units, beam.pvalue.AsList(committed_now)).with_output_types(str)
        | 'SpreadUnits' >> beam.Reshuffle()
        | 'LoadCommitted' >> beam.ParDo(_LoadUnitFn(config, store.root))
        .with_output_types(typing.Tuple[str, pa.RecordBatch]).with_outputs(_DEAD_LETTERS, _CONTROLS, main='rows'))
    temp_dir = FileSystems.join(config.dataset_dir, f'.tmp-{uuid.uuid4().hex}')
    written = (
        loaded.rows
        | 'GroupByPartition' >> beam.GroupByKey()
        | 'WritePartitions' >> beam.ParDo(_WriteVersionedPartitionFn(config, temp_dir)).with_output_types(str))
    controls = (
        pipeline
        | 'Once' >> beam.Create([None])
        | 'WriteControls' >> beam.ParDo(_WriteControlsFn(config, temp_dir, units), beam.pvalue.AsList(written),
                                         beam.pvalue.AsList(loaded[_CONTROLS])))
    loaded[_DEAD_LETTERS] | 'WriteDeadLetters' >> WriteDeadLetters(output_prefix=config.dead_letters_prefix,
                                                                   run_id=config.run_id)
    return Outputs(rows=loaded.rows, dead_letters=loaded[_DEAD_LETTERS], controls=controls, tasks=len(units),
                   tasks_resumed=len(units) - len(todo))


def read_controls(path: str) -> dict:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return json.loads(handle.read())


def summarize(result, config: MigrationConfig, outputs: Outputs) -> tuple[dict, lifecycle.Outcome]:
    controls = read_controls(config.controls_path)
    summary = {
        'run_id': config.run_id, 'dataset': config.dataset, 'from_version': config.from_version,
        'to_version': config.to_version, 'rows_read': controls['before']['rows'],
        'rows_migrated': controls['after']['rows'], 'rows_dead_lettered': controls['dead_lettered']['rows'],
        'dead_letters': lifecycle.counter(result, 'dead_letters'),
        'partitions': len(controls['after']['rows_per_partition']), 'tasks': outputs.tasks,
        'tasks_resumed': outputs.tasks_resumed, 'balanced': controls['balanced'], 'controls': controls,
        'dataset_dir': config.dataset_dir, 'controls_path': config.controls_path,
        'dead_letters_prefix': config.dead_letters_prefix,
    }
    counts = {k: summary[k] for k in ('rows_read', 'rows_migrated', 'rows_dead_lettered', 'dead_letters',
                                      'partitions', 'tasks', 'tasks_resumed')}
    return summary, lifecycle.Outcome(
        counts=counts,
        outputs={'dataset': config.dataset_dir, 'controls': config.controls_path,
                 'dead_letters': config.dead_letters_prefix},
        record_refs={'dataset': config.dataset, 'from_version': config.from_version,
                     'to_version': config.to_version, 'rows_migrated': summary['rows_migrated']})


def print_controls(controls: dict, out=None) -> None:
    out = out or sys.stdout
    before, after, dead = controls['before'], controls['after'], controls['dead_lettered']
    print(f"  rows                 {before['rows']:>12,} before  {after['rows']:>12,} after  "
          f"{dead['rows']:>10,} dead-lettered", file=out)
    for name in sorted(set(before['non_null']) | set(after['non_null'])):
        print(f"  non-null {name:<22}{_figure(before['non_null'].get(name)):>12} "
              f"{_figure(after['non_null'].get(name)):>12}", file=out)
    for name in sorted(before['sums']):
        print(f"  sum of {name:<24}{before['sums'][name]:>16,.4f} {after['sums'].get(name, float('nan')):>16,.4f}",
              file=out)
    for name, ok in controls['checks'].items():
        print(f"  check {name}: {'ok' if ok else 'FAILED'}", file=out)


def _figure(value) -> str:
    return '-' if value is None else f'{value:,}'


# ------------------------------------------------------------------------------------------------
# --plan


def _differences(before: dict, after: dict) -> list[str]:
    """The changed fields of one row, masked: names as initials, phone and email masked."""
    lines = []
    if 'full_name' in before:
        lines.append(f"full_name {migrations.mask_name(before['full_name'])!s} -> first_name "
                     f"{migrations.mask_name(after['first_name'])}, last_name {migrations.mask_name(after['last_name'])}")
    if before.get('phone') != after.get('phone'):
        lines.append(f"phone {migrations.mask_phone(before.get('phone')) or 'null'} -> "
                     f"{migrations.mask_phone(after.get('phone')) or 'null'}")
    if 'skill_codes' in before:
        lines.append(f"skill_codes {before['skill_codes']} -> skills {after['skills']}")
    return lines


def _reason_fields(error: str) -> list[str]:
    """The fields a dead letter's reasons name ('phone: ...; full_name=null: ...' -> phone, full_name)."""
    return sorted({piece.strip().split(':')[0].split('=')[0].split(' ')[0] for piece in error.split('; ') if piece})


def plan(config: MigrationConfig, sample: int, out=None) -> dict:
    """Migrates every task in this process without writing anything; prints and returns the counts."""
    out = out or sys.stdout
    unit_counts, samples, reasons = [], [], {}
    for task in config.tasks:
        result = migrate_task(task, steps=config.steps, batch_rows=config.batch_rows)
        unit_counts.append(result.counts)
        for letter in result.dead_letters:
            for field in _reason_fields(letter.error):
                reasons[(letter.step, field)] = reasons.get((letter.step, field), 0) + 1
        if len(samples) < sample and result.rows.num_rows:
            before_rows = {row[ROW_COLUMN]: row for row in result.before.to_pylist()}
            for row in result.rows.slice(0, sample - len(samples)).to_pylist():
                samples.append((row, before_rows[row[ROW_COLUMN]]))
    controls = total_controls(config, unit_counts, None)
    print(f"Plan: {config.dataset} version {config.from_version} -> {config.to_version} "
          f"({', '.join(str(s) for s in config.steps)}), nothing written.", file=out)
    print(f"  {controls['before']['rows']:,} rows in {len(config.input_files)} files: "
          f"{controls['after']['rows']:,} would be migrated, {controls['dead_lettered']['rows']:,} dead-lettered.",
          file=out)
    for (step, field), count in sorted(reasons.items()):
        print(f"  dead letters of {step} naming {field}: {count:,}", file=out)
    print('Control totals (before, after):', file=out)
    print_controls(controls, out)
    if samples:
        print(f'Sample of {len(samples)} migrated rows (personal data masked):', file=out)
    key = config.target.key[0]
    for after, before in samples:
        print(f"  {key} {after[key]}:", file=out)
        for line in _differences(before, after):
            print(f"    {line}", file=out)
    return {'plan': True, 'rows_read': controls['before']['rows'], 'rows_migrated': controls['after']['rows'],
            'rows_dead_lettered': controls['dead_lettered']['rows'], 'controls': controls,
            'dead_letter_fields': {f'{s}:{f}': n for (s, f), n in sorted(reasons.items())}}


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv``; with ``--plan`` prints the plan; otherwise migrates under the run ledger."""
    values, beam_args = opts.parse(OPTIONS, list(sys.argv[1:] if argv is None else argv), prog=f'hrbatch run {NAME}')
    if values['plan']:
        return plan(MigrationConfig.from_values(values, run_id='plan'), values['plan_sample'])
    values['run_key'] = values['run_key'] or (
        f"{NAME}:{values['dataset']}:{values['from']}-{values['to']}:{_normalised(values['input'])}")
    spec, summary = lifecycle.run_pipeline(
        NAME, values, beam_args, output=values['output'],
        make_config=lambda run_id: MigrationConfig.from_values(values, run_id=run_id), build=build,
        summarize=summarize, inputs=lambda config: list(config.input_files),
        data_categories=[values['dataset'], 'contact data', 'skills'])
    if 'rows_migrated' not in summary:
        return summary
    print(f"Migration {summary['dataset']} v{summary['from_version']} -> v{summary['to_version']}, run "
          f"{summary['run_id']}: {summary['rows_migrated']:,} of {summary['rows_read']:,} rows migrated, "
          f"{summary['rows_dead_lettered']:,} dead-lettered, {summary['partitions']} partitions.")
    if summary['tasks_resumed']:
        print(f"  resumed: {summary['tasks_resumed']} of {summary['tasks']} read tasks were committed by the run "
              "that died and were not redone")
    print_controls(summary['controls'])
    print(f"Migrated dataset:      {summary['dataset_dir']}/")
    print(f"Control totals:        {summary['controls_path']}")
    print(f"Dead letters (JSONL):  {summary['dead_letters_prefix']}-*.jsonl")
    print(lifecycle.ledger_line(spec))
    return summary


if __name__ == '__main__':
    from pipelines.cli import main_for
    sys.exit(main_for(NAME))

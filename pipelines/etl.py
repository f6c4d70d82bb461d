"""ETL: loads HR system exports into one canonical dataset (candidates, offers, employees, contracts
or variable elements), as Parquet and in the SQL database.

The exports are what French HR and payroll systems write: CSV with ';' separators, decimal commas,
DD/MM/YYYY dates, Latin-1 or UTF-8 (with or without a byte-order mark), quoted values holding line
breaks; or JSON lines, or Avro. A mapping file (``transforms.etl_mapping``) says how the source
columns become the canonical fields: types come from the canonical schema, the mapping adds the
source's formats, code tables, defaults and normalisation (names, emails, E.164 phones, postcodes).

At launch, before any data is read: the mapping is checked, every input file must exist, be in the
declared encoding (a UTF-8 file declared Latin-1, or the reverse, is refused with the offending
byte) and have every mapped column (a mapping naming a missing column is refused, naming it).

Then each row is converted on whole columns, validated against the canonical schema (identifiers
with python-stdnum, enumerations, ranges, dates), and de-duplicated by the dataset's key. The
stated rule: **the row updated last wins** (``updated_at`` in the mapping; a row without one is
older than any row with one); on a tie, or without ``updated_at``, the row read last wins (files in
path order, then rows in file order). Bad rows go to dead letters with every reason, good rows are
all kept. The run ends with a reconciliation per file, written to ``OUTPUT/reconciliation/`` and
printed: rows read = rows written + rows dead-lettered + duplicates merged; a file that does not
balance fails the run.

Output: ``OUTPUT/<dataset>/`` Parquet partitioned by hash bucket of the key's first field (the
layout every pipeline here reads), the SQL table ``<dataset>`` upserted by key, dead letters in
``OUTPUT/dead_letters/``. Rerunning the same exports rewrites the same rows, never duplicates.

    hrbatch run etl --mapping mappings/employees.yaml --input 'exports/salaries_*.csv' --output out/etl
"""
import codecs
import csv
import dataclasses
import io
import json
import logging
import sys

import apache_beam as beam
import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines import lifecycle
from pipelines import options as opts
from transforms import etl_mapping
from transforms import schemas
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.dead_letters import DeadLetter
from transforms.dead_letters import WriteDeadLetters
from transforms.dead_letters import locator
from transforms.errors import ConfigError
from transforms.keyed_write import WriteKeyed
from transforms.keyed_write import WritePartitions
from transforms.keyed_write import bucket_dir
from transforms.keyed_write import is_last_of_key
from transforms.routing import RemoveWhenDone
from transforms.read import for_pyarrow
from transforms.routing import SplitByKeyBucket
from transforms.routing import load_pieces
from transforms.validation import validate_batch

NAME = 'etl'
_LOGGER = logging.getLogger(__name__)
_DEAD_LETTERS = 'dead_letters'
_COUNTS = 'counts'
_DB = 'database'
_STEP_READ, _STEP_CONVERT = 'ReadExport', 'ConvertExport'
_SNIFF_BYTES = 1 << 16
_FORMATS = {'.csv': 'csv', '.txt': 'csv', '.tsv': 'csv', '.jsonl': 'jsonl', '.json': 'jsonl', '.ndjson': 'jsonl',
            '.avro': 'avro'}
# The reconciliation's columns, per file: read = written + dead_lettered + merged.
COUNT_KINDS = ('read', 'written', 'dead_lettered', 'merged')

OPTIONS = (
    opts.Option('mapping', 'The mapping file (YAML or JSON, local or gs://): see transforms/etl_mapping.py.',
                required=True),
    opts.Option('input', 'The export files: a path or glob (local or gs://); CSV, JSON lines or Avro by extension.',
                required=True),
    opts.Option('output', 'Output directory (local or gs://): <dataset>/, reconciliation/, dead_letters/.',
                required=True),
    opts.Option('database', 'Where rows are upserted: sqlite:///PATH, postgresql://..., or "none". '
                'Default: sqlite:///OUTPUT/hrbatch.db for a local output, none for gs://.'),
    opts.Option('buckets', 'Hash buckets of the key: the unit of de-duplication and the Parquet partitions.',
                type='int', default=16, min_value=1, max_value=100_000),
    opts.Option('batch_rows', 'Rows per batch read from an export.', type='int', default=131_072, min_value=1,
                max_value=10_000_000),
) + lifecycle.LIFECYCLE_OPTIONS


@dataclasses.dataclass(frozen=True)
class EtlConfig:
    mapping: etl_mapping.Mapping
    files: tuple[tuple[str, str], ...]    # (path, format), sorted by path
    output: str
    database: str | None
    buckets: int
    batch_rows: int
    run_id: str

    def path(self, name: str) -> str:
        return FileSystems.join(self.output, name)

    @classmethod
    def from_values(cls, values: dict, *, run_id: str) -> 'EtlConfig':
        mapping = etl_mapping.from_file(values['mapping'])
        files = tuple(check_export(path, mapping) for path in matched_files(values['input']))
        return cls(mapping=mapping, files=files, output=values['output'],
                   database=lifecycle.database_target(values['database'], values['output']),
                   buckets=values['buckets'], batch_rows=values['batch_rows'], run_id=run_id)


def matched_files(pattern: str) -> list[str]:
    try:
        found = FileSystems.match([pattern])[0].metadata_list
    except Exception as err:  # Beam raises BeamIOError, or the filesystem's own error
        raise ConfigError(f'--input {pattern!r} cannot be listed ({err})') from err
    if not found:
        raise ConfigError(f'--input {pattern!r} matches no file')
    return sorted(m.path for m in found)


def file_format(path: str) -> str:
    name = path.lower()
    for suffix in ('.gz', '.bz2', '.zst', '.deflate'):
        name = name.removesuffix(suffix)
    for extension, kind in _FORMATS.items():
        if name.endswith(extension):
            return kind
    raise ConfigError(f'{path}: unknown export format; expected one of {sorted(_FORMATS)} (optionally compressed)')


def _head(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read(_SNIFF_BYTES)


def check_encoding(path: str, head: bytes, encoding: str) -> str:
    """The head of ``path`` decoded; ConfigError if it is not in the declared ``encoding``."""
    if encoding == 'utf-8':
        try:
            return codecs.decode(head, 'utf-8-sig')
        except UnicodeDecodeError as err:
            if err.start < len(head) - 3 or len(head) < _SNIFF_BYTES:  # not a character cut by the sniff
                raise ConfigError(
                    f'{path} is not UTF-8: byte 0x{head[err.start]:02x} at offset {err.start} is not valid UTF-8. '
                    'If the export is Latin-1 (ISO-8859-1) or Windows-1252, say so in the mapping: '
                    'source: {encoding: latin-1}') from err
            return codecs.decode(head[:err.start], 'utf-8-sig')
    if head.startswith(codecs.BOM_UTF8):
        raise ConfigError(f'{path} starts with a UTF-8 byte-order mark but the mapping declares {encoding}: '
                          'declare source: {encoding: utf-8}')
    try:
        as_utf8 = head.decode('utf-8')
    except UnicodeDecodeError:
        return head.decode(encoding)
    if any(ord(c) > 127 for c in as_utf8):
        raise ConfigError(f'{path} is declared {encoding} but reads as UTF-8 (its accented letters would come out '
                          "as 'Ã©'): declare source: {encoding: utf-8}")
    return as_utf8


def check_export(path: str, mapping: etl_mapping.Mapping) -> tuple[str, str]:
    """(path, format) of an export that can be read with ``mapping``; ConfigError otherwise."""
    kind = file_format(path)
    head = _head(path)
    if not head:
        raise ConfigError(f'{path} is empty')
    if kind == 'csv':
        text = check_encoding(path, head, mapping.encoding)
        header = next(csv.reader(io.StringIO(text), delimiter=mapping.delimiter), [])
        columns = [c.strip() for c in header]
    elif kind == 'jsonl':
        text = check_encoding(path, head, 'utf-8')
        try:
            first = json.loads(text.split('\n', 1)[0])
        except ValueError as err:
            raise ConfigError(f'{path}: its first line is not a JSON object ({err})') from err
        columns = list(first) if isinstance(first, dict) else []
    else:
        with FileSystems.open(path) as handle:
            try:
                columns = [f['name'] for f in fastavro.reader(handle).writer_schema['fields']]
            except (ValueError, KeyError, TypeError) as err:
                raise ConfigError(f'{path} is not a readable Avro file ({err})') from err
    expected = mapping.source_columns
    if kind == 'jsonl':  # JSON writers leave out null values: only columns without a default must be there
        expected = [f.column for f in mapping.fields if f.column is not None and f.default is None]
    missing = [c for c in expected if c not in columns]
    if missing:
        raise ConfigError(f'{path}: the mapping {mapping.path} names columns {missing} that the export does not '
                          f'have; its columns are {columns}' + (
                              f' (read with delimiter {mapping.delimiter!r}: is that the right one?)'
                              if kind == 'csv' and len(columns) == 1 else ''))
    return path, kind


# ---------------------------------------------------------------------------------------------
# Reading exports as batches of text
# ---------------------------------------------------------------------------------------------

def _as_text(table: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    """The ``columns`` of ``table`` as strings (JSON and Avro values: numbers with '.', ISO dates)."""
    arrays = []
    for name in columns:
        column = table.column(name)
        arrays.append(column if pa.types.is_string(column.type) else column.cast(pa.string()))
    return pa.table(arrays, names=list(columns))


def read_export(path: str, kind: str, mapping: etl_mapping.Mapping, batch_rows: int):
    """Yields batches of the mapped source columns as text, with ``_source`` and ``_row`` (the
    record's number in the file), and dead letters for records that cannot be parsed."""
    columns = mapping.source_columns
    rows = 0

    def numbered(table: pa.Table):
        nonlocal rows
        table = table.select(list(columns))
        for batch in table.to_batches(max_chunksize=batch_rows):
            if batch.num_rows:
                yield batch.append_column(schemas.SOURCE_COLUMN, pa.repeat(pa.scalar(path), batch.num_rows)) \
                    .append_column(schemas.ROW_COLUMN, pa.array(np.arange(rows, rows + batch.num_rows)))
                rows += batch.num_rows

    if kind == 'csv':
        skipped = []

        def on_invalid_row(row):
            skipped.append(row)
            return 'skip'

        with FileSystems.open(path) as handle:
            reader = pa_csv.open_csv(
                for_pyarrow(handle),
                read_options=pa_csv.ReadOptions(encoding=mapping.encoding, block_size=1 << 23),
                parse_options=pa_csv.ParseOptions(delimiter=mapping.delimiter, newlines_in_values=True,
                                                  invalid_row_handler=on_invalid_row),
                convert_options=pa_csv.ConvertOptions(
                    include_columns=list(columns), column_types={c: pa.string() for c in columns},
                    strings_can_be_null=True, quoted_strings_can_be_null=True, null_values=['']))
            for block in reader:
                for row in skipped:
                    yield DeadLetter(step=_STEP_READ, payload=row.text, source=path,
                                     error=f'CSV record has {row.actual_columns} fields, the header has '
                                           f'{row.expected_columns}')
                skipped.clear()
                yield from numbered(pa.Table.from_batches([block]))
        for row in skipped:
            yield DeadLetter(step=_STEP_READ, payload=row.text, source=path,
                             error=f'CSV record has {row.actual_columns} fields, the header has {row.expected_columns}')
    elif kind == 'jsonl':
        yield from _read_json_lines(path, columns, numbered, batch_rows)
    else:
        with FileSystems.open(path) as handle:
            records = []
            for record in fastavro.reader(handle):
                records.append({c: record.get(c) for c in columns})
                if len(records) == batch_rows:
                    yield from numbered(_as_text(pa.Table.from_pylist(records), columns))
                    records = []
            if records:
                yield from numbered(_as_text(pa.Table.from_pylist(records), columns))


def _read_json_lines(path, columns, numbered, batch_rows):
    records, line_number = [], 0
    with FileSystems.open(path) as handle:
        for raw in handle:
            line_number += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError('not a JSON object')
            except ValueError as err:
                yield DeadLetter(step=_STEP_READ, payload=raw.decode('utf-8', 'replace').rstrip('\n'),
                                 source=f'{path}#line={line_number}', error=f'not a JSON object ({err})')
                continue
            records.append({c: None if record.get(c) is None else str(record[c]) for c in columns})
            if len(records) == batch_rows:
                yield from numbered(pa.Table.from_pylist(records, schema=pa.schema([(c, pa.string()) for c in columns])))
                records = []
    if records:
        yield from numbered(pa.Table.from_pylist(records, schema=pa.schema([(c, pa.string()) for c in columns])))


class _ReadExportFn(beam.DoFn):

    def __init__(self, mapping: etl_mapping.Mapping, batch_rows: int):
        self._mapping, self._batch_rows = mapping, batch_rows
        self._read = Metrics.counter(METRICS_NAMESPACE, 'export_rows_read')

    def process(self, element):
        path, kind = element
        read = 0
        for item in read_export(path, kind, self._mapping, self._batch_rows):
            if isinstance(item, DeadLetter):
                read += 1
                yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, item)
                yield beam.pvalue.TaggedOutput(_COUNTS, ((path, 'dead_lettered'), 1))
            else:
                read += item.num_rows
                yield item
        self._read.inc(read)
        yield beam.pvalue.TaggedOutput(_COUNTS, ((path, 'read'), read))


# ---------------------------------------------------------------------------------------------
# Converting, validating, de-duplicating
# ---------------------------------------------------------------------------------------------

def _source_rows(batch: pa.RecordBatch, rows: list[int]) -> list[str]:
    """The source records of ``rows`` as JSON (dead-letter payloads: data, never logged)."""
    picked = batch.take(pa.array(rows, pa.int64())).drop_columns([schemas.SOURCE_COLUMN, schemas.ROW_COLUMN])
    return [json.dumps(record, ensure_ascii=False, sort_keys=True) for record in picked.to_pylist()]


class _ConvertFn(beam.DoFn):
    """Source text -> canonical typed rows; every bad row is a dead letter with all its reasons."""

    def __init__(self, mapping: etl_mapping.Mapping):
        self._mapping = mapping
        self._rejected = Metrics.counter(METRICS_NAMESPACE, 'export_rows_rejected')

    def process(self, batch: pa.RecordBatch):
        converted, reasons = etl_mapping.convert(batch, self._mapping)
        letters = []
        if reasons:
            bad = sorted(reasons)
            for row, payload in zip(bad, _source_rows(batch, bad)):
                letters.append(DeadLetter(
                    step=_STEP_CONVERT, payload=payload, error='; '.join(reasons[row]),
                    source=locator(batch.column(schemas.SOURCE_COLUMN)[row].as_py(),
                                   batch.column(schemas.ROW_COLUMN)[row].as_py())))
            keep = np.ones(batch.num_rows, dtype=bool)
            keep[bad] = False
            converted = converted.filter(pa.array(keep))
        stamps = converted.column(etl_mapping.UPDATED_AT) if self._mapping.updated_at else None
        valid, invalid = validate_batch(converted, self._mapping.schema, step=_STEP_CONVERT)
        letters += invalid
        if stamps is not None:  # validation keeps the declared columns: carry the update time across
            index = pc.index_in(valid.column(schemas.ROW_COLUMN), value_set=converted.column(schemas.ROW_COLUMN))
            valid = valid.append_column(etl_mapping.UPDATED_AT, stamps.take(index))
        self._rejected.inc(len(letters))
        for letter in letters:
            yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, letter)
        if letters:  # a batch holds the rows of one file
            path = batch.column(schemas.SOURCE_COLUMN)[0].as_py()
            yield beam.pvalue.TaggedOutput(_COUNTS, ((path, 'dead_lettered'), len(letters)))
        if valid.num_rows:
            yield valid


def latest_per_key(rows: pa.Table, key: tuple[str, ...]) -> tuple[pa.Table, pa.Table]:
    """(the row of each key that wins, the rows merged into it): the latest ``_updated_at`` wins
    (null is oldest), then the row read last (``_source``, then ``_row``)."""
    order_by = [(k, 'ascending') for k in key]
    if etl_mapping.UPDATED_AT in rows.column_names:
        order_by.append((etl_mapping.UPDATED_AT, 'ascending', 'at_start'))
    order_by += [(schemas.SOURCE_COLUMN, 'ascending'), (schemas.ROW_COLUMN, 'ascending')]
    keyed = rows.take(pc.sort_indices(rows, sort_keys=order_by))
    last = is_last_of_key(keyed, key)
    return keyed.filter(pa.array(last)), keyed.filter(pa.array(~last))


class _DeduplicateBucketFn(beam.DoFn):
    """One bucket's rows -> its Parquet partition (the winners), database batches, counts."""

    def __init__(self, schema: schemas.RecordSchema, key_column: str):
        self._schema, self._key_column = schema, key_column
        self._merged = Metrics.counter(METRICS_NAMESPACE, 'duplicates_merged')
        self._written = Metrics.counter(METRICS_NAMESPACE, 'rows_loaded')

    def process(self, element):
        bucket, pieces = element
        rows = pa.Table.from_batches(load_pieces(pieces)).combine_chunks()
        winners, merged = latest_per_key(rows, self._schema.key)
        for kind, table in (('written', winners), ('merged', merged)):
            if table.num_rows:
                per_file = table.group_by(schemas.SOURCE_COLUMN).aggregate([(schemas.ROW_COLUMN, 'count')])
                for row in per_file.to_pylist():
                    yield beam.pvalue.TaggedOutput(_COUNTS, ((row[schemas.SOURCE_COLUMN], kind),
                                                             row[f'{schemas.ROW_COLUMN}_count']))
        self._merged.inc(merged.num_rows)
        self._written.inc(winners.num_rows)
        canonical = winners.select(list(self._schema.names))
        yield bucket_dir(self._key_column, bucket), canonical
        for batch in canonical.to_batches():
            yield beam.pvalue.TaggedOutput(_DB, batch)


def reconcile(counts: list, output: str) -> list[dict]:
    """The per-file reconciliation rows; ValueError if a file does not balance."""
    per_file = {}
    for (path, kind), count in counts:
        per_file.setdefault(path, dict.fromkeys(COUNT_KINDS, 0))[kind] += count
    rows = [{'file': path, **values} for path, values in sorted(per_file.items())]
    directory = FileSystems.join(output, 'reconciliation')
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=['file', *COUNT_KINDS], lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    for name, content in (('reconciliation.csv', text.getvalue()),
                          ('reconciliation.json', json.dumps(rows, indent=2) + '\n')):
        with FileSystems.create(FileSystems.join(directory, name)) as handle:
            handle.write(content.encode('utf-8'))
    unbalanced = [r['file'] for r in rows if r['read'] != r['written'] + r['dead_lettered'] + r['merged']]
    if unbalanced:
        raise ValueError(f'reconciliation failed for {unbalanced}: rows read != written + dead-lettered + merged; '
                         f'see {FileSystems.join(output, "reconciliation")}')
    return rows


def build(pipeline: beam.Pipeline, config: EtlConfig, store=None) -> dict:
    """Adds the ETL graph to ``pipeline``; returns its PCollections by name."""
    del store  # the exports are reloaded whole; the keyed writes make a rerun idempotent
    mapping, schema = config.mapping, config.mapping.schema
    key_column = schema.key[0]
    spill = lifecycle.spill_dir(config.output, config.run_id)
    read = (pipeline
            | 'Exports' >> beam.Create(list(config.files))
            | 'Distribute' >> beam.Reshuffle()
            | 'ReadExports' >> beam.ParDo(_ReadExportFn(mapping, config.batch_rows)).with_outputs(
                _DEAD_LETTERS, _COUNTS, main='rows'))
    converted = read.rows | 'Convert' >> beam.ParDo(_ConvertFn(mapping)).with_outputs(
        _DEAD_LETTERS, _COUNTS, main='rows')
    kept = (converted.rows
            | 'RouteByKey' >> beam.ParDo(SplitByKeyBucket(schema.name, key_column, config.buckets, spill_dir=spill))
            | 'GroupByBucket' >> beam.GroupByKey()
            | 'Deduplicate' >> beam.ParDo(_DeduplicateBucketFn(schema, key_column)).with_outputs(
                _COUNTS, _DB, main='partitions'))
    kept[_COUNTS] | 'RemoveSpill' >> RemoveWhenDone(spill)
    kept.partitions | 'WriteParquet' >> WritePartitions(schema=schema, target=config.path(schema.name))
    if config.database:
        kept[_DB] | 'WriteDatabase' >> WriteKeyed(schema=schema, target=config.database)
    reconciliation = (
        (read[_COUNTS], converted[_COUNTS], kept[_COUNTS])
        | 'AllCounts' >> beam.Flatten()
        | 'SumCounts' >> beam.CombinePerKey(sum)
        | 'GatherCounts' >> beam.combiners.ToList()
        | 'Reconcile' >> beam.Map(reconcile, config.output))
    dead_letters = (read[_DEAD_LETTERS], converted[_DEAD_LETTERS]) | 'AllDeadLetters' >> beam.Flatten()
    dead_letters | 'WriteDeadLetters' >> WriteDeadLetters(
        output_prefix=FileSystems.join(config.output, 'dead_letters', 'dead_letters'), run_id=config.run_id)
    return {'partitions': kept.partitions, 'reconciliation': reconciliation, 'dead_letters': dead_letters}


def summarize(result, config: EtlConfig, built) -> tuple[dict, lifecycle.Outcome]:
    with FileSystems.open(FileSystems.join(config.output, 'reconciliation', 'reconciliation.json')) as handle:
        files = json.loads(handle.read())
    totals = {kind: sum(f[kind] for f in files) for kind in COUNT_KINDS}
    summary = {'run_id': config.run_id, 'dataset': config.mapping.dataset, 'files': files, **totals,
               'output': config.output, 'database': config.database}
    outputs = {name: config.path(name) for name in (config.mapping.dataset, 'reconciliation', 'dead_letters')}
    return summary, lifecycle.Outcome(counts=totals, outputs={**outputs, 'database': config.database},
                                      record_refs={'dataset': config.mapping.dataset, 'files': len(files)})


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, loads the exports under the run ledger, returns the summary (or ``skipped``)."""
    values, beam_args = opts.parse(OPTIONS, list(sys.argv[1:] if argv is None else argv), prog=f'hrbatch run {NAME}')
    values['run_key'] = values['run_key'] or None
    spec, summary = lifecycle.run_pipeline(
        NAME, values, beam_args, output=values['output'],
        make_config=lambda run_id: EtlConfig.from_values(values, run_id=run_id), build=build, summarize=summarize,
        inputs=lambda config: [path for path, _ in config.files], data_categories=['HR system exports'])
    if 'files' not in summary:
        return summary
    print(f"ETL {summary['dataset']}, run {summary['run_id']}: {summary['written']:,} rows loaded, "
          f"{summary['dead_lettered']:,} dead letters, {summary['merged']:,} duplicates merged.")
    print(f"{'file':<60} {'read':>10} {'written':>10} {'dead':>8} {'merged':>8}")
    for f in summary['files']:
        print(f"{f['file'][-60:]:<60} {f['read']:>10,} {f['written']:>10,} {f['dead_lettered']:>8,} {f['merged']:>8,}")
    print(f"Dataset (Parquet):     {FileSystems.join(summary['output'], summary['dataset'])}/")
    if summary['database']:
        print(f"Dataset (SQL):         {summary['database']}  table {summary['dataset']}")
    print(f"Reconciliation:        {FileSystems.join(summary['output'], 'reconciliation')}/")
    print(f"Dead letters (JSONL):  {FileSystems.join(summary['output'], 'dead_letters')}/")
    print(lifecycle.ledger_line(spec))
    return summary


if __name__ == '__main__':
    from pipelines.cli import main_for
    sys.exit(main_for(NAME))

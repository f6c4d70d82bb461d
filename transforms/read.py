"""``ReadRecords``: reads Parquet, Avro, CSV or JSON-lines files into validated Arrow batches.

Files are found and opened through Beam's ``FileSystems`` only, so local paths and ``gs://`` work
alike. At launch (when the pipeline is built) the transform matches the pattern and reads each
file's metadata only (Parquet footer, CSV header line, first JSON line, Avro header): a missing,
empty or corrupt file, or one lacking a declared field, fails with ``ConfigError`` before any data is
read. The read itself is split into tasks (one per Parquet row group, one per file otherwise), which
are reshuffled so workers share them.

Each task streams its file into ``pa.RecordBatch``es of at most ``batch_rows`` rows, adds ``_source``
(the file) and ``_row`` (the 0-based row number in the file, the same whatever the task split),
drops undeclared columns, casts to the declared types and validates. Bad rows go to the dead-letter
output with the reason and the original row (or raw line); a part of a file that cannot be read at
all (a corrupt Parquet row group, a truncated Avro block) becomes one dead letter naming the file
and where reading stopped. Only data errors are caught: anything else is a bug and fails the job.

Format notes:
- CSV: the first line is the header; every other line is one record (values cannot span lines). All
  columns are read as strings then cast; an empty cell is null, except in a list field where it is
  the empty list. Lists are joined by ``schemas.LIST_SEPARATOR``; dates are ``YYYY-MM-DD``.
- JSON lines: one JSON object per line; blank lines are skipped but keep their row number. A key may
  be absent for a nullable field. Dates are ``YYYY-MM-DD`` strings.
- CSV and JSON-lines files may be compressed (``.gz``, ``.bz2``, ``.zst``...): Beam decompresses
  them by suffix.
"""
import contextlib
import csv
import io
import json
import logging
import posixpath
import typing
import zlib
from collections.abc import Callable, Iterator

import apache_beam as beam
import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import requests
from apache_beam import pvalue
from apache_beam.io.filesystem import BeamIOError, CompressedFile, CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms import arrow_coder  # noqa: F401  (registers the RecordBatch coder used by the type hints)
from transforms.dead_letters import METRICS_NAMESPACE, DeadLetter, locator
from transforms.errors import ConfigError
from transforms.schemas import LIST_SEPARATOR, ROW_COLUMN, SOURCE_COLUMN, RecordSchema, row_to_json
from transforms.validation import CAST_ERRORS, can_cast, cast_columns, format_value, validate_batch
from transforms.params import check_positive_int

_LOGGER = logging.getLogger(__name__)

FILE_FORMATS = ('parquet', 'avro', 'csv', 'jsonl')
FORMAT_BY_EXTENSION = {
    '.parquet': 'parquet', '.pq': 'parquet',
    '.avro': 'avro',
    '.csv': 'csv',
    '.jsonl': 'jsonl', '.ndjson': 'jsonl',
}
# Suffixes Beam decompresses on open (CompressionTypes.detect_compression_type).
_COMPRESSION_SUFFIXES = ('.gz', '.bz2', '.deflate', '.zst', '.zstd', '.xz', '.lzma')
# Parquet and Avro compress inside the file: they must be opened as they are.
_SELF_COMPRESSED = ('parquet', 'avro')

DEAD_LETTERS_TAG = 'dead_letters'
RECORDS_TAG = 'records'

# Data errors, by reader. Caught around the reader's own calls only, so a bug elsewhere still fails.
_ARROW_READ_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError)
_AVRO_READ_ERRORS = (ValueError, EOFError, OSError, zlib.error)  # fastavro: bad sync, short block, codec
_TEXT_READ_ERRORS = (EOFError, OSError, zlib.error)               # decompression of .gz, .bz2...
# Network failures are OSErrors too (pyarrow re-raises the file object's own exception), but they are
# not the data's fault: they are re-raised so that Beam retries the bundle.
_TRANSIENT_IO_ERRORS = (ConnectionError, TimeoutError, requests.exceptions.RequestException)

# At launch, at most this much of a text file is read to find its header or first record.
_FIRST_LINE_LIMIT = 16 * 1024 * 1024
_FIRST_LINE_CHUNK = 64 * 1024


class ReadTask(typing.NamedTuple):
    """One unit of reading: a whole file, or one row group of a Parquet file."""
    path: str
    row_group: typing.Optional[int]  # Parquet only; None = the whole file
    first_row: int                   # ``_row`` of the task's first row in its file


# ---------------------------------------------------------------------------------------------
# Launch: match the pattern, check each file's metadata, plan the read tasks
# ---------------------------------------------------------------------------------------------

def infer_file_format(path: str) -> str | None:
    """The format named by a path's extension (compression suffixes ignored), or None."""
    name = posixpath.basename(path).lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return FORMAT_BY_EXTENSION.get(posixpath.splitext(name)[1])


def match_files(pattern: str) -> list[FileMetadata]:
    """The files ``pattern`` matches, sorted by path; ConfigError if none, or if one is empty."""
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except BeamIOError as err:
        raise ConfigError(
            f'Input pattern {pattern!r} could not be matched: {err}. Check the path, the bucket and '
            f'your access to it.') from err
    if not matched:
        raise ConfigError(
            f'Input pattern {pattern!r} matches no file. Expected at least one file: check the path '
            f'and the wildcard (* does not cross directories, ** does).')
    files = sorted(matched, key=lambda m: m.path)
    empty = [m.path for m in files if m.size_in_bytes == 0]
    if empty:
        raise ConfigError(
            f'Input pattern {pattern!r}: file {empty[0]} is empty (0 bytes)'
            f'{f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""}. '
            f'Expected a non-empty file: remove it or fix the pattern.')
    return files


def resolve_file_format(pattern: str, paths: list[str]) -> str:
    """The format of the matched files, from their extensions; ConfigError if unknown or mixed."""
    formats = {infer_file_format(p) for p in paths}
    if len(formats) == 1 and None not in formats:
        return formats.pop()
    raise ConfigError(
        f'Input pattern {pattern!r}: cannot infer the file format from the file names '
        f'(found {sorted(str(f) for f in formats)}). Expected extensions '
        f'{sorted(FORMAT_BY_EXTENSION)}, or pass file_format= one of {list(FILE_FORMATS)}.')


def plan_read_tasks(pattern: str, schema: RecordSchema,
                    file_format: str | None) -> tuple[str, list[ReadTask]]:
    """Matches ``pattern``, checks every file's metadata against ``schema``; (format, read tasks)."""
    files = match_files(pattern)
    file_format = file_format or resolve_file_format(pattern, [f.path for f in files])
    tasks = []
    for metadata in files:
        if file_format == 'parquet':
            tasks.extend(parquet_tasks(metadata.path, schema, pattern))
        else:
            _CHECKERS[file_format](metadata.path, schema, pattern)
            tasks.append(ReadTask(metadata.path, None, 0))
    return file_format, tasks


def parquet_tasks(path: str, schema: RecordSchema, pattern: str) -> list[ReadTask]:
    """Checks a Parquet footer against ``schema``; one task per row group."""
    with _open(path, 'parquet') as handle:
        try:
            with pq.ParquetFile(handle) as parquet_file:
                file_schema = parquet_file.schema_arrow
                row_counts = [parquet_file.metadata.row_group(i).num_rows
                              for i in range(parquet_file.num_row_groups)]
        except _ARROW_READ_ERRORS as err:
            raise _file_error(pattern, path, f'is not a readable Parquet file ({err})',
                              'Expected a Parquet file with a valid footer: rewrite or remove it.') from err
    _check_fields(pattern, path, schema, {f.name: f.type for f in file_schema}, 'its Parquet schema')
    first_rows = np.concatenate([[0], np.cumsum(row_counts)[:-1]]) if row_counts else []
    return [ReadTask(path, i, int(first)) for i, first in enumerate(first_rows)]


def check_csv_header(path: str, schema: RecordSchema, pattern: str) -> None:
    line = _first_line(path, pattern).decode('utf-8-sig', errors='replace')
    header = next(csv.reader([line]), [])
    # Every CSV column is read as a string, then cast: only names can be checked here.
    _check_fields(pattern, path, schema, {name: None for name in header}, 'its CSV header')


def check_jsonl_first_record(path: str, schema: RecordSchema, pattern: str) -> None:
    line = _first_line(path, pattern, skip_blank=True)
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _file_error(pattern, path, f'has a first line that is not JSON ({err})',
                          'Expected one JSON object per line (JSON lines).') from err
    if not isinstance(record, dict):
        raise _file_error(pattern, path, f'has a first line that is a JSON {type(record).__name__}, not an object',
                          'Expected one JSON object per line (JSON lines).')
    found = {key: _json_value_type(value) for key, value in record.items()}
    _check_fields(pattern, path, schema, found, 'its first JSON record')


def check_avro_schema(path: str, schema: RecordSchema, pattern: str) -> None:
    with _open(path, 'avro') as handle:
        try:
            writer_schema = fastavro.reader(handle).writer_schema
        except _AVRO_READ_ERRORS as err:
            raise _file_error(pattern, path, f'is not a readable Avro file ({err})',
                              'Expected an Avro object container file: rewrite or remove it.') from err
    fields = writer_schema.get('fields', []) if isinstance(writer_schema, dict) else []
    found = {f['name']: avro_type_to_arrow(f['type']) for f in fields}
    _check_fields(pattern, path, schema, found, 'its Avro writer schema')


_CHECKERS = {'csv': check_csv_header, 'jsonl': check_jsonl_first_record, 'avro': check_avro_schema}

_AVRO_PRIMITIVES = {
    'null': pa.null(), 'boolean': pa.bool_(), 'int': pa.int32(), 'long': pa.int64(),
    'float': pa.float32(), 'double': pa.float64(), 'bytes': pa.binary(), 'string': pa.string(),
}


def avro_type_to_arrow(avro_type) -> pa.DataType | None:
    """The Arrow type an Avro type reads as, or None when it cannot be told (e.g. a wide union)."""
    if isinstance(avro_type, str):
        return _AVRO_PRIMITIVES.get(avro_type)
    if isinstance(avro_type, list):  # a union: ['null', X] reads as X
        non_null = [t for t in avro_type if t != 'null']
        return avro_type_to_arrow(non_null[0]) if len(non_null) == 1 else None
    if isinstance(avro_type, dict):
        if avro_type.get('logicalType') == 'date':
            return pa.date32()
        if avro_type.get('type') == 'array':
            items = avro_type_to_arrow(avro_type.get('items'))
            return pa.list_(items) if items is not None else None
        if isinstance(avro_type.get('type'), str) and 'logicalType' not in avro_type:
            return _AVRO_PRIMITIVES.get(avro_type['type'])
    return None


def _json_value_type(value) -> pa.DataType | None:
    if value is None:
        return None
    try:
        return pa.array([value]).type
    except CAST_ERRORS:
        return None


def _check_fields(pattern: str, path: str, schema: RecordSchema, found: dict[str, pa.DataType | None],
                  where: str) -> None:
    """ConfigError if ``found`` (field name -> type, None if unknown) lacks a non-nullable declared
    field or mistypes a declared field. A nullable field may be absent (it reads as nulls): files
    written before the field was declared still read."""
    required = [f.name for f in schema.fields if not f.nullable]
    missing = [name for name in required if name not in found]
    if missing:
        raise _file_error(
            pattern, path, f'lacks declared fields {missing} in {where}',
            f'Expected fields: {list(schema.names)}. Fix the file or read it with the right schema '
            f'(this is {schema.name!r}).')
    wrong = [
        f'{f.name} is {found[f.name]}, expected {f.type}'
        for f in schema.fields
        if found.get(f.name) is not None and not can_cast(found[f.name], f.type)
    ]
    if wrong:
        raise _file_error(pattern, path, f'has fields of the wrong type in {where}: {"; ".join(wrong)}',
                          f'Expected types castable to the declared ones of schema {schema.name!r}.')


def _file_error(pattern: str, path: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f'Input file {path} (matched by {pattern!r}) {problem}. {fix}')


def _first_line(path: str, pattern: str, skip_blank: bool = False) -> bytes:
    """The first (non-blank, if asked) line of a text file, reading no more than needed."""
    buffer = b''
    with _open(path, 'csv') as handle:  # as any text format: decompressed by suffix
        while len(buffer) < _FIRST_LINE_LIMIT:
            chunk = handle.read(_FIRST_LINE_CHUNK)
            buffer += chunk
            lines = buffer.split(b'\n')
            complete = lines[:-1] if chunk else lines
            for line in complete:
                if not skip_blank or line.strip():
                    return line.rstrip(b'\r')
            if not chunk:
                break
    raise _file_error(pattern, path, f'has no {"record" if skip_blank else "header"} line in its first '
                      f'{min(len(buffer), _FIRST_LINE_LIMIT)} bytes',
                      'Expected a text file with one record per line.')


def _open(path: str, file_format: str):
    compression = CompressionTypes.UNCOMPRESSED if file_format in _SELF_COMPRESSED else CompressionTypes.AUTO
    return FileSystems.open(path, compression_type=compression)


class _StreamOf(io.RawIOBase):
    """A Beam ``CompressedFile`` as a standard read-only stream, for pyarrow.

    ``CompressedFile.closed`` is a method, not a property: pyarrow reads it as true and refuses the
    file ("I/O operation on closed file").
    """

    def __init__(self, handle: CompressedFile):
        super().__init__()
        self._handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._handle.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def for_pyarrow(handle):
    """A file opened with ``FileSystems.open`` as something pyarrow's readers accept (a Beam
    ``CompressedFile`` for .gz, .bz2... is wrapped; other handles are returned as they are)."""
    if isinstance(handle, CompressedFile):
        return io.BufferedReader(_StreamOf(handle), buffer_size=1 << 20)
    return handle


# ---------------------------------------------------------------------------------------------
# Reading: each task streams raw batches (or dead letters), then casts and validates them
# ---------------------------------------------------------------------------------------------

RawItem = typing.Union[pa.RecordBatch, DeadLetter]


def read_records(task: ReadTask, *, schema: RecordSchema, file_format: str, batch_rows: int,
                 step: str) -> Iterator[RawItem]:
    """Reads one task: valid batches (``schema.arrow_schema(with_metadata=True)``) and dead letters."""
    for item in _READERS[file_format](task, schema, batch_rows, step):
        if isinstance(item, DeadLetter):
            yield item
            continue
        cast, letters = cast_columns(item, schema, step=step)
        yield from letters
        valid, letters = validate_batch(cast, schema, step=step)
        yield from letters
        if valid.num_rows:
            yield valid


class _ReadFailure(typing.NamedTuple):
    """The data error that stopped a reader (always the last item of ``_until_data_error``)."""
    error: Exception


def _until_data_error(make_items: Callable[[], typing.Iterable], errors: tuple) -> Iterator:
    """The items of ``make_items()``, then a ``_ReadFailure`` if one of ``errors`` stopped them.

    Only the reader's own calls are guarded: an error raised while the caller handles an item is
    not caught here, so it still fails the job.
    """
    try:
        items = iter(make_items())
    except errors as err:
        _raise_if_transient(err)
        yield _ReadFailure(err)
        return
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except errors as err:
            _raise_if_transient(err)
            yield _ReadFailure(err)
            return
        yield item


def _raise_if_transient(err: Exception) -> None:
    if isinstance(err, _TRANSIENT_IO_ERRORS):
        raise err


def _unreadable(step: str, path: str, row: int, what: str, err: Exception) -> DeadLetter:
    return DeadLetter(step=step, payload='', source=locator(path, row),
                      error=f'{what} could not be read from row {row} on (the rows before it were read): {err}')


def read_parquet(task: ReadTask, schema: RecordSchema, batch_rows: int, step: str) -> Iterator[RawItem]:
    opened = []

    def batches():
        parquet_file = pq.ParquetFile(handle)
        opened.append(parquet_file)
        columns = [n for n in schema.names if n in parquet_file.schema_arrow.names]
        # Single-threaded: tasks already run in parallel, one per row group.
        return parquet_file.iter_batches(batch_size=batch_rows, row_groups=[task.row_group],
                                         columns=columns, use_threads=False)

    next_row = task.first_row
    # The reader is closed here, on this thread: left to the garbage collector, its last reference
    # can drop on an Arrow pool thread during interpreter exit, which aborts the process.
    with _open(task.path, 'parquet') as handle, contextlib.ExitStack() as closing:
        closing.callback(lambda: [f.close() for f in opened])
        for batch in _until_data_error(batches, _ARROW_READ_ERRORS):
            if isinstance(batch, _ReadFailure):
                yield _unreadable(step, task.path, next_row,
                                  f'Parquet row group {task.row_group} of {task.path}', batch.error)
                return
            yield with_metadata(batch, schema, task.path, np.arange(next_row, next_row + batch.num_rows))
            next_row += batch.num_rows


def read_csv(task: ReadTask, schema: RecordSchema, batch_rows: int, step: str) -> Iterator[RawItem]:
    # pyarrow skips rows with the wrong number of fields and reports them to this handler, always
    # before it returns the block that would have held them: their numbers keep the others' exact.
    skipped: list = []

    def on_invalid_row(row):
        skipped.append(row)
        return 'skip'

    def blocks():
        return pa_csv.open_csv(
            for_pyarrow(handle),
            read_options=pa_csv.ReadOptions(use_threads=False),
            parse_options=pa_csv.ParseOptions(
                invalid_row_handler=on_invalid_row, newlines_in_values=False, ignore_empty_lines=False),
            convert_options=pa_csv.ConvertOptions(
                include_columns=list(schema.names), include_missing_columns=True,
                column_types={name: pa.string() for name in schema.names},
                strings_can_be_null=True, quoted_strings_can_be_null=True, null_values=['']))

    next_row, reported, skipped_rows = 0, 0, []
    with _open(task.path, 'csv') as handle:
        for block in _until_data_error(blocks, _ARROW_READ_ERRORS):
            for row in skipped[reported:]:
                skipped_rows.append(_csv_data_row(row))
                yield _csv_row_letter(row, task.path, step)
            reported = len(skipped)
            if isinstance(block, _ReadFailure):
                yield _unreadable(step, task.path, next_row, f'CSV file {task.path}', block.error)
                return
            rows = _row_numbers(next_row, block.num_rows, skipped_rows)
            if block.num_rows:
                next_row = int(rows[-1]) + 1
            block = split_list_columns(block, schema)
            for start in range(0, block.num_rows, batch_rows):
                yield with_metadata(block.slice(start, batch_rows), schema, task.path,
                                    rows[start:start + batch_rows])
    for row in skipped[reported:]:
        yield _csv_row_letter(row, task.path, step)


def _csv_data_row(row) -> int | None:
    # pyarrow numbers physical lines from 1, the header being line 1.
    return row.number - 2 if row.number is not None and row.number >= 2 else None


def _csv_row_letter(row, path: str, step: str) -> DeadLetter:
    return DeadLetter(
        step=step, payload=row.text, source=locator(path, _csv_data_row(row)),
        error=f'CSV row has {row.actual_columns} fields, expected {row.expected_columns} (as in the header)')


def _row_numbers(start: int, count: int, skipped: list[int | None]) -> np.ndarray:
    """The ``count`` row numbers from ``start`` on that are not ``skipped`` rows."""
    skipped_here = np.asarray(sorted(r for r in skipped if r is not None and r >= start), dtype=np.int64)
    candidates = np.arange(start, start + count + len(skipped_here), dtype=np.int64)
    return candidates[~np.isin(candidates, skipped_here)][:count]


def split_list_columns(batch: pa.RecordBatch, schema: RecordSchema) -> pa.RecordBatch:
    """CSV list cells ('a|b|c') as lists; an empty (null) cell is the empty list."""
    columns = []
    for name in batch.schema.names:
        column = batch.column(name)
        if name in schema.names and schema.field(name).is_list and pa.types.is_string(column.type):
            lists = pc.split_pattern(column, LIST_SEPARATOR)
            column = pc.fill_null(lists, pa.scalar([], lists.type))
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def read_jsonl(task: ReadTask, schema: RecordSchema, batch_rows: int, step: str) -> Iterator[RawItem]:
    records, rows, lines = [], [], []
    row = 0
    with _open(task.path, 'jsonl') as handle:
        for raw in _until_data_error(lambda: iter(handle.readline, b''), _TEXT_READ_ERRORS):
            if isinstance(raw, _ReadFailure):
                yield _unreadable(step, task.path, row, f'JSON-lines file {task.path}', raw.error)
                break
            record, letter = _parse_json_line(raw, task.path, row, step)
            if letter is not None:
                yield letter
            elif record is not None:
                records.append(record)
                rows.append(row)
                lines.append(raw)
            row += 1
            if len(records) == batch_rows:
                yield from _records_batch(records, rows, task.path, schema, step,
                                          lambda i, lines=lines: _decode(lines[i]))
                records, rows, lines = [], [], []
    if records:
        yield from _records_batch(records, rows, task.path, schema, step, lambda i: _decode(lines[i]))


def _parse_json_line(raw: bytes, path: str, row: int, step: str) -> tuple[dict | None, DeadLetter | None]:
    """The record on one line; (None, None) for a blank line; (None, letter) for a bad one."""
    if not raw.strip():
        return None, None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, DeadLetter(step=step, error=f'line is not valid JSON: {err}',
                                payload=_decode(raw), source=locator(path, row))
    if not isinstance(record, dict):
        return None, DeadLetter(step=step, error=f'line is a JSON {type(record).__name__}, expected an object',
                                payload=_decode(raw), source=locator(path, row))
    return record, None


def _decode(raw: bytes) -> str:
    return raw.decode('utf-8', errors='replace').rstrip('\r\n')


def read_avro(task: ReadTask, schema: RecordSchema, batch_rows: int, step: str) -> Iterator[RawItem]:
    records, rows = [], []
    row = 0
    with _open(task.path, 'avro') as handle:
        for record in _until_data_error(lambda: fastavro.reader(handle), _AVRO_READ_ERRORS):
            if isinstance(record, _ReadFailure):
                yield _unreadable(step, task.path, row, f'Avro file {task.path}', record.error)
                break
            records.append(record)
            rows.append(row)
            row += 1
            if len(records) == batch_rows:
                yield from _records_batch(records, rows, task.path, schema, step,
                                          lambda i, records=records: row_to_json(records[i]))
                records, rows = [], []
    if records:
        yield from _records_batch(records, rows, task.path, schema, step, lambda i: row_to_json(records[i]))


_READERS: dict[str, Callable[..., Iterator[RawItem]]] = {
    'parquet': read_parquet, 'csv': read_csv, 'jsonl': read_jsonl, 'avro': read_avro,
}


def _records_batch(records: list[dict], rows: list[int], path: str, schema: RecordSchema, step: str,
                   payload_of: Callable[[int], str]) -> Iterator[RawItem]:
    batch, letters = records_to_batch(records, np.asarray(rows, dtype=np.int64), path, schema, step, payload_of)
    yield from letters
    if batch.num_rows:
        yield batch


def records_to_batch(records: list[dict], rows: np.ndarray, path: str, schema: RecordSchema, step: str,
                     payload_of: Callable[[int], str]) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """Row-oriented records (Avro, JSON) as a batch of the declared types, plus the records that don't fit.

    A record whose value has the wrong type (a string where a number is declared, a number in a list
    of strings...) becomes a dead letter carrying its raw text, naming the field and the value.
    """
    columns, problems = {}, {}
    for field in schema.fields:
        values = [record.get(field.name) for record in records]
        columns[field.name], bad = column_from_values(values, field.type)
        for i in bad:
            problems.setdefault(i, []).append(
                f'{field.name}={format_value(values[i])}: cannot be read as {field.type}')
    letters = [DeadLetter(step=step, error='; '.join(problems[i]), payload=payload_of(i),
                          source=locator(path, int(rows[i]))) for i in sorted(problems)]
    keep = np.ones(len(records), dtype=bool)
    keep[list(problems)] = False
    arrays = [_keep(columns[f.name], keep, f.type) for f in schema.fields]
    batch = pa.RecordBatch.from_arrays(arrays, names=list(schema.names))
    return with_metadata(batch, schema, path, rows[keep]), letters


def column_from_values(values: list, arrow_type: pa.DataType) -> tuple[pa.Array | list, list[int]]:
    """Python values as an Arrow array of ``arrow_type``, and the positions that cannot be converted.

    Fast path: the whole column at once (strings are cast, for ISO dates in JSON). Only when that
    fails is each value converted on its own; the column is then returned as one array per value
    (None for the bad ones) for ``_keep`` to assemble.
    """
    # pyarrow turns a string given for a list into its list of characters: rule that out first.
    strings_as_lists = _is_list_type(arrow_type) and any(isinstance(v, (str, bytes)) for v in values)
    try:
        if not strings_as_lists:
            return pa.array(values, type=arrow_type), []
    except CAST_ERRORS:
        pass
    try:
        inferred = pa.array(values)
        if pa.types.is_string(inferred.type):
            return pc.cast(inferred, arrow_type), []
    except CAST_ERRORS:
        pass
    parts = [_value_array(value, arrow_type) for value in values]
    return parts, [i for i, part in enumerate(parts) if part is None]


def _value_array(value, arrow_type: pa.DataType) -> pa.Array | None:
    if _is_list_type(arrow_type) and isinstance(value, (str, bytes)):
        return None
    try:
        return pa.array([value], type=arrow_type)
    except CAST_ERRORS:
        pass
    if isinstance(value, str):
        try:
            return pc.cast(pa.array([value]), arrow_type)
        except CAST_ERRORS:
            pass
    return None


def _is_list_type(arrow_type: pa.DataType) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)


def _keep(column: pa.Array | list, keep: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """The kept rows of a column from ``column_from_values`` (an array, or one array per value)."""
    if isinstance(column, list):
        parts = [part for part, kept in zip(column, keep) if kept]
        return pa.concat_arrays(parts) if parts else pa.array([], type=arrow_type)
    return column if keep.all() else column.filter(pa.array(keep))


def with_metadata(batch: pa.RecordBatch, schema: RecordSchema, path: str, rows: np.ndarray) -> pa.RecordBatch:
    """The declared columns of ``batch`` (nulls for absent ones) plus ``_source`` and ``_row``."""
    present = set(batch.schema.names)
    columns = [batch.column(f.name) if f.name in present else pa.nulls(batch.num_rows, f.type)
               for f in schema.fields]
    columns += [pa.repeat(pa.scalar(path, pa.string()), batch.num_rows), pa.array(rows, pa.int64())]
    return pa.RecordBatch.from_arrays(columns, names=[*schema.names, SOURCE_COLUMN, ROW_COLUMN])


# ---------------------------------------------------------------------------------------------
# The transform
# ---------------------------------------------------------------------------------------------

class _ReadTaskFn(beam.DoFn):
    """Reads one task; valid batches to the main output, dead letters to ``dead_letters``."""

    def __init__(self, *, schema: RecordSchema, file_format: str, batch_rows: int, step: str):
        self._schema = schema
        self._file_format = file_format
        self._batch_rows = batch_rows
        self._step = step
        self._read = Metrics.counter(METRICS_NAMESPACE, f'{schema.name}_read')
        self._rejected = Metrics.counter(METRICS_NAMESPACE, f'{schema.name}_rejected')

    # The output type hints (a Literal must spell the tag) give Beam the RecordBatch coder for the
    # records and a DeadLetter type for the dead letters.
    def process(self, task: ReadTask) -> Iterator[
            pa.RecordBatch | pvalue.TaggedOutput[typing.Literal['dead_letters'], DeadLetter]]:
        for item in read_records(task, schema=self._schema, file_format=self._file_format,
                                 batch_rows=self._batch_rows, step=self._step):
            if isinstance(item, DeadLetter):
                self._rejected.inc()
                yield pvalue.TaggedOutput(DEAD_LETTERS_TAG, item)
            else:
                self._read.inc(item.num_rows)
                yield item


class ReadRecords(beam.PTransform):
    """Reads the files matching ``file_pattern`` as validated Arrow batches of ``schema``.

    Returns an object with ``.records`` (``pa.RecordBatch``es of at most ``batch_rows`` rows, schema
    ``schema.arrow_schema(with_metadata=True)``) and ``.dead_letters`` (``DeadLetter``s, step
    ``step``). Counts ``<schema.name>_read`` and ``<schema.name>_rejected`` in the ``hrbatch``
    metrics namespace. Raises ConfigError while the pipeline is built if an input is missing, empty,
    corrupt or lacks a declared field.

    Example::

        read = p | 'ReadCandidates' >> ReadRecords(file_pattern='gs://b/candidates-*.parquet',
                                                   schema=schemas.CANDIDATES)
        read.records | ...
        read.dead_letters | WriteDeadLetters(output_prefix=..., run_id=...)
    """

    def __init__(self, *, file_pattern: str, schema: RecordSchema, file_format: str | None = None,
                 batch_rows: int = 8192, step: str | None = None):
        super().__init__()
        if not isinstance(file_pattern, str) or not file_pattern:
            raise ValueError(f'file_pattern must be a non-empty path or glob, e.g. gs://bucket/in/*.parquet; '
                             f'got {file_pattern!r}')
        if not isinstance(schema, RecordSchema):
            raise ValueError(f'schema must be a transforms.schemas.RecordSchema; got {type(schema).__name__}')
        if file_format is not None and file_format not in FILE_FORMATS:
            raise ValueError(f'file_format must be one of {list(FILE_FORMATS)} or None (inferred from the '
                             f'extension); got {file_format!r}')
        check_positive_int('batch_rows', batch_rows)
        if step is not None and (not isinstance(step, str) or not step):
            raise ValueError(f'step must be a non-empty label such as "ReadCandidates", or None; got {step!r}')
        self._file_pattern = file_pattern
        self._schema = schema
        # A pattern with a known extension decides the format now; otherwise the matched files will.
        self._file_format = file_format or infer_file_format(file_pattern)
        self._batch_rows = batch_rows
        self._step = step or 'Read' + ''.join(part.title() for part in schema.name.split('_'))

    def expand(self, pbegin):
        file_format, tasks = plan_read_tasks(self._file_pattern, self._schema, self._file_format)
        _LOGGER.info('%s: %d read tasks from %d files matching %s', self._step, len(tasks),
                     len({t.path for t in tasks}), self._file_pattern)
        return (
            pbegin
            # Create reshuffles its elements (more than one): the tasks spread over the workers.
            | 'ListReadTasks' >> beam.Create(tasks).with_output_types(ReadTask)
            | 'ReadAndValidate' >> beam.ParDo(_ReadTaskFn(
                schema=self._schema, file_format=file_format, batch_rows=self._batch_rows, step=self._step))
            .with_outputs(DEAD_LETTERS_TAG, main=RECORDS_TAG))

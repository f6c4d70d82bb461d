"""Idempotent keyed writes: upsert rows into a SQL table, or publish partitioned Parquet files.

``WriteKeyed`` takes a PCollection of Arrow ``RecordBatch`` holding (at least) the fields of a
``RecordSchema``. Other columns, such as the ``_source``/``_row`` metadata, are dropped; the columns
are cast to the declared Arrow types, so a file or table never depends on how a reader typed them.
Batches may have any size.

Where the rows go depends on ``target``:

* ``sqlite:///<path>`` or ``postgresql://...`` (a libpq URL): rows are upserted on the schema key
  into ``table`` (default: the schema name). The table (and a SQLite file's directory) is created at
  pipeline construction if it does not exist, with ``PRIMARY KEY`` = the schema key; if it exists
  with other columns, types or key, construction fails with a ``ConfigError``. Each transaction
  holds at most ``max_batch_rows`` rows; SQLite runs in WAL mode with a busy timeout, so several
  local workers can write at once.
  Output: a PCollection of ``int``, the row count of each committed transaction.
* anything else is a directory (local or ``gs://``): each partition is written as exactly one
  Parquet file, rows sorted by the key, published by rename. Output: a PCollection of the published
  file paths, emitted once every file is published and the temporary directory is removed.

Guarantees
----------
Both writes are idempotent: running the same input again (or retrying any bundle) leaves exactly
the same rows, and for Parquet byte-identical files with the same names (with the same pyarrow
version: the writer records it in the file footer). An update of a key in a later run replaces its
row. Keys must be unique in the input: a Parquet partition with two rows of one key fails the job
(it would break the key contract silently); in SQL the last upsert of a key would win in an
unspecified order, so de-duplicate upstream (``transforms.deduplicate.DropDuplicateKeys``).

SQL types (from the declared Arrow types)
-----------------------------------------
=============== ==================== =================================================
Arrow           PostgreSQL           SQLite
=============== ==================== =================================================
string          TEXT                 TEXT
float64         DOUBLE PRECISION     DOUBLE PRECISION (REAL affinity)
float32         REAL                 REAL (stored as 8 bytes: the float32 value exactly)
int64           BIGINT               BIGINT
int8/16/32      INTEGER              INTEGER
date32          DATE                 DATE (ISO ``YYYY-MM-DD`` text)
list<string>    TEXT[]               JSON (a JSON array as text, SQLAlchemy's convention)
=============== ==================== =================================================

PostgreSQL lists are native ``TEXT[]`` (queryable with ``ANY``/``@>``, round-trip to Python lists
through psycopg); SQLite has no arrays, hence JSON text, readable with SQLite's JSON functions.
Non-nullable fields are ``NOT NULL``. SQLite turns NaN into NULL: a NaN in a non-nullable float
column fails the transaction rather than being stored as a missing value.

Parquet layout
--------------
``<target>/part-00000.parquet`` without ``partition_by``; ``<target>/<col>=<value>/part-00000.parquet``
with it, where ``<value>`` is the value's text (ISO date, decimal integer) percent-encoded (RFC 3986,
nothing kept but letters, digits and ``-._~``), as Hive and pyarrow's ``segment_encoding='uri'`` read
it; with ``buckets``: ``<target>/<col>_bucket=<NNNNN>/part-00000.parquet`` where NNNNN is the
big-endian integer of blake2b(value text as UTF-8, digest_size=8) modulo ``buckets``, zero-padded.
Files keep the partition column and carry the schema name and key in their metadata
(``hrbatch.schema``, ``hrbatch.key``). A run replaces the partitions present in its input; partitions
it has no rows for are left as they are. Files are written under ``<target>/.tmp-<launch id>/`` and
renamed into place, so readers never see a half-written file; a failed run can leave that hidden
directory behind (readers of ``part-*.parquet`` ignore it).

Secrets: a password in a PostgreSQL URL is pickled with the pipeline; prefer a ``PGPASSFILE`` or
``PGPASSWORD`` on the workers. Error messages show the URL with its password masked. Row values are
never logged.
"""
import dataclasses
import datetime
import hashlib
import json
import pathlib
import re
import sqlite3
import typing
import urllib.parse
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms import arrow_coder  # noqa: F401  (registers the RecordBatch coder used between steps)
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.errors import ConfigError
from transforms.schemas import RecordSchema
from transforms.params import check_positive_int

SQLITE_PREFIX = 'sqlite:///'
POSTGRESQL_PREFIX = 'postgresql://'
PART_FILE = 'part-00000.parquet'
MAX_BUCKETS = 100_000  # bucket numbers are written with 5 digits
_BUCKET_DIGITS = 5
# Long enough to outwait another worker's transaction of max_batch_rows rows.
_SQLITE_BUSY_TIMEOUT_S = 60.0
_IDENTIFIER = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
_SCHEMA_METADATA_NAME = b'hrbatch.schema'
_SCHEMA_METADATA_KEY = b'hrbatch.key'

# Pinned writer settings: pyarrow's defaults may change between versions, and the bytes of a file
# must depend only on its rows. Parquet writes no timestamp; the footer names the pyarrow version.
_PARQUET_WRITE_OPTIONS = dict(
    version='2.6',
    compression='zstd',
    compression_level=3,
    use_dictionary=True,
    write_statistics=True,
    data_page_version='1.0',
    row_group_size=128 * 1024,
    store_schema=True,
    write_page_index=False,
)


# ------------------------------------------------------------------------------------------------
# Targets and parameters


@dataclasses.dataclass(frozen=True)
class SqlTarget:
    """A SQL database: ``dialect`` is 'sqlite' (``location`` a file path) or 'postgresql' (a URL)."""
    dialect: str
    location: str

    def __str__(self) -> str:
        if self.dialect == 'sqlite':
            return SQLITE_PREFIX + self.location
        return redact_url(self.location)

    def __repr__(self) -> str:
        # Tracebacks and Beam's messages may show the repr: never the password.
        return f'SqlTarget({self.dialect!r}, {str(self)!r})'


def redact_url(url: str) -> str:
    """The URL with any password masked, for error messages."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition('@')
        netloc = f'{userinfo.partition(":")[0]}:***@{host}'
    query = re.sub(r'(?i)(^|&)(password=)[^&]*', r'\1\2***', parts.query)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def parse_sql_target(target: str) -> SqlTarget | None:
    """The SQL database named by ``target``, or None when ``target`` is a directory.

    Raises ValueError for a SQL-looking target that cannot work.
    """
    if target.startswith(SQLITE_PREFIX):
        path = target[len(SQLITE_PREFIX):]
        if path in ('', ':memory:'):
            raise ValueError(
                f'target={target!r}: a SQLite target needs a database file, e.g. sqlite:///out/hr.db '
                '(relative) or sqlite:////data/hr.db (absolute); an in-memory database is not shared '
                'between workers and disappears with them')
        return SqlTarget('sqlite', path)
    if target.startswith('sqlite:'):
        raise ValueError(f'target={target!r}: write SQLite targets as sqlite:///<path to the file>')
    if target.startswith(POSTGRESQL_PREFIX):
        return SqlTarget('postgresql', target)
    if target.startswith('postgres:'):
        raise ValueError(
            f'target={redact_url(target)!r}: write PostgreSQL targets as postgresql://user@host:port/db')
    return None


def _check_directory_target(target: str) -> None:
    # A scheme Beam has no filesystem for (a typo, or an unsupported database) must fail at launch,
    # not on the workers after the data was read.
    try:
        FileSystems.get_filesystem(target)
    except ValueError as error:
        raise ValueError(
            f'target={target!r} is neither a sqlite:/// or postgresql:// URL nor a directory on a '
            f'filesystem Beam knows (local path, gs://...): {error}') from None


_PARTITION_TYPES = 'string, integer or date32'


def _is_partitionable(arrow_type: pa.DataType) -> bool:
    return (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or pa.types.is_integer(arrow_type) or pa.types.is_date32(arrow_type))


# ------------------------------------------------------------------------------------------------
# Batches: pure, columnar


def conform_batch(batch: pa.RecordBatch, schema: RecordSchema, *,
                  keep_dictionaries: bool = False) -> pa.RecordBatch:
    """The schema's fields of ``batch``, in declared order and types; other columns are dropped.

    With ``keep_dictionaries``, a dictionary-encoded column of the declared value type stays encoded
    (rows in flight to a shuffle stay small: a JSON string repeated on every row costs 4 bytes).
    Raises ValueError for a missing field or a null in a non-nullable one: validation upstream must
    have caught both, so this is a bug to fail on, not a record to route aside.
    """
    target = schema.arrow_schema()
    missing = [name for name in target.names if name not in batch.schema.names]
    if missing:
        raise ValueError(f'{schema.name}: the batch has no column {missing}; it has {batch.schema.names}')

    def conformed(field: pa.Field) -> pa.Array:
        column = batch.column(field.name)
        if keep_dictionaries and pa.types.is_dictionary(column.type) and column.type.value_type == field.type:
            return column
        return column.cast(field.type)

    arrays = [conformed(f) for f in target]
    nulls = [f.name for f, array in zip(target, arrays) if not f.nullable and array.null_count]
    if nulls:
        raise ValueError(f'{schema.name}: non-nullable fields {nulls} hold nulls; validate before writing')
    fields = [f.with_type(array.type) for f, array in zip(target, arrays)]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def transaction_slices(num_rows: int, max_rows: int) -> list[tuple[int, int]]:
    """``(offset, length)`` slices covering ``num_rows`` rows in order, none longer than ``max_rows``."""
    if max_rows < 1:
        raise ValueError(f'max_rows={max_rows!r} must be >= 1')
    return [(offset, min(max_rows, num_rows - offset)) for offset in range(0, num_rows, max_rows)]


def partition_text(value) -> str:
    """The canonical text of a partition value: the string, the decimal integer, the ISO date."""
    if isinstance(value, datetime.date):
        return value.isoformat()
    return str(value)


def bucket_of(text: str, buckets: int) -> int:
    """A stable bucket number: blake2b (8-byte digest, big-endian) of the UTF-8 text mod ``buckets``."""
    digest = hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest()
    return int.from_bytes(digest, 'big') % buckets


def partition_dir(partition_by: str | None, value, buckets: int | None = None) -> str:
    """The directory (relative to the target, '' if unpartitioned) of the partition of ``value``."""
    if partition_by is None:
        return ''
    text = partition_text(value)
    if buckets is not None:
        return f'{partition_by}_bucket={bucket_of(text, buckets):0{_BUCKET_DIGITS}d}'
    # safe='' percent-encodes '/', '=' and anything non-ASCII: injective, and one path segment.
    return f'{partition_by}={urllib.parse.quote(text, safe="")}'


def split_by_partition(batch: pa.RecordBatch, partition_by: str | None,
                       buckets: int | None = None) -> list[tuple[str, pa.RecordBatch]]:
    """``batch`` split into ``(partition directory, rows of that partition)``, one per partition.

    Only the distinct values are hashed/encoded in Python; rows are routed with numpy.
    """
    if batch.num_rows == 0:
        return []
    if partition_by is None:
        return [('', batch)]
    encoded = pc.dictionary_encode(batch.column(partition_by))
    value_dirs = np.array(
        [partition_dir(partition_by, v, buckets) for v in encoded.dictionary.to_pylist()], dtype=object)
    # Several values share a directory when bucketed: number the distinct directories.
    dirs, dir_of_value = np.unique(value_dirs, return_inverse=True)
    dir_of_row = dir_of_value[encoded.indices.to_numpy(zero_copy_only=False)]
    order = np.argsort(dir_of_row, kind='stable')
    grouped = batch.take(pa.array(order))
    bounds = np.concatenate([[0], np.cumsum(np.bincount(dir_of_row, minlength=len(dirs)))])
    return [(str(d), grouped.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])))
            for i, d in enumerate(dirs)]


def duplicate_key_count(table: pa.Table, key: tuple[str, ...]) -> int:
    """How many rows of ``table`` (sorted by ``key``) repeat the key of the row before them."""
    n = table.num_rows
    if n < 2:
        return 0
    same = np.ones(n - 1, dtype=bool)
    for name in key:
        column = table.column(name)
        equal = pc.fill_null(pc.equal(column.slice(1), column.slice(0, n - 1)), False)
        same &= equal.to_numpy(zero_copy_only=False)
    return int(same.sum())


def sort_partition(batches: typing.Sequence[pa.RecordBatch], schema: RecordSchema,
                   label: str = '') -> pa.Table:
    """The rows of ``batches`` (conformed to ``schema``) as one table sorted by key, in one chunk.

    One chunk, so the file layout cannot depend on how the rows arrived. Raises ValueError if a key
    appears twice; ``label`` (the partition) makes that message findable.
    """
    merged = pa.concat_batches([conform_batch(batch, schema) for batch in batches])
    order = pc.sort_indices(merged, sort_keys=[(k, 'ascending') for k in schema.key])
    table = pa.Table.from_batches([merged.take(order)])
    duplicates = duplicate_key_count(table, schema.key)
    if duplicates:
        raise ValueError(
            f'{schema.name} partition {label!r}: {duplicates} rows repeat the key {list(schema.key)} '
            'of another row; keys must be unique, de-duplicate before writing')
    return table.replace_schema_metadata({
        _SCHEMA_METADATA_NAME: schema.name.encode(),
        _SCHEMA_METADATA_KEY: json.dumps(list(schema.key)).encode(),
    })


# ------------------------------------------------------------------------------------------------
# SQL


def _sql_type(arrow_type: pa.DataType, dialect: str) -> str | None:
    """The column type for ``arrow_type``, or None if there is no mapping."""
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return 'TEXT'
    if pa.types.is_float64(arrow_type):
        return 'DOUBLE PRECISION'
    if pa.types.is_float32(arrow_type):
        return 'REAL'
    if pa.types.is_int64(arrow_type):
        return 'BIGINT'
    if pa.types.is_int32(arrow_type) or pa.types.is_int16(arrow_type) or pa.types.is_int8(arrow_type):
        return 'INTEGER'
    if pa.types.is_date32(arrow_type):
        return 'DATE'
    is_list = pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
    if is_list and (pa.types.is_string(arrow_type.value_type) or pa.types.is_large_string(arrow_type.value_type)):
        return 'TEXT[]' if dialect == 'postgresql' else 'JSON'
    return None


def expected_columns(schema: RecordSchema, dialect: str) -> dict[str, str]:
    return {f.name: _sql_type(f.type, dialect) for f in schema.fields}


def _quote(identifier: str) -> str:
    # Identifiers are checked against _IDENTIFIER; quoting keeps their case in PostgreSQL.
    return f'"{identifier}"'


def create_table_sql(schema: RecordSchema, table: str, dialect: str) -> str:
    columns = [
        f'{_quote(f.name)} {_sql_type(f.type, dialect)}{"" if f.nullable else " NOT NULL"}'
        for f in schema.fields]
    key = ', '.join(_quote(k) for k in schema.key)
    return f'CREATE TABLE IF NOT EXISTS {_quote(table)} ({", ".join(columns)}, PRIMARY KEY ({key}))'


def upsert_sql(schema: RecordSchema, table: str, dialect: str) -> str:
    """``INSERT ... ON CONFLICT (key) DO UPDATE SET`` every non-key column to the new value."""
    placeholder = '%s' if dialect == 'postgresql' else '?'
    names = ', '.join(_quote(n) for n in schema.names)
    values = ', '.join([placeholder] * len(schema.names))
    key = ', '.join(_quote(k) for k in schema.key)
    others = [n for n in schema.names if n not in schema.key]
    action = ('DO UPDATE SET ' + ', '.join(f'{_quote(n)} = excluded.{_quote(n)}' for n in others)
              if others else 'DO NOTHING')
    return f'INSERT INTO {_quote(table)} ({names}) VALUES ({values}) ON CONFLICT ({key}) {action}'


def sql_rows(batch: pa.RecordBatch, schema: RecordSchema, dialect: str) -> list[tuple]:
    """The parameters of ``executemany``: built column by column, then zipped into rows."""
    columns = []
    for f in schema.fields:
        values = batch.column(f.name).to_pylist()
        if dialect == 'sqlite' and f.is_list:
            values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
        elif dialect == 'sqlite' and pa.types.is_date32(f.type):
            values = [None if v is None else v.isoformat() for v in values]
        columns.append(values)
    return list(zip(*columns))


def connect(target: SqlTarget):
    """A connection in autocommit mode: transactions are opened explicitly, one per slice."""
    if target.dialect == 'sqlite':
        # check_same_thread=False: Beam may run a DoFn instance's bundles on different threads of
        # a worker (never two at once), and the connection is opened in setup().
        conn = sqlite3.connect(target.location, timeout=_SQLITE_BUSY_TIMEOUT_S,
                               isolation_level=None, check_same_thread=False)
        # WAL lets readers and one writer work at once; other writers wait up to the busy timeout.
        conn.execute('PRAGMA journal_mode=WAL')
        return conn
    import psycopg  # only PostgreSQL targets need the driver
    return psycopg.connect(target.location, autocommit=True)


def upsert(conn, dialect: str, statement: str, rows: list[tuple]) -> None:
    """Upserts ``rows`` in one transaction."""
    if dialect == 'postgresql':
        with conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(statement, rows)
        return
    # BEGIN IMMEDIATE takes the write lock up front (waiting up to the busy timeout), instead of
    # failing at the first write when another worker's transaction holds it.
    conn.execute('BEGIN IMMEDIATE')
    try:
        conn.executemany(statement, rows)
    except BaseException:
        conn.execute('ROLLBACK')
        raise
    conn.execute('COMMIT')


def table_columns(conn, dialect: str, table: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """The table's ``{column: declared type}`` (upper case) and its primary key, in order."""
    if dialect == 'sqlite':
        info = conn.execute(f'PRAGMA table_info({_quote(table)})').fetchall()
        # Rows are (cid, name, type, notnull, default, pk); pk is the 1-based position in the key.
        columns = {name: ' '.join(declared.upper().split()) for _, name, declared, *_ in info}
        key = tuple(c[1] for c in sorted((c for c in info if c[5]), key=lambda c: c[5]))
        return columns, key
    with conn.cursor() as cursor:
        cursor.execute(
            'SELECT a.attname, upper(format_type(a.atttypid, a.atttypmod)) FROM pg_attribute a '
            'WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped '
            'ORDER BY a.attnum', (_quote(table),))
        columns = dict(cursor.fetchall())
        cursor.execute(
            'SELECT a.attname FROM pg_index i JOIN pg_attribute a '
            'ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) '
            'WHERE i.indrelid = to_regclass(%s) AND i.indisprimary '
            'ORDER BY array_position(i.indkey, a.attnum)', (_quote(table),))
        key = tuple(name for (name,) in cursor.fetchall())
    return columns, key


def ensure_table(target: SqlTarget, table: str, schema: RecordSchema) -> None:
    """Creates ``table`` if needed; ConfigError if it exists with other columns, types or key.

    ``CREATE TABLE IF NOT EXISTS`` then a check, rather than check-then-create, so two launches at
    once cannot race.
    """
    try:
        if target.dialect == 'sqlite':
            # Like a Parquet target's directory, the database's directory is created on demand.
            pathlib.Path(target.location).parent.mkdir(parents=True, exist_ok=True)
        conn = connect(target)
    except Exception as error:  # the driver's own errors: sqlite3.Error, psycopg.Error, OSError
        raise ConfigError(f'target {target}: cannot connect to the database to create table '
                          f'{table!r}: {type(error).__name__}: {error}') from None
    try:
        conn.execute(create_table_sql(schema, table, target.dialect))
        found, found_key = table_columns(conn, target.dialect, table)
    finally:
        conn.close()
    expected = {name: sql_type.upper() for name, sql_type in expected_columns(schema, target.dialect).items()}
    if found != expected or set(found_key) != set(schema.key):
        raise ConfigError(
            f'table {table!r} in {target} exists with columns {found} and primary key {list(found_key)}, '
            f'but schema {schema.name!r} expects columns {expected} and primary key {list(schema.key)} '
            f'({column_differences(found, expected)}). '
            f'Write to another table (table=...), or migrate or drop {table!r}.')


def column_differences(found: dict[str, str], expected: dict[str, str]) -> str:
    """What differs between two ``{column: type}``, in words, so a long column list need no diffing."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    retyped = {n: f'{found[n]} instead of {expected[n]}'
               for n in expected if n in found and found[n] != expected[n]}
    parts = [f'{label}: {value}' for label, value in
             (('missing', missing), ('unexpected', unexpected), ('other types', retyped)) if value]
    return '; '.join(parts) or 'same columns'


class _UpsertFn(beam.DoFn):
    """Upserts each batch in transactions of at most ``max_rows`` rows; yields each one's row count."""

    def __init__(self, schema: RecordSchema, target: SqlTarget, table: str, max_rows: int):
        self._schema = schema
        self._target = target
        self._max_rows = max_rows
        self._statement = upsert_sql(schema, table, target.dialect)
        self._written = Metrics.counter(METRICS_NAMESPACE, f'{table}_written')
        self._conn = None

    def setup(self):
        self._conn = connect(self._target)

    def process(self, batch: pa.RecordBatch) -> typing.Iterator[int]:
        batch = conform_batch(batch, self._schema)
        for offset, length in transaction_slices(batch.num_rows, self._max_rows):
            rows = sql_rows(batch.slice(offset, length), self._schema, self._target.dialect)
            upsert(self._conn, self._target.dialect, self._statement, rows)
            self._written.inc(length)
            yield length

    def teardown(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def read_sql_table(target: str, table: str) -> list[tuple]:
    """All rows of ``table``, sorted by its primary key, as Python values.

    Values come back as ``RecordBatch.to_pylist`` gives them: SQLite DATE text becomes a
    ``datetime.date`` and JSON text a list, so rows compare equal to the written batches. Sorted in
    Python, so the order does not depend on the database's collation.
    """
    sql_target = parse_sql_target(target)
    if sql_target is None:
        raise ValueError(f'target={target!r} is not a sqlite:/// or postgresql:// URL')
    conn = connect(sql_target)
    try:
        columns, key = table_columns(conn, sql_target.dialect, table)
        if not columns:
            raise ValueError(f'table {table!r} does not exist in {sql_target}')
        names = ', '.join(_quote(n) for n in columns)
        rows = conn.execute(f'SELECT {names} FROM {_quote(table)}').fetchall()
    finally:
        conn.close()
    if sql_target.dialect == 'sqlite':
        rows = [_decode_sqlite_row(row, list(columns.values())) for row in rows]
    positions = [list(columns).index(k) for k in key]
    return sorted((tuple(row) for row in rows), key=lambda row: tuple(row[p] for p in positions))


def _decode_sqlite_row(row: tuple, declared: list[str]) -> tuple:
    def decode(value, sql_type):
        if value is None:
            return None
        if sql_type == 'DATE':
            return datetime.date.fromisoformat(value)
        if sql_type == 'JSON':
            return json.loads(value)
        return value
    return tuple(decode(v, t) for v, t in zip(row, declared))


# ------------------------------------------------------------------------------------------------
# Parquet


def _join(base: str, *parts: str) -> str:
    # Skips '' (the unpartitioned directory) so no path ever holds '//'.
    return FileSystems.join(base, *[p for p in parts if p])


def partition_file(target: str, directory: str) -> str:
    return _join(target, directory, PART_FILE)


def _ensure_dir(path: str) -> None:
    """Creates directory ``path`` on filesystems that have directories (object stores have none)."""
    if not FileSystems.get_filesystem(path).has_dirs() or FileSystems.exists(path):
        return
    try:
        FileSystems.mkdirs(path)
    except IOError:
        if not FileSystems.exists(path):  # not just another worker creating it first
            raise


def write_parquet(table: pa.Table, path: str) -> None:
    with FileSystems.create(path, mime_type='application/vnd.apache.parquet',
                            compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        pq.write_table(table, handle, **_PARQUET_WRITE_OPTIONS,
                       sorting_columns=pq.SortingColumn.from_ordering(
                           table.schema, [(k, 'ascending') for k in _table_key(table)]))


def _table_key(table: pa.Table) -> list[str]:
    return json.loads(table.schema.metadata[_SCHEMA_METADATA_KEY])


def publish(temp_path: str, final_path: str) -> None:
    """Moves the finished ``temp_path`` to ``final_path``, replacing any file there.

    Renames over the old file first: local (POSIX) renames replace atomically and GCS copies
    overwrite, so a reader sees the old file or the new one, never none. Only a filesystem that
    refuses to overwrite gets the old file deleted first.
    """
    _ensure_dir(FileSystems.split(final_path)[0])
    try:
        FileSystems.rename([temp_path], [final_path])
    except BeamIOError:
        if not (FileSystems.exists(final_path) and FileSystems.exists(temp_path)):
            raise
        FileSystems.delete([final_path])
        FileSystems.rename([temp_path], [final_path])


def write_partition(batches: typing.Sequence[pa.RecordBatch], *, schema: RecordSchema, target: str,
                    directory: str, temp_dir: str) -> tuple[str, int]:
    """Writes one partition's rows as its single file; returns its path and row count.

    The temporary name is unique per attempt, so a retried or speculative duplicate never writes
    into a file another attempt is publishing; both publish the same bytes.
    """
    table = sort_partition(batches, schema, label=directory)
    temp_path = _join(temp_dir, f'{uuid.uuid4().hex}.parquet.tmp')
    write_parquet(table, temp_path)
    final_path = partition_file(target, directory)
    publish(temp_path, final_path)
    return final_path, table.num_rows


def remove_temp_dir(temp_dir: str) -> None:
    """Removes the temporary directory and whatever failed attempts left in it, if it exists."""
    if FileSystems.get_filesystem(temp_dir).has_dirs():
        if FileSystems.exists(temp_dir):
            FileSystems.delete([temp_dir])
    else:
        # Object stores: a trailing '/' deletes every object under the prefix (none is fine).
        FileSystems.delete([temp_dir.rstrip('/') + '/'])


class _SplitByPartitionFn(beam.DoFn):

    def __init__(self, schema: RecordSchema, partition_by: str | None, buckets: int | None):
        self._schema = schema
        self._partition_by = partition_by
        self._buckets = buckets

    def process(self, batch: pa.RecordBatch) -> typing.Iterator[tuple[str, pa.RecordBatch]]:
        yield from split_by_partition(conform_batch(batch, self._schema, keep_dictionaries=True),
                                      self._partition_by, self._buckets)


class _WritePartitionFn(beam.DoFn):

    def __init__(self, schema: RecordSchema, target: str, temp_dir: str):
        self._schema = schema
        self._target = target
        self._temp_dir = temp_dir
        self._rows = Metrics.counter(METRICS_NAMESPACE, f'{schema.name}_parquet_rows')
        self._files = Metrics.counter(METRICS_NAMESPACE, f'{schema.name}_parquet_files')

    def process(self, element: tuple[str, typing.Iterable[pa.RecordBatch]]) -> typing.Iterator[str]:
        directory, batches = element
        path, rows = write_partition(list(batches), schema=self._schema, target=self._target,
                                     directory=directory, temp_dir=self._temp_dir)
        self._rows.inc(rows)
        self._files.inc()
        yield path


class _FinalizeFn(beam.DoFn):
    """Runs once, after every partition is published (its side input): removes the temporary
    directory and emits the published paths, sorted."""

    def __init__(self, temp_dir: str):
        self._temp_dir = temp_dir

    def process(self, _, written: list[str]) -> typing.Iterator[str]:
        remove_temp_dir(self._temp_dir)
        yield from sorted(written)


def read_parquet_dataset(target: str) -> pa.Table:
    """Every ``part-*.parquet`` file of a dataset written by ``WriteKeyed``, as one table sorted by key.

    Hidden temporary directories are not read. Raises FileNotFoundError if there is no file: a wrong
    path must not look like an empty result.
    """
    patterns = [_join(target, 'part-*.parquet'), _join(target, '*', 'part-*.parquet')]
    paths = sorted(m.path for result in FileSystems.match(patterns) for m in result.metadata_list)
    if not paths:
        raise FileNotFoundError(f'no part-*.parquet file under {target!r}')
    tables = []
    for path in paths:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            with pq.ParquetFile(handle) as parquet_file:  # closed here, not on an Arrow thread at exit
                tables.append(parquet_file.read())
    table = pa.concat_tables(tables)
    return table.sort_by([(k, 'ascending') for k in _table_key(tables[0])])


# ------------------------------------------------------------------------------------------------
# The transform


@beam.typehints.with_input_types(pa.RecordBatch)
class WriteKeyed(beam.PTransform):
    """Writes Arrow batches of ``schema`` rows idempotently, keyed by ``schema.key``.

    Args (keyword-only):
        schema: the ``RecordSchema`` of the rows; its ``key`` is the upsert key / sort order.
        target: ``sqlite:///<file>``, ``postgresql://...`` (libpq URL) or a directory (local, gs://).
        table: SQL table name (default ``schema.name``); SQL targets only.
        partition_by: a non-nullable string, integer or date field; Parquet targets only.
        buckets: with ``partition_by``, hash its values into this many buckets (1 to 100_000).
        max_batch_rows: the most rows in one SQL transaction.

    Returns a PCollection of ``int`` (rows per committed transaction) for SQL targets, of ``str``
    (published file paths, emitted after the whole dataset is published) for Parquet targets.
    SQL: the table is created (or checked, ``ConfigError``) when this transform is applied.
    """

    def __init__(self, *, schema: RecordSchema, target: str, table: str | None = None,
                 partition_by: str | None = None, buckets: int | None = None,
                 max_batch_rows: int = 10_000):
        super().__init__()
        if not isinstance(schema, RecordSchema):
            raise ValueError(
                f'schema={schema!r} is not allowed: schema must be a transforms.schemas.RecordSchema')
        if not isinstance(target, str) or not target:
            raise ValueError(f'target={target!r} is not allowed: target must be a sqlite:///, '
                             'postgresql:// URL or a directory')
        check_positive_int('max_batch_rows', max_batch_rows)
        self._schema = schema
        self._target = target
        self._sql = parse_sql_target(target)
        self._max_batch_rows = max_batch_rows
        self._table = None
        self._partition_by = partition_by
        self._buckets = buckets
        if self._sql is not None:
            self._table = schema.name if table is None else table
            self._check_sql_config(partition_by, buckets)
        else:
            if table is not None:
                raise ValueError(f'table={table!r} is not allowed for directory target {target!r}: '
                                 'table applies to sqlite:/// and postgresql:// targets only')
            _check_directory_target(target)
            self._check_partitioning(partition_by, buckets)

    def _check_sql_config(self, partition_by, buckets) -> None:
        for name, value in (('partition_by', partition_by), ('buckets', buckets)):
            if value is not None:
                raise ValueError(f'{name}={value!r} is not allowed for SQL target {self._sql}: '
                                 f'{name} applies to Parquet directory targets only')
        if not isinstance(self._table, str) or not _IDENTIFIER.match(self._table):
            raise ValueError(f'table={self._table!r} is not allowed: table must be a SQL identifier '
                             '(letters, digits, _; not starting with a digit)')
        for f in self._schema.fields:
            if not _IDENTIFIER.match(f.name):
                raise ValueError(f'schema={self._schema.name!r}: field {f.name!r} is not a SQL identifier')
            if _sql_type(f.type, self._sql.dialect) is None:
                raise ValueError(
                    f'schema={self._schema.name!r}: field {f.name!r} has type {f.type}, which has no SQL '
                    'column type; allowed: string, float32/64, int8/16/32/64, date32, list<string>')

    def _check_partitioning(self, partition_by, buckets) -> None:
        if partition_by is not None:
            if partition_by not in self._schema.names:
                raise ValueError(f'partition_by={partition_by!r} is not allowed: it must be a field of '
                                 f'schema {self._schema.name!r}: {list(self._schema.names)}')
            field = self._schema.field(partition_by)
            if not _is_partitionable(field.type) or field.nullable:
                raise ValueError(
                    f'partition_by={partition_by!r} is not allowed: field type is {field.type}'
                    f'{" (nullable)" if field.nullable else ""}; it must be a non-nullable '
                    f'{_PARTITION_TYPES} field')
        if buckets is not None:
            if partition_by is None:
                raise ValueError(f'buckets={buckets!r} is not allowed without partition_by: '
                                 'name the field to hash into buckets')
            check_positive_int('buckets', buckets, MAX_BUCKETS)

    def expand(self, batches):
        if self._sql is not None:
            # At construction, on purpose: a wrong table must fail the launch, not the workers.
            ensure_table(self._sql, self._table, self._schema)
            return batches | 'Upsert' >> beam.ParDo(
                _UpsertFn(self._schema, self._sql, self._table, self._max_batch_rows)
            ).with_output_types(int)
        # One temporary directory per launch: concurrent runs never share one.
        temp_dir = _join(self._target, f'.tmp-{uuid.uuid4().hex}')
        written = (
            batches
            | 'SplitByPartition' >> beam.ParDo(
                _SplitByPartitionFn(self._schema, self._partition_by, self._buckets)
            ).with_output_types(typing.Tuple[str, pa.RecordBatch])
            | 'GroupByPartition' >> beam.GroupByKey()
            | 'WritePartition' >> beam.ParDo(
                _WritePartitionFn(self._schema, self._target, temp_dir)).with_output_types(str))
        return (
            batches.pipeline
            | 'Once' >> beam.Create([None])
            | 'Finalize' >> beam.ParDo(_FinalizeFn(temp_dir), beam.pvalue.AsList(written))
            .with_output_types(str))

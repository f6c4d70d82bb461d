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
  holds at most ``max_batch_rows`` rows (default 10,000); PostgreSQL loads them in bulk and retries
  transient failures (below); SQLite runs ``executemany`` in WAL mode with a busy timeout, so
  several local workers can write at once.
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
(it would break the key contract silently); in SQL a key repeated within one batch keeps the batch's
last row of it, but across batches the last upsert wins in an unspecified order, so de-duplicate
upstream (``transforms.deduplicate.DropDuplicateKeys``).

PostgreSQL writes
-----------------
Each transaction copies its rows (binary ``COPY``, encoded from the Arrow columns) into a temporary
staging table private to the worker's session and emptied at commit, then runs one
``INSERT ... SELECT ... ON CONFLICT (key) DO UPDATE`` into the table. A batch is sorted by key first
(the index is then written in order, and concurrent writers lock shared keys in the same order);
a key repeated in it keeps its last row, since one statement cannot update a row twice. Rows equal
to the stored ones are not rewritten: a rerun creates no dead rows. ``benchmarks/keyed_writes.py``
measures this against a raw ``COPY``.

Transient errors (``is_transient``: connection dropped or refused, server restart or shutdown,
deadlock, serialization failure, lock timeout, too many connections) close the session, wait, and
replay the whole transaction on a new session, at most ``retries`` times (default 3, so up to 4
attempts): replaying an upsert is harmless even if the lost transaction did commit. Retry ``n``
(from 0) waits a uniform random time up to ``min(10 s, retry_delay_s * 2 ** n)`` (exponential
backoff, full jitter: ``RetryPolicy``). The Beam counter ``<table>_write_retries`` counts them and
each is logged as a warning (table and error class). Any other error (credentials, missing table or
column, constraint violation, bad data) fails the bundle at once with ``SqlWriteError``, which names
the table, the error class and SQLSTATE, but no row value (the server's message is left out when it
may quote one) and no password.

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
bool            BOOLEAN              BOOLEAN (0 or 1)
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
``PGPASSWORD`` on the workers. Error messages and retry warnings show the URL with its password
masked. Row values are never logged.
"""
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import pathlib
import random
import re
import sqlite3
import time
import typing
import urllib.parse
import uuid

import apache_beam as beam
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from psycopg import sql

from transforms import arrow_coder  # noqa: F401  (registers the RecordBatch coder used between steps)
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.errors import ConfigError, HrbatchError
from transforms.schemas import RecordSchema
from transforms.params import check_positive_int

SQLITE_PREFIX = 'sqlite:///'
POSTGRESQL_PREFIX = 'postgresql://'
PART_FILE = 'part-00000.parquet'
MAX_BUCKETS = 100_000  # bucket numbers are written with 5 digits
_BUCKET_DIGITS = 5
# Long enough to outwait another worker's transaction of max_batch_rows rows.
_SQLITE_BUSY_TIMEOUT_S = 60.0
# Rows per SQL transaction. Measured on PostgreSQL (200,000 matches rows, the writer alone, best of 4):
# 10,000 -> 233k rows/s, 25,000 -> 240k, 50,000 -> 244k; through a whole pipeline the three are within
# noise. 10,000 amortises the commit, keeps a replayed transaction short, and its staging rows
# (~1.4 MB) stay well within PostgreSQL's default temp_buffers (8 MB), so staging never spills to disk.
DEFAULT_MAX_BATCH_ROWS = 10_000
_LOG = logging.getLogger(__name__)
_IDENTIFIER = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
_SCHEMA_METADATA_NAME = b'hrbatch.schema'
_SCHEMA_METADATA_KEY = b'hrbatch.key'

# Pinned writer settings: pyarrow's defaults may change between versions, and the bytes of a file
# must depend only on its rows. Parquet writes no timestamp; the footer names the pyarrow version.
_PARQUET_WRITE_OPTIONS = dict(
    version='2.6',
    compression='zstd',
    compression_level=3,
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


def bucket_dir(partition_by: str, bucket: int) -> str:
    """The directory of bucket number ``bucket`` of ``partition_by`` (see ``partition_dir``)."""
    return f'{partition_by}_bucket={bucket:0{_BUCKET_DIGITS}d}'


def partition_dir(partition_by: str | None, value, buckets: int | None = None) -> str:
    """The directory (relative to the target, '' if unpartitioned) of the partition of ``value``."""
    if partition_by is None:
        return ''
    text = partition_text(value)
    if buckets is not None:
        return bucket_dir(partition_by, bucket_of(text, buckets))
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


def _same_key_as_next(rows: pa.Table | pa.RecordBatch, key: tuple[str, ...]) -> np.ndarray:
    """For each row but the last: whether the next row has the same key (rows sorted by ``key``)."""
    n = rows.num_rows
    same = np.ones(max(n - 1, 0), dtype=bool)
    for name in key:
        column = rows.column(name)
        equal = pc.fill_null(pc.equal(column.slice(1), column.slice(0, n - 1)), False)
        same &= equal.to_numpy(zero_copy_only=False)
    return same


def in_key_order(rows: pa.Table | pa.RecordBatch, key: tuple[str, ...]) -> bool:
    """Whether ``rows`` are already sorted by ``key`` (equal keys allowed): one linear pass, so a
    writer given rows its producer already sorted skips the sort."""
    n = rows.num_rows
    undecided = np.ones(max(n - 1, 0), dtype=bool)  # pairs whose order the columns so far leave open
    for name in key:
        if not undecided.any():
            break
        column = rows.column(name)
        if column.null_count:
            return False  # the sort decides where nulls go
        before, after = column.slice(0, n - 1), column.slice(1)
        if (undecided & pc.greater(before, after).to_numpy(zero_copy_only=False)).any():
            return False
        undecided &= ~pc.less(before, after).to_numpy(zero_copy_only=False)
    return True


def duplicate_key_count(table: pa.Table, key: tuple[str, ...]) -> int:
    """How many rows of ``table`` (sorted by ``key``) repeat the key of the row before them."""
    if table.num_rows < 2:
        return 0
    return int(_same_key_as_next(table, key).sum())


def last_row_per_key(batch: pa.RecordBatch, key: tuple[str, ...]) -> pa.RecordBatch:
    """``batch`` sorted by ``key``, keeping only the last row (in input order) of a repeated key.

    The sort is stable, so the rows of one key stay in input order and the last one is the one a
    row-by-row upsert would have left.
    """
    ordered = batch.take(pc.sort_indices(batch, sort_keys=[(k, 'ascending') for k in key]))
    last = is_last_of_key(ordered, key)
    return ordered if last.all() else ordered.filter(pa.array(last))


def is_last_of_key(rows: pa.Table | pa.RecordBatch, key: tuple[str, ...]) -> np.ndarray:
    """For rows sorted by ``key``: whether each row is the last of its key."""
    if rows.num_rows < 2:
        return np.ones(rows.num_rows, dtype=bool)
    return np.append(~_same_key_as_next(rows, key), True)


def sort_partition(batches: typing.Sequence[pa.RecordBatch], schema: RecordSchema,
                   label: str = '') -> pa.Table:
    """The rows of ``batches`` (conformed to ``schema``) as one table sorted by key, in one chunk.

    One chunk, so the file layout cannot depend on how the rows arrived. Raises ValueError if a key
    appears twice; ``label`` (the partition) makes that message findable.
    """
    merged = pa.concat_batches([conform_batch(batch, schema) for batch in batches])
    if not in_key_order(merged, schema.key):
        merged = merged.take(pc.sort_indices(merged, sort_keys=[(k, 'ascending') for k in schema.key]))
    table = pa.Table.from_batches([merged])
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
    if pa.types.is_boolean(arrow_type):
        return 'BOOLEAN'
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
    return psycopg.connect(target.location, autocommit=True)


def upsert_sqlite(conn: sqlite3.Connection, statement: str, rows: list[tuple]) -> None:
    """Upserts ``rows`` into SQLite in one transaction (``statement`` from ``upsert_sql``)."""
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


# ------------------------------------------------------------------------------------------------
# PostgreSQL: binary COPY of Arrow columns into a staging table, then one INSERT ... ON CONFLICT

# COPY ... (FORMAT BINARY): signature, flags (no OIDs), header extension length; then one tuple
# per row (field count, then each field as its length and big-endian bytes, -1 for NULL); then -1.
PGCOPY_HEADER = b'PGCOPY\n\xff\r\n\x00' + bytes(4) + bytes(4)
PGCOPY_TRAILER = b'\xff\xff'
_PG_NULL = pa.scalar(b'\xff\xff\xff\xff', pa.binary())
_PG_DATE_EPOCH = 10_957  # 2000-01-01, PostgreSQL's day 0, in days since 1970-01-01
_PG_TEXT_OID = 25
# Rows encoded at once: the encoded rows of one call share one Arrow binary array (2 GiB at most).
_COPY_CHUNK_ROWS = 32_768


def _as_binary(fixed: np.ndarray) -> pa.Array:
    """The rows of a 2-D uint8 array as binary values."""
    rows, width = fixed.shape
    buffer = pa.py_buffer(np.ascontiguousarray(fixed))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), rows, [None, buffer]).cast(pa.binary())


def _big_endian(column: pa.Array, dtype: str) -> np.ndarray:
    """The values as a big-endian numpy array; nulls as 0 (their fields become NULL)."""
    return np.ascontiguousarray(pc.fill_null(column, 0).to_numpy(zero_copy_only=False), dtype=dtype)


def _null_where_missing(fields: pa.Array, column: pa.Array) -> pa.Array:
    if column.null_count == 0:
        return fields
    return pc.if_else(column.is_valid(), fields, _PG_NULL)


def _fixed_width_fields(values: np.ndarray, column: pa.Array) -> pa.Array:
    width = values.dtype.itemsize
    framed = np.empty((len(values), 4 + width), dtype=np.uint8)
    framed[:, :4] = np.frombuffer(width.to_bytes(4, 'big'), dtype=np.uint8)
    framed[:, 4:] = values.view(np.uint8).reshape(len(values), width)
    return _null_where_missing(_as_binary(framed), column)


def _length_prefixed(lengths: np.ndarray, payloads: pa.Array) -> pa.Array:
    prefixes = _as_binary(np.ascontiguousarray(lengths, dtype='>i4').view(np.uint8).reshape(-1, 4))
    return pc.binary_join_element_wise(prefixes, payloads, b'')


def _text_fields(column: pa.Array) -> pa.Array:
    data = column.cast(pa.binary())  # UTF-8 already: PostgreSQL's text receive format
    fields = _length_prefixed(_big_endian(pc.binary_length(data), '>i4'), data)
    return pc.fill_null(fields, _PG_NULL) if column.null_count else fields


def _text_array_fields(column: pa.Array) -> pa.Array:
    """``list<string>`` as one-dimensional ``text[]`` (array_recv's format), all columnar."""
    offsets = column.offsets.to_numpy().astype(np.int64)  # this slice's, into the whole child
    first = int(offsets[0])
    offsets -= first
    elements = column.values.slice(first, int(offsets[-1]))
    # Each row's elements, encoded like text fields (a null element too) and concatenated.
    bodies = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), _text_fields(elements)), b'')
    nulls_before = np.concatenate([[0], np.cumsum(elements.is_null().to_numpy(zero_copy_only=False))])
    header = np.empty((len(column), 6), dtype='>i4')
    header[:, 0] = 20 + _big_endian(pc.binary_length(bodies), np.int64)  # field length
    header[:, 1] = 1  # dimensions (an empty array is a dimension of length 0)
    header[:, 2] = nulls_before[offsets[1:]] > nulls_before[offsets[:-1]]  # has nulls
    header[:, 3] = _PG_TEXT_OID  # element type
    header[:, 4] = np.diff(offsets)  # dimension length
    header[:, 5] = 1  # lower bound
    fields = pc.binary_join_element_wise(_as_binary(header.view(np.uint8).reshape(-1, 24)), bodies, b'')
    return _null_where_missing(fields, column)


def _copy_fields(column: pa.Array, arrow_type: pa.DataType) -> pa.Array:
    """Each value of ``column`` (of ``arrow_type``) as a binary COPY field of its ``_sql_type``."""
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return _text_fields(column)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _text_array_fields(column)
    if pa.types.is_date32(arrow_type):
        days = _big_endian(column.cast(pa.int32()), np.int64) - _PG_DATE_EPOCH
        return _fixed_width_fields(days.astype('>i4'), column)
    if pa.types.is_boolean(arrow_type):
        return _fixed_width_fields(_big_endian(pc.fill_null(column, False).cast(pa.uint8()), 'u1'), column)
    if pa.types.is_float64(arrow_type):
        dtype = '>f8'
    elif pa.types.is_float32(arrow_type):
        dtype = '>f4'
    elif pa.types.is_int64(arrow_type):
        dtype = '>i8'
    elif pa.types.is_int32(arrow_type) or pa.types.is_int16(arrow_type) or pa.types.is_int8(arrow_type):
        dtype = '>i4'  # INTEGER
    else:
        raise ValueError(f'no binary COPY encoding for Arrow type {arrow_type}')
    return _fixed_width_fields(_big_endian(column, dtype), column)


def binary_copy_rows(batch: pa.RecordBatch, schema: RecordSchema) -> pa.Buffer:
    """The rows of ``batch`` (conformed to ``schema``) as PostgreSQL binary COPY tuples.

    Written between ``PGCOPY_HEADER`` and ``PGCOPY_TRAILER``, they load into columns of the types
    ``create_table_sql`` declares. Built with Arrow and numpy kernels, never one Python object
    per value: a COPY of them runs ~1.3 times as fast as with psycopg's binary ``write_row``, twice
    as fast as with its text one (benchmarks/keyed_writes.py).
    """
    if batch.num_rows == 0:
        return pa.py_buffer(b'')
    fields = [_copy_fields(batch.column(f.name), f.type) for f in schema.fields]
    field_count = pa.scalar(len(fields).to_bytes(2, 'big'), pa.binary())
    rows = pc.binary_join_element_wise(field_count, *fields, b'')
    _, offsets, data = rows.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int32, count=len(rows) + 1, offset=rows.offset * 4)
    return data[int(bounds[0]):int(bounds[-1])]


def _identifiers(names: typing.Iterable[str]) -> sql.Composed:
    return sql.SQL(', ').join(sql.Identifier(n) for n in names)


def staging_table_name(schema: RecordSchema, table: str) -> str:
    """The staging table's name: one per target table and column list.

    The '-' keeps it apart from every target (table names are checked against _IDENTIFIER). The
    digest keeps stagings of different tables apart should two writers ever share a server session
    (a pooler such as PgBouncer in transaction mode hands sessions from client to client).
    """
    layout = json.dumps([table, list(expected_columns(schema, 'postgresql').items())])
    return f'hrbatch-staging-{hashlib.blake2b(layout.encode(), digest_size=8).hexdigest()}'


def staging_table_sql(schema: RecordSchema, table: str) -> sql.Composed:
    """Creates the session's staging table unless it exists: the target's columns, emptied at commit.

    Run in every transaction, not once per session, so it is there even when a pooler gives the
    transaction a server session of its own; when it exists this is one catalog lookup.
    """
    return sql.SQL('CREATE TEMPORARY TABLE IF NOT EXISTS {staging} (LIKE {table} INCLUDING DEFAULTS) '
                   'ON COMMIT DELETE ROWS').format(staging=sql.Identifier(staging_table_name(schema, table)),
                                                   table=sql.Identifier(table))


def copy_to_staging_sql(schema: RecordSchema, table: str) -> sql.Composed:
    return sql.SQL('COPY {staging} ({columns}) FROM STDIN (FORMAT BINARY)').format(
        staging=sql.Identifier('pg_temp', staging_table_name(schema, table)), columns=_identifiers(schema.names))


def copy_to_table_sql(schema: RecordSchema, table: str) -> sql.Composed:
    return sql.SQL('COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)').format(
        table=sql.Identifier(table), columns=_identifiers(schema.names))


def staged_upsert_sql(schema: RecordSchema, table: str) -> sql.Composed:
    """One ``INSERT ... SELECT`` of the staging rows, ``ON CONFLICT (key)`` updating the other columns.

    Rows equal to the stored ones are left alone (``WHERE ... IS DISTINCT FROM``): a rerun writes
    no new row versions, hence no table bloat and little WAL. (PostgreSQL compares floats by value,
    so 0.0 does not replace a stored -0.0.)
    """
    others = [n for n in schema.names if n not in schema.key]
    action = sql.SQL('DO NOTHING')
    if others:
        action = sql.SQL('DO UPDATE SET {assignments} WHERE ROW({stored}) IS DISTINCT FROM ROW({new})').format(
            assignments=sql.SQL(', ').join(
                sql.SQL('{0} = excluded.{0}').format(sql.Identifier(n)) for n in others),
            stored=sql.SQL(', ').join(sql.Identifier(table, n) for n in others),
            new=sql.SQL(', ').join(sql.Identifier('excluded', n) for n in others))
    return sql.SQL('INSERT INTO {table} ({columns}) SELECT {columns} FROM {staging} '
                   'ON CONFLICT ({key}) {action}').format(
        table=sql.Identifier(table), columns=_identifiers(schema.names),
        staging=sql.Identifier('pg_temp', staging_table_name(schema, table)), key=_identifiers(schema.key),
        action=action)


# ------------------------------------------------------------------------------------------------
# PostgreSQL: which errors are retried, and how

DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAY_S = 0.5
RETRY_FACTOR = 2.0
RETRY_CAP_S = 10.0
MAX_RETRIES = 20

# Errors that a new attempt on a new session can get past. Class 08 (connection exception) is
# transient too, but for protocol violations (08P01), which are bugs.
TRANSIENT_SQLSTATES = frozenset({
    '40001',  # serialization_failure
    '40P01',  # deadlock_detected
    '40003',  # statement_completion_unknown
    '55P03',  # lock_not_available
    '53300',  # too_many_connections: others disconnect
    '57P01',  # admin_shutdown: the server stops or restarts (pg_ctl -m fast, failover)
    '57P02',  # crash_shutdown: another backend crashed, the server restarts
    '57P03',  # cannot_connect_now: starting up, shutting down, in recovery
    '57P05',  # idle_session_timeout
    '25P03',  # idle_in_transaction_session_timeout
})
# SQLSTATE classes whose server messages name objects (tables, columns, constraints, users), never
# row values. Others (22 data exception, P0 raised by a trigger, XX internal...) may quote values.
_MESSAGE_SAFE_CLASSES = frozenset({'08', '0A', '21', '23', '25', '28', '3D', '3F', '40', '42', '53', '54', '55', '57'})


def is_transient(error: BaseException, *, connecting: bool = False) -> bool:
    """Whether ``error`` may not happen again on a new session, so the transaction is worth a retry.

    ``connecting``: raised while opening the session, before it was established.
    """
    if not isinstance(error, psycopg.Error):
        return False  # not the database: a bug or bad input, which a retry would only repeat
    sqlstate = error.sqlstate
    if sqlstate:
        return sqlstate in TRANSIENT_SQLSTATES or (sqlstate.startswith('08') and sqlstate != '08P01')
    if not isinstance(error, psycopg.OperationalError):
        return False
    if connecting:
        # libpq reports a failed connection without a SQLSTATE. A server that rejects the user,
        # the password or the database has asked for, or been sent, the password; a server that
        # is down, restarting or still starting up has not.
        pgconn = error.pgconn
        return not (pgconn is not None and (pgconn.needs_password or pgconn.used_password))
    return True  # an established session broke: server restart, network, terminated backend


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter.

    Retry ``n`` (0 for the first) waits a uniform random time in ``[0, ceiling(n)]``, where
    ``ceiling(n) = min(cap_s, base_s * factor ** n)``: workers that failed together do not all
    come back at the same instant.
    """
    retries: int = DEFAULT_RETRIES
    base_s: float = DEFAULT_RETRY_DELAY_S
    factor: float = RETRY_FACTOR
    cap_s: float = RETRY_CAP_S

    def ceiling(self, retry: int) -> float:
        return min(self.cap_s, self.base_s * self.factor ** retry)

    def delay(self, retry: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.ceiling(retry))


_T = typing.TypeVar('_T')


def call_with_retries(action: typing.Callable[[], _T], *, policy: RetryPolicy,
                      is_transient: typing.Callable[[BaseException], bool],
                      before_retry: typing.Callable[[BaseException], None] = lambda error: None,
                      sleep: typing.Callable[[float], None] = time.sleep,
                      rng: random.Random | None = None) -> _T:
    """``action()``; after a transient error, ``before_retry``, a backoff sleep and another call.

    At most ``policy.retries`` retries. The last error, or the first that is not transient, is
    raised as it is.
    """
    rng = random.Random() if rng is None else rng
    for retry in itertools.count():
        try:
            return action()
        except Exception as error:
            if retry >= policy.retries or not is_transient(error):
                raise
            before_retry(error)
            sleep(policy.delay(retry, rng))
    raise AssertionError('unreachable')


class SqlWriteError(HrbatchError):
    """A SQL write failed for good. The message names the table and the error, never row values."""


def describe_sql_error(error: BaseException) -> str:
    """The error's class and SQLSTATE, and the server's message only where it cannot quote rows."""
    name = type(error).__name__
    sqlstate = getattr(error, 'sqlstate', None)
    if not sqlstate:
        # From libpq or psycopg, not the server: about the connection or the driver, not rows.
        return f'{name}: {" ".join(str(error).split())}'
    diag = error.diag
    parts = [f'{name} (SQLSTATE {sqlstate})']
    parts += [f'{label} {value!r}' for label, value in (
        ('column', diag.column_name), ('constraint', diag.constraint_name), ('type', diag.datatype_name))
        if value]
    if sqlstate[:2] in _MESSAGE_SAFE_CLASSES and diag.message_primary:
        parts.append(f'"{diag.message_primary}"')
    else:
        parts.append('(server message withheld: it may quote row values)')
    return ', '.join(parts)


def _hint(error: BaseException, *, connecting: bool) -> str:
    sqlstate = getattr(error, 'sqlstate', None) or ''
    if sqlstate.startswith('28') or sqlstate == '3D000' or (connecting and not sqlstate):
        return ('check the user, the password (prefer PGPASSFILE or PGPASSWORD on the workers) and '
                'the database name')
    if sqlstate in ('42P01', '42703', '42804'):
        return 'the table was dropped or changed while the pipeline ran; compare it with the schema'
    if sqlstate.startswith('23'):
        return 'a row breaks a constraint of the table; only the constraint is named here'
    if sqlstate.startswith('22'):
        return 'a value does not fit its column; only the column is named here'
    return 'see the database server log'


def _scrub(message: str, location: str) -> str:
    """``message`` without the URL's password, should a driver message ever echo it."""
    password = psycopg.conninfo.conninfo_to_dict(location).get('password')
    return message.replace(password, '***') if password else message


class PostgresUpserter:
    """Upserts conformed batches into one PostgreSQL table, on a session of its own.

    ``write`` runs one transaction: binary ``COPY`` of the rows into a temporary staging table (the
    session's own, emptied at commit), then one ``INSERT ... SELECT ... ON CONFLICT (key) DO
    UPDATE``. Until a key is found already stored, it first tries a plain ``COPY`` into the table
    in a savepoint (a first load is then as fast as a bulk load). A transient error (``is_transient``) closes the session and, after a backoff sleep,
    replays the whole transaction on a new one: upserts are idempotent, so a transaction that did
    commit before the connection dropped does no harm when replayed. Any other database error, or a
    transient one after ``policy.retries`` retries, raises ``SqlWriteError`` naming the table and the
    error, never row values nor the password. ``on_retry`` is called once per retry.
    """

    def __init__(self, target: SqlTarget, table: str, schema: RecordSchema, *,
                 policy: RetryPolicy = RetryPolicy(), on_retry: typing.Callable[[], None] = lambda: None,
                 sleep: typing.Callable[[float], None] = time.sleep, rng: random.Random | None = None):
        self._target = target
        self._table = table
        self._schema = schema
        self._policy = policy
        self._on_retry = on_retry
        self._sleep = sleep
        # Unseeded by default: workers that failed together must not draw the same delays.
        self._rng = random.Random() if rng is None else rng
        self._staging = staging_table_sql(schema, table)
        self._copy = copy_to_staging_sql(schema, table)
        self._upsert = staged_upsert_sql(schema, table)
        self._copy_direct = copy_to_table_sql(schema, table)
        self._insert_first = True
        self._conn = None

    def open(self) -> None:
        """Opens the session now, so a wrong password or database fails before any row is read."""
        self._run(self._session, rows=None)

    def write(self, batch: pa.RecordBatch) -> None:
        """Upserts ``batch`` (conformed, each key once) in one transaction."""
        chunks = [binary_copy_rows(batch.slice(offset, length), self._schema)
                  for offset, length in transaction_slices(batch.num_rows, _COPY_CHUNK_ROWS)]
        self._run(lambda: self._transaction(chunks), rows=batch.num_rows)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _session(self) -> psycopg.Connection:
        if self._conn is not None and (self._conn.closed or self._conn.broken):
            self.close()
        if self._conn is None:
            self._conn = psycopg.connect(self._target.location, autocommit=True)
        return self._conn

    def _transaction(self, chunks: list[pa.Buffer]) -> None:
        conn = self._session()
        with conn.transaction(), conn.cursor() as cursor:
            if self._insert_first:
                # New keys (a first load) go straight in with COPY, about twice as fast as the
                # upsert. A key already stored aborts only this savepoint: the batch is then
                # upserted, and so is every later batch of this writer (the table holds its keys).
                try:
                    with conn.transaction():
                        self._copy_rows(cursor, self._copy_direct, chunks)
                    return
                except psycopg.errors.UniqueViolation:
                    self._insert_first = False
            cursor.execute(self._staging)
            self._copy_rows(cursor, self._copy, chunks)
            cursor.execute(self._upsert)

    @staticmethod
    def _copy_rows(cursor, statement, chunks: list[pa.Buffer]) -> None:
        with cursor.copy(statement) as copy:
            copy.write(PGCOPY_HEADER)
            for chunk in chunks:
                copy.write(chunk)
            copy.write(PGCOPY_TRAILER)

    def _is_transient(self, error: BaseException) -> bool:
        # The session is set as soon as it is established: an error with none was raised connecting.
        return is_transient(error, connecting=self._conn is None)

    def _before_retry(self, error: BaseException) -> None:
        _LOG.warning('PostgreSQL table %r of %s: transient %s; retrying the transaction on a new session',
                     self._table, self._target, _scrub(describe_sql_error(error), self._target.location))
        self.close()
        self._on_retry()

    def _run(self, action: typing.Callable[[], None], rows: int | None) -> None:
        try:
            call_with_retries(action, policy=self._policy, is_transient=self._is_transient,
                              before_retry=self._before_retry, sleep=self._sleep, rng=self._rng)
            return
        except psycopg.Error as error:
            if self._is_transient(error):
                outcome = (f'failed after {self._policy.retries + 1} attempts ({self._policy.retries} '
                           'retries with backoff): the server stayed unavailable; rerun later, or raise '
                           'retries= or retry_delay_s= to outwait longer outages')
            else:
                outcome = f'failed, not retried ({_hint(error, connecting=self._conn is None)})'
            task = (f'upserting {rows} rows into table {self._table!r}' if rows is not None
                    else f'connecting to write table {self._table!r}')
            message = _scrub(f'{task} of {self._target} {outcome}: {describe_sql_error(error)}',
                             self._target.location)
        self.close()
        # Raised outside the except block, so the driver's exception is not even attached as the
        # context: its DETAIL and CONTEXT may quote row values, its connection holds the password.
        raise SqlWriteError(message)


class _UpsertFn(beam.DoFn):
    """Upserts each batch in transactions of at most ``max_rows`` rows; yields each one's row count.

    PostgreSQL: bulk transactions with retries (``PostgresUpserter``); SQLite: ``executemany``.
    """

    def __init__(self, schema: RecordSchema, target: SqlTarget, table: str, max_rows: int, *,
                 retries: int = DEFAULT_RETRIES, retry_delay_s: float = DEFAULT_RETRY_DELAY_S):
        self._schema = schema
        self._target = target
        self._table = table
        self._max_rows = max_rows
        self._policy = RetryPolicy(retries=retries, base_s=retry_delay_s)
        self._statement = upsert_sql(schema, table, target.dialect)
        self._written = Metrics.counter(METRICS_NAMESPACE, f'{table}_written')
        self._retries = Metrics.counter(METRICS_NAMESPACE, f'{table}_write_retries')
        self._unreported_retries = 0
        self._conn = None
        self._postgres = None

    def setup(self):
        if self._target.dialect == 'postgresql':
            self._postgres = PostgresUpserter(self._target, self._table, self._schema, policy=self._policy,
                                              on_retry=self._count_retry)
            self._postgres.open()
        else:
            self._conn = connect(self._target)

    def _count_retry(self):
        # Counted here and reported from process(): Beam drops counter updates made in setup().
        self._unreported_retries += 1

    def _report_retries(self):
        if self._unreported_retries:
            self._retries.inc(self._unreported_retries)
            self._unreported_retries = 0

    def process(self, batch: pa.RecordBatch) -> typing.Iterator[int]:
        batch = conform_batch(batch, self._schema)
        if self._postgres is not None:
            # One INSERT ... ON CONFLICT cannot update a row twice: a key repeated in the batch keeps
            # its last row, as row-by-row upserts would. Sorted by key, the rows also reach the index
            # in order (faster), and concurrent writers lock shared keys in one order (no deadlock).
            batch = last_row_per_key(batch, self._schema.key)
        self._report_retries()
        for offset, length in transaction_slices(batch.num_rows, self._max_rows):
            rows = batch.slice(offset, length)
            if self._postgres is not None:
                try:
                    self._postgres.write(rows)
                finally:
                    self._report_retries()
            else:
                upsert_sqlite(self._conn, self._statement, sql_rows(rows, self._schema, 'sqlite'))
            self._written.inc(length)
            yield length

    def teardown(self):
        if self._postgres is not None:
            self._postgres.close()
            self._postgres = None
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
        pq.write_table(table, handle, **_PARQUET_WRITE_OPTIONS, use_dictionary=dictionary_columns(table),
                       sorting_columns=pq.SortingColumn.from_ordering(
                           table.schema, [(k, 'ascending') for k in _table_key(table)]))


_DICTIONARY_SAMPLE_ROWS = 16_384


def dictionary_columns(table: pa.Table) -> list[str]:
    """The text columns worth a Parquet dictionary: those whose first rows repeat (at most half of
    them distinct). Numbers rarely repeat enough, and trying a dictionary on unique values (ids,
    e-mails, NIRs) before falling back costs more than the rest of the write. Decided from the rows
    alone, so a file's bytes still depend only on its rows."""
    chosen = []
    for field in table.schema:
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            sample = table.column(field.name).slice(0, _DICTIONARY_SAMPLE_ROWS)
            if pc.count_distinct(sample).as_py() * 2 <= max(len(sample), 1):
                chosen.append(field.name)
    return chosen


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
        if isinstance(batches, pa.Table):  # from WritePartitions: not conformed by a split step yet
            batches = [conform_batch(b, self._schema, keep_dictionaries=True) for b in batches.to_batches()]
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


def _check_retries(retries, retry_delay_s) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f'retries={retries!r} is not allowed: retries must be an integer from 0 (no retry) '
                         f'to {MAX_RETRIES}')
    number = isinstance(retry_delay_s, (int, float)) and not isinstance(retry_delay_s, bool)
    if not number or not 0 < retry_delay_s <= RETRY_CAP_S:
        raise ValueError(f'retry_delay_s={retry_delay_s!r} is not allowed: retry_delay_s must be a number of '
                         f'seconds over 0 and at most {RETRY_CAP_S:g}')


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
        retries: PostgreSQL only: how many times a transaction that failed with a transient error
            (dropped connection, server restart, deadlock, serialization failure) is replayed on a
            new connection, 0 to 20; ``retries=3`` is at most 4 attempts.
        retry_delay_s: PostgreSQL only: the most the first retry waits, in seconds (over 0, at
            most 10); each further retry waits up to twice as long, at most 10 s (full jitter).

    Returns a PCollection of ``int`` (rows per committed transaction) for SQL targets, of ``str``
    (published file paths, emitted after the whole dataset is published) for Parquet targets.
    SQL: the table is created (or checked, ``ConfigError``) when this transform is applied.
    """

    def __init__(self, *, schema: RecordSchema, target: str, table: str | None = None,
                 partition_by: str | None = None, buckets: int | None = None,
                 max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, retries: int = DEFAULT_RETRIES,
                 retry_delay_s: float = DEFAULT_RETRY_DELAY_S):
        super().__init__()
        if not isinstance(schema, RecordSchema):
            raise ValueError(
                f'schema={schema!r} is not allowed: schema must be a transforms.schemas.RecordSchema')
        if not isinstance(target, str) or not target:
            raise ValueError(f'target={target!r} is not allowed: target must be a sqlite:///, '
                             'postgresql:// URL or a directory')
        check_positive_int('max_batch_rows', max_batch_rows)
        _check_retries(retries, retry_delay_s)
        self._schema = schema
        self._retries = retries
        self._retry_delay_s = retry_delay_s
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
                    'column type; allowed: string, float32/64, int8/16/32/64, date32, bool, list<string>')

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
                _UpsertFn(self._schema, self._sql, self._table, self._max_batch_rows,
                          retries=self._retries, retry_delay_s=self._retry_delay_s)
            ).with_output_types(int)
        return (
            batches
            | 'SplitByPartition' >> beam.ParDo(
                _SplitByPartitionFn(self._schema, self._partition_by, self._buckets)
            ).with_output_types(typing.Tuple[str, pa.RecordBatch])
            | 'GroupByPartition' >> beam.GroupByKey()
            | 'Publish' >> WritePartitions(schema=self._schema, target=self._target))


class WritePartitions(beam.PTransform):
    """The Parquet half of ``WriteKeyed`` for rows already grouped by partition: takes
    ``(partition directory, RecordBatches or a Table)``, each directory exactly once, and writes and
    publishes each as its single file, sorted by key, with no shuffle. For a pipeline that computes
    its rows partition by partition (``transforms.routing``; name them with ``bucket_dir``). Returns the published paths once all are published.
    """

    def __init__(self, *, schema: RecordSchema, target: str):
        super().__init__()
        self._schema = schema
        self._target = target

    def expand(self, partitions):
        # One temporary directory per launch: concurrent runs never share one.
        temp_dir = _join(self._target, f'.tmp-{uuid.uuid4().hex}')
        # Any input type: a multi-output step's main output is typed as a union with its tagged outputs.
        written = partitions | 'WritePartition' >> beam.ParDo(
            _WritePartitionFn(self._schema, self._target, temp_dir)).with_input_types(typing.Any).with_output_types(str)
        return (
            partitions.pipeline
            | 'Once' >> beam.Create([None])
            | 'Finalize' >> beam.ParDo(_FinalizeFn(temp_dir), beam.pvalue.AsList(written))
            .with_output_types(str))

import datetime
import json
import math
import pathlib
import random
import sqlite3
import struct
import tempfile
import uuid

import apache_beam as beam
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from transforms import keyed_write
from transforms import schemas
from transforms.errors import ConfigError
from transforms.keyed_write import WriteKeyed
from transforms.keyed_write import read_parquet_dataset
from transforms.keyed_write import read_sql_table

MATCHES = schemas.MATCHES
# Partition values that are not filename-safe as they are.
_OFFERS = ('O-001', 'O/2 été', 'O=3%')


# ------------------------------------------------------------------------------------------------
# Test data


def match_rows(n: int, *, score_shift: float = 0.0) -> list[dict]:
    """``n`` distinct matches over a few offers; float values are exact in float32."""
    rows = []
    for i in range(n):
        score = ((i * 37) % 64) / 64 + score_shift
        rows.append({
            'offer_id': _OFFERS[i % len(_OFFERS)],
            'candidate_id': f'C{(i * 7919) % 100_003:06d}',
            'score': score,
            'rank': None if i % 4 == 0 else i,
            **{f'score_{c}': ((i + j) % 8) / 8 for j, c in enumerate(schemas.SCORE_COMPONENTS)},
            'distance_km': float(i % 50) * 0.5,
            'weights': json.dumps({'required_skills': 0.5}),
        })
    return rows


def to_batch(rows: list[dict], schema: schemas.RecordSchema = MATCHES) -> pa.RecordBatch:
    """The rows as a batch with reader metadata columns, which WriteKeyed must drop."""
    batch = pa.RecordBatch.from_pylist(rows, schema=schema.arrow_schema())
    return batch.append_column('_source', pa.array(['in.csv'] * len(rows))).append_column(
        '_row', pa.array(range(len(rows)), pa.int64()))


def split(batch: pa.RecordBatch, sizes: list[int]) -> list[pa.RecordBatch]:
    """``batch`` cut into consecutive slices of the given sizes (cycled)."""
    out, offset, i = [], 0, 0
    while offset < batch.num_rows:
        size = sizes[i % len(sizes)]
        out.append(batch.slice(offset, size))
        offset, i = offset + size, i + 1
    return out


def as_tuples(rows: list[dict], schema: schemas.RecordSchema = MATCHES) -> list[tuple]:
    return sorted((tuple(r[n] for n in schema.names) for r in rows),
                  key=lambda t: tuple(t[schema.names.index(k)] for k in schema.key))


def counter(result, name: str) -> int:
    counters = result.metrics().query(MetricsFilter().with_namespace('hrbatch').with_name(name))['counters']
    return sum(c.committed for c in counters)


def run_write(test_pipeline, batches, *extra_args, expected_output=None, **config):
    """Runs ``WriteKeyed(**config)`` on ``batches``, asserting its output if ``expected_output``."""
    with test_pipeline(*extra_args) as p:
        written = p | 'Batches' >> beam.Create(batches) | 'Write' >> WriteKeyed(**config)
        if expected_output is not None:
            assert_that(written, equal_to(expected_output), label='ExpectedOutput')
    return p.result


# ------------------------------------------------------------------------------------------------
# SQL: SQLite and a real PostgreSQL


@pytest.fixture(params=['sqlite', 'postgresql'])
def sql_target(request, tmp_path) -> str:
    if request.param == 'sqlite':
        return f'sqlite:///{tmp_path}/hr.db'
    return request.getfixturevalue('postgres_url')


def unique_table() -> str:
    # The PostgreSQL database is shared by the session: one table per test.
    return f'matches_{uuid.uuid4().hex[:10]}'


def test_sql_rows_equal_input_whatever_the_batching_and_twice_is_once(test_pipeline, sql_target):
    table = unique_table()
    rows = match_rows(40)
    config = dict(schema=MATCHES, target=sql_target, table=table, max_batch_rows=4)

    with test_pipeline() as p:
        counts = p | 'Batches' >> beam.Create([to_batch(rows)]) | 'Write' >> WriteKeyed(**config)
        assert_that(counts, equal_to([4] * 10), label='TransactionsOfFour')
    first = read_sql_table(sql_target, table)
    assert first == as_tuples(rows)
    assert counter(p.result, f'{table}_written') == 40

    with test_pipeline() as p:
        counts = (p | 'Batches' >> beam.Create(split(to_batch(rows), [1, 7, 3, 11]))
                  | 'Write' >> WriteKeyed(**config))
        assert_that(counts | beam.CombineGlobally(sum), equal_to([40]), label='AllRowsWritten')
    assert read_sql_table(sql_target, table) == first


def test_sql_update_replaces_the_row(test_pipeline, sql_target):
    table = unique_table()
    rows = match_rows(12)
    config = dict(schema=MATCHES, target=sql_target, table=table)
    with test_pipeline() as p:
        _ = p | 'Batches' >> beam.Create([to_batch(rows)]) | 'Write' >> WriteKeyed(**config)
    updated = [dict(rows[5], score=0.125, rank=None)]
    with test_pipeline() as p:
        _ = p | 'Batches' >> beam.Create([to_batch(updated)]) | 'Write' >> WriteKeyed(**config)
    assert read_sql_table(sql_target, table) == as_tuples(rows[:5] + updated + rows[6:])


def test_sql_lists_dates_and_doubles_round_trip(sql_target):
    # Called directly (no pipeline): the CANDIDATES types are what matter here.
    schema = schemas.CANDIDATES
    table = f'candidates_{uuid.uuid4().hex[:10]}'
    rows = [
        {'candidate_id': f'K{i}', 'first_name': 'Zoé', 'last_name': "O'Neil", 'email': f'k{i}@example.fr',
         'phone': f'+3378912345{i}' if i % 2 else None, 'postcode': '69001', 'city': 'Lyon', 'latitude': 45.764043, 'longitude': 4.835659,
         'skills': [f'skill-{j}' for j in range(i)], 'years_experience': 2.5, 'expected_salary': 42_000.0,
         'contract_types': ['CDI', 'CDD'][: i % 3], 'languages': ['fr'],
         'last_contact_date': datetime.date(2024, 2, i + 1)}
        for i in range(4)]
    target = keyed_write.parse_sql_target(sql_target)
    keyed_write.ensure_table(target, table, schema)
    fn = keyed_write._UpsertFn(schema, target, table, max_rows=3)
    fn.setup()
    try:
        assert list(fn.process(to_batch(rows, schema))) == [3, 1]
    finally:
        fn.teardown()
    assert read_sql_table(sql_target, table) == as_tuples(rows, schema)


def test_sql_existing_table_with_other_columns_fails_at_construction(test_pipeline, sql_target):
    table = unique_table()
    if sql_target.startswith('sqlite'):
        with sqlite3.connect(sql_target.removeprefix('sqlite:///')) as conn:
            conn.execute(f'CREATE TABLE {table} (offer_id TEXT PRIMARY KEY, score REAL)')
    else:
        with psycopg.connect(sql_target, autocommit=True) as conn:
            conn.execute(f'CREATE TABLE {table} (offer_id TEXT PRIMARY KEY, score REAL)')
    with pytest.raises(ConfigError) as raised:
        with test_pipeline() as p:
            _ = p | beam.Create([to_batch(match_rows(1))]) | WriteKeyed(schema=MATCHES, target=sql_target,
                                                                          table=table)
    message = str(raised.value)
    assert table in message and "'score': 'REAL'" in message and "'candidate_id': 'TEXT'" in message
    if sql_target.startswith('postgresql'):
        password = psycopg.conninfo.conninfo_to_dict(sql_target)['password']
        assert password not in message and '***' in message


def test_sql_table_with_another_primary_key_fails(sql_target):
    table = unique_table()
    other = schemas.RecordSchema(name=MATCHES.name, fields=MATCHES.fields, key=('offer_id',))
    target = keyed_write.parse_sql_target(sql_target)
    keyed_write.ensure_table(target, table, other)
    with pytest.raises(ConfigError, match='primary key'):
        keyed_write.ensure_table(target, table, MATCHES)


def test_unreachable_database_fails_at_construction_without_showing_the_password(test_pipeline, tmp_path,
                                                                               postgres_url):
    wrong_password = postgres_url.replace('@', 'x@', 1)
    (tmp_path / 'a_file').write_text('')
    for target in (f'sqlite:///{tmp_path}/a_file/hr.db', wrong_password):
        with pytest.raises(ConfigError, match='cannot connect') as raised:
            with test_pipeline() as p:
                _ = p | beam.Create([to_batch(match_rows(1))]) | WriteKeyed(schema=MATCHES, target=target)
        assert psycopg.conninfo.conninfo_to_dict(postgres_url)['password'] not in str(raised.value)


def test_sqlite_several_workers_write_concurrently(test_pipeline, tmp_path):
    target = f'sqlite:///{tmp_path}/hr.db'
    rows = match_rows(300)
    with test_pipeline('--direct_num_workers=2', '--direct_running_mode=multi_threading') as p:
        counts = (p | 'Batches' >> beam.Create(split(to_batch(rows), [13, 29]))
                  | 'Write' >> WriteKeyed(schema=MATCHES, target=target, max_batch_rows=10))
        assert_that(counts | 'Total' >> beam.CombineGlobally(sum), equal_to([300]), label='Total')
        assert_that(counts | 'Largest' >> beam.CombineGlobally(max), equal_to([10]), label='Largest')
    assert read_sql_table(target, 'matches') == as_tuples(rows)
    with sqlite3.connect(f'{tmp_path}/hr.db') as conn:
        assert conn.execute('PRAGMA journal_mode').fetchone() == ('wal',)


_KEYS = st.tuples(st.sampled_from(['a', 'b', 'é/=']), st.text(alphabet='xyz0', min_size=1, max_size=3))
_VALUES = st.fixed_dictionaries({
    'score': st.floats(0, 1, width=32),
    'rank': st.one_of(st.none(), st.integers(1, 1000)),
    'weights': st.text(max_size=5),
})


def _rows_from(keyed: dict) -> list[dict]:
    return [{'offer_id': o, 'candidate_id': c, **v, 'distance_km': 1.0,
             **{f'score_{s}': 0.5 for s in schemas.SCORE_COMPONENTS}} for (o, c), v in keyed.items()]


def test_sql_a_key_twice_in_one_transaction_keeps_its_last_row(test_pipeline, sql_target):
    # Keys should be unique (DropDuplicateKeys upstream); if one is not, the write must not fail:
    # ON CONFLICT cannot update a row twice in one statement, so WriteKeyed keeps the last row.
    table = unique_table()
    rows = match_rows(6)
    repeated = [dict(rows[2], score=0.25), dict(rows[2], score=0.75, rank=None)]
    batch = to_batch(rows + repeated)
    for attempt in range(2):  # the same batch again, as a retried bundle would
        with test_pipeline() as p:
            _ = p | 'Batches' >> beam.Create([batch]) | 'Write' >> WriteKeyed(
                schema=MATCHES, target=sql_target, table=table)
        assert read_sql_table(sql_target, table) == as_tuples(rows[:2] + repeated[-1:] + rows[3:]), attempt


# Every SQL column type, nullable, for the PostgreSQL binary COPY encoder.
_ALL_TYPES = schemas.RecordSchema(name='all_types', key=('id',), fields=(
    schemas.Field('id', pa.int64()),
    schemas.Field('text', pa.string(), nullable=True),
    schemas.Field('f64', pa.float64(), nullable=True),
    schemas.Field('f32', pa.float32(), nullable=True),
    schemas.Field('i32', pa.int32(), nullable=True),
    schemas.Field('i16', pa.int16(), nullable=True),
    schemas.Field('i8', pa.int8(), nullable=True),
    schemas.Field('day', pa.date32(), nullable=True),
    schemas.Field('tags', pa.list_(pa.string()), nullable=True),
))
_TEXT = st.text(alphabet=st.characters(blacklist_characters='\x00', blacklist_categories=('Cs',)), max_size=8)
_ALL_TYPES_ROW = st.fixed_dictionaries({
    'text': st.none() | _TEXT,
    'f64': st.none() | st.floats(),
    'f32': st.none() | st.floats(width=32),
    'i32': st.none() | st.integers(-2**31, 2**31 - 1),
    'i16': st.none() | st.integers(-2**15, 2**15 - 1),
    'i8': st.none() | st.integers(-2**7, 2**7 - 1),
    'day': st.none() | st.dates(),
    'tags': st.none() | st.lists(st.none() | _TEXT, max_size=4),
})


def exact(value):
    """``value`` with floats as their bytes, so NaN equals NaN and -0.0 differs from 0.0."""
    if isinstance(value, float):
        return 'nan' if math.isnan(value) else struct.pack('>d', value)
    if isinstance(value, (list, tuple)):
        return tuple(exact(v) for v in value)
    return value


def read_exact(url: str, table: str, schema: schemas.RecordSchema) -> list[tuple]:
    """The table's rows by key, read in binary: REAL values come back as the exact float32."""
    names = psycopg.sql.SQL(', ').join(psycopg.sql.Identifier(n) for n in schema.names)
    order = psycopg.sql.SQL(', ').join(psycopg.sql.Identifier(k) for k in schema.key)
    with psycopg.connect(url) as conn, conn.cursor(binary=True) as cursor:
        cursor.execute(psycopg.sql.SQL('SELECT {} FROM {} ORDER BY {}').format(
            names, psycopg.sql.Identifier(table), order))
        return [exact(row) for row in cursor.fetchall()]


@settings(max_examples=20, deadline=None)
@given(ids=st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=20, unique=True),
       values=st.lists(_ALL_TYPES_ROW, min_size=20, max_size=20), sizes=st.lists(st.integers(1, 7), min_size=1))
def test_postgres_binary_copy_stores_every_value_exactly(postgres_url, ids, values, sizes):
    rows = [{'id': i, **v} for i, v in zip(ids, values)]
    table = f'all_types_{uuid.uuid4().hex[:10]}'
    target = keyed_write.parse_sql_target(postgres_url)
    keyed_write.ensure_table(target, table, _ALL_TYPES)
    writer = keyed_write.PostgresUpserter(target, table, _ALL_TYPES)
    batch = pa.RecordBatch.from_pylist(rows, schema=_ALL_TYPES.arrow_schema())
    try:
        for part in split(batch, sizes):  # slices: arrays with offsets into shared buffers
            writer.write(part)
    finally:
        writer.close()
    expected = sorted((tuple(r[n] for n in _ALL_TYPES.names) for r in rows), key=lambda r: r[0])
    assert read_exact(postgres_url, table, _ALL_TYPES) == [exact(r) for r in expected]


@settings(max_examples=15, deadline=None)
@given(keyed=st.dictionaries(_KEYS, _VALUES, min_size=1, max_size=25),
       sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4), max_rows=st.integers(1, 8))
def test_sql_writing_twice_equals_writing_once(keyed, sizes, max_rows):
    rows = _rows_from(keyed)
    with tempfile.TemporaryDirectory() as tmp:
        target_url = f'sqlite:///{tmp}/hr.db'
        target = keyed_write.parse_sql_target(target_url)
        keyed_write.ensure_table(target, 'matches', MATCHES)
        fn = keyed_write._UpsertFn(MATCHES, target, 'matches', max_rows)
        fn.setup()
        try:
            for batch in split(to_batch(rows), sizes):
                assert all(n <= max_rows for n in fn.process(batch))
            once = read_sql_table(target_url, 'matches')
            for batch in [to_batch(rows)]:
                list(fn.process(batch))
            twice = read_sql_table(target_url, 'matches')
        finally:
            fn.teardown()
    assert once == twice == as_tuples(rows)


# ------------------------------------------------------------------------------------------------
# Pure SQL helpers


@settings(max_examples=100, deadline=None)
@given(num_rows=st.integers(0, 500), max_rows=st.integers(1, 60))
def test_transaction_slices_never_exceed_the_cap_and_cover_every_row_once(num_rows, max_rows):
    slices = keyed_write.transaction_slices(num_rows, max_rows)
    assert all(1 <= length <= max_rows for _, length in slices)
    assert [i for offset, length in slices for i in range(offset, offset + length)] == list(range(num_rows))


def test_transaction_slices_examples():
    assert keyed_write.transaction_slices(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert keyed_write.transaction_slices(0, 4) == []
    with pytest.raises(ValueError):
        keyed_write.transaction_slices(3, 0)


def test_upsert_statement_updates_every_non_key_column():
    statement = keyed_write.upsert_sql(MATCHES, 'matches', 'postgresql')
    assert 'ON CONFLICT ("offer_id", "candidate_id") DO UPDATE SET' in statement
    others = [n for n in MATCHES.names if n not in MATCHES.key]
    assert all(f'"{n}" = excluded."{n}"' in statement for n in others)
    assert '"offer_id" = excluded' not in statement


def test_staged_upsert_statement_quotes_identifiers_and_skips_unchanged_rows():
    schema = schemas.RecordSchema(name='t', key=('Id',), fields=(
        schemas.Field('Id', pa.string()), schemas.Field('value', pa.float64())))
    staging = keyed_write.staging_table_name(schema, 'My_Table')
    statement = keyed_write.staged_upsert_sql(schema, 'My_Table').as_string(None)
    assert statement == (
        f'INSERT INTO "My_Table" ("Id", "value") SELECT "Id", "value" FROM "pg_temp"."{staging}" '
        'ON CONFLICT ("Id") DO UPDATE SET "value" = excluded."value" '
        'WHERE ROW("My_Table"."value") IS DISTINCT FROM ROW("excluded"."value")')
    copy = keyed_write.copy_to_staging_sql(schema, 'My_Table').as_string(None)
    assert copy == f'COPY "pg_temp"."{staging}" ("Id", "value") FROM STDIN (FORMAT BINARY)'
    # One staging table per target and column list, never named like a target (no '-' in those).
    assert staging.startswith('hrbatch-staging-') and len(staging) <= 63
    other_columns = schemas.RecordSchema(name='t', key=('Id',), fields=schema.fields[:1])
    assert len({staging, keyed_write.staging_table_name(schema, 'other'),
                keyed_write.staging_table_name(other_columns, 'My_Table')}) == 3


def test_binary_copy_rows_layout():
    schema = schemas.RecordSchema(name='t', key=('k',), fields=(
        schemas.Field('k', pa.string()), schemas.Field('n', pa.int32(), nullable=True),
        schemas.Field('day', pa.date32(), nullable=True), schemas.Field('tags', pa.list_(pa.string()))))
    batch = pa.RecordBatch.from_pylist(
        [{'k': 'é', 'n': 1, 'day': datetime.date(2000, 1, 2), 'tags': ['a', None]},
         {'k': '', 'n': None, 'day': None, 'tags': []}], schema=schema.arrow_schema())
    # Per row: field count; per field: byte length (-1 for NULL), then big-endian bytes.

    def text_array(length, has_null, count):  # length, 1 dimension, has nulls, text's OID, size, lower bound
        return struct.pack('>iiiiii', length, 1, has_null, 25, count, 1)

    assert keyed_write.binary_copy_rows(batch, schema).to_pybytes() == (
        b'\x00\x04' + b'\x00\x00\x00\x02\xc3\xa9' + b'\x00\x00\x00\x04\x00\x00\x00\x01'
        + b'\x00\x00\x00\x04\x00\x00\x00\x01'  # 2000-01-02 is day 1 of PostgreSQL's calendar
        + text_array(20 + 5 + 4, 1, 2) + b'\x00\x00\x00\x01a' + b'\xff\xff\xff\xff'
        + b'\x00\x04' + b'\x00\x00\x00\x00' + b'\xff\xff\xff\xff' + b'\xff\xff\xff\xff'
        + text_array(20, 0, 0))
    assert keyed_write.binary_copy_rows(batch.slice(0, 0), schema).size == 0


@settings(max_examples=50, deadline=None)
@given(keys=st.lists(st.sampled_from(['a', 'b', 'c', 'd']), max_size=30))
def test_last_row_per_key_keeps_the_last_row_of_each_key_sorted(keys):
    batch = pa.RecordBatch.from_pydict({'k': pa.array(keys, pa.string()), 'row': pa.array(range(len(keys)))})
    kept = keyed_write.last_row_per_key(batch, ('k',)).to_pylist()
    last = {k: i for i, k in enumerate(keys)}
    assert kept == [{'k': k, 'row': last[k]} for k in sorted(last)]


# ------------------------------------------------------------------------------------------------
# Retries (pure)


def test_retry_delays_grow_exponentially_with_full_jitter_up_to_the_cap():
    policy = keyed_write.RetryPolicy()
    assert (policy.retries, policy.base_s, policy.factor, policy.cap_s) == (3, 0.5, 2.0, 10.0)
    assert [policy.ceiling(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    rng = random.Random(42)
    delays = [policy.delay(n, rng) for n in range(7)]
    reference = random.Random(42)
    assert delays == [reference.uniform(0, c) for c in (0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0)]
    many = [policy.delay(2, rng) for _ in range(2000)]
    assert 0 <= min(many) < 0.1 and 1.9 < max(many) <= 2.0  # full jitter: all of [0, ceiling]


class _Flaky:
    """Raises the given errors in turn, then returns 'done'."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return 'done'


def test_call_with_retries_retries_transient_errors_only():
    policy = keyed_write.RetryPolicy(retries=3, base_s=0.5)
    slept, before = [], []

    def call(action):
        return keyed_write.call_with_retries(
            action, policy=policy, is_transient=keyed_write.is_transient, before_retry=before.append,
            sleep=slept.append, rng=random.Random(7))

    dropped, deadlock = psycopg.errors.AdminShutdown(), psycopg.errors.DeadlockDetected()
    flaky = _Flaky(dropped, deadlock)
    assert call(flaky) == 'done' and flaky.calls == 3
    assert before == [dropped, deadlock]
    reference = random.Random(7)
    assert slept == [reference.uniform(0, 0.5), reference.uniform(0, 1.0)]

    slept.clear()
    permanent = _Flaky(psycopg.errors.UndefinedTable())
    with pytest.raises(psycopg.errors.UndefinedTable):
        call(permanent)
    assert permanent.calls == 1 and slept == []

    always = _Flaky(*[psycopg.OperationalError('server closed the connection unexpectedly')] * 10)
    with pytest.raises(psycopg.OperationalError):
        call(always)
    assert always.calls == 4 and len(slept) == 3  # retries=3: four attempts


class _PGconn:
    """What a failed connection attempt tells about authentication (libpq's flags)."""

    def __init__(self, *, used_password=False, needs_password=False):
        self.used_password, self.needs_password = used_password, needs_password


@pytest.mark.parametrize('error, connecting, transient', [
    (psycopg.errors.SerializationFailure(), False, True),
    (psycopg.errors.DeadlockDetected(), False, True),
    (psycopg.errors.AdminShutdown(), False, True),
    (psycopg.errors.CrashShutdown(), False, True),
    (psycopg.errors.CannotConnectNow(), True, True),
    (psycopg.errors.ConnectionFailure(), False, True),
    (psycopg.errors.TooManyConnections(), True, True),
    (psycopg.errors.LockNotAvailable(), False, True),
    (psycopg.OperationalError('server closed the connection unexpectedly'), False, True),
    (psycopg.OperationalError('Connection refused', pgconn=_PGconn()), True, True),
    (psycopg.OperationalError('password authentication failed', pgconn=_PGconn(used_password=True)), True, False),
    (psycopg.OperationalError('no password supplied', pgconn=_PGconn(needs_password=True)), True, False),
    (psycopg.errors.InvalidPassword(), True, False),
    (psycopg.errors.InvalidAuthorizationSpecification(), True, False),
    (psycopg.errors.InvalidCatalogName(), True, False),
    (psycopg.errors.UndefinedTable(), False, False),
    (psycopg.errors.UndefinedColumn(), False, False),
    (psycopg.errors.UniqueViolation(), False, False),
    (psycopg.errors.CheckViolation(), False, False),
    (psycopg.errors.InvalidTextRepresentation(), False, False),
    (psycopg.errors.QueryCanceled(), False, False),
    (psycopg.errors.ProtocolViolation(), False, False),
    (psycopg.InterfaceError('the connection is closed'), False, False),
    (ValueError('a bug'), False, False),
])
def test_which_errors_are_transient(error, connecting, transient):
    assert keyed_write.is_transient(error, connecting=connecting) is transient


def test_error_description_withholds_messages_that_may_quote_rows():
    class _Diag:
        def __init__(self, **fields):
            self.__dict__.update({'column_name': None, 'constraint_name': None, 'datatype_name': None,
                                  'message_primary': None, **fields})

    class _Error(psycopg.errors.InvalidTextRepresentation):
        diag = _Diag(message_primary='invalid input syntax for type real: "Jean Dupont"', column_name='score')

    described = keyed_write.describe_sql_error(_Error())
    assert 'Dupont' not in described and "column 'score'" in described
    assert described.startswith('_Error (SQLSTATE 22P02)')


def test_redact_url_masks_passwords():
    assert keyed_write.redact_url('postgresql://u:s3cret@h:5432/db?password=x&sslmode=require') == (
        'postgresql://u:***@h:5432/db?password=***&sslmode=require')
    assert keyed_write.redact_url('postgresql://u@h/db') == 'postgresql://u@h/db'


# ------------------------------------------------------------------------------------------------
# Parquet


def dataset_files(target: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``target`` (hidden ones included) by relative path, with its bytes."""
    return {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob('*')) if p.is_file()}


def expected_table(rows: list[dict]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=MATCHES.arrow_schema())
    return table.sort_by([(k, 'ascending') for k in MATCHES.key])


def test_parquet_rows_equal_input_and_rewriting_is_byte_identical(test_pipeline, tmp_path):
    target = tmp_path / 'matches'
    rows = match_rows(60)
    config = dict(schema=MATCHES, target=str(target), partition_by='offer_id')
    # One directory per offer_id, named by the value percent-encoded.
    expected_names = {'offer_id=O-001/part-00000.parquet',
                      'offer_id=O%2F2%20%C3%A9t%C3%A9/part-00000.parquet',
                      'offer_id=O%3D3%25/part-00000.parquet'}
    result = run_write(test_pipeline, [to_batch(rows)], **config,
                       expected_output=[str(target / name) for name in expected_names])
    first = dataset_files(target)
    assert set(first) == expected_names
    assert counter(result, 'matches_parquet_files') == 3 and counter(result, 'matches_parquet_rows') == 60
    assert read_parquet_dataset(str(target)).equals(expected_table(rows))

    # Again, from many small batches in another order: same names, same bytes, nothing left over.
    run_write(test_pipeline, list(reversed(split(to_batch(rows), [1, 5, 2, 17]))), **config)
    assert dataset_files(target) == first
    assert not list(target.glob('.tmp-*'))
    # Each file holds its partition's rows, sorted by key.
    for name in first:
        part = pq.read_table(target / name)
        assert part.column('offer_id').unique().to_pylist() == [
            keyed_write.urllib.parse.unquote(name.split('/')[0].split('=', 1)[1])]
        assert part.equals(part.sort_by([(k, 'ascending') for k in MATCHES.key]))


def test_parquet_update_replaces_the_row_and_leaves_other_partitions(test_pipeline, tmp_path):
    target = tmp_path / 'matches'
    rows = match_rows(30)
    config = dict(schema=MATCHES, target=str(target), partition_by='offer_id')
    run_write(test_pipeline, [to_batch(rows)], **config)
    untouched = {n: b for n, b in dataset_files(target).items() if not n.startswith('offer_id=O-001/')}
    updated = [dict(r, score=0.25) if r['candidate_id'] == rows[3]['candidate_id'] else r
               for r in rows if r['offer_id'] == 'O-001']
    run_write(test_pipeline, [to_batch(updated)], **config)
    new_rows = [dict(r, score=0.25) if r['candidate_id'] == rows[3]['candidate_id'] else r for r in rows]
    assert read_parquet_dataset(str(target)).equals(expected_table(new_rows))
    assert {n: b for n, b in dataset_files(target).items() if n in untouched} == untouched


def test_parquet_bucketed_and_unpartitioned_file_names(test_pipeline, tmp_path):
    rows = match_rows(50)
    bucketed = tmp_path / 'bucketed'
    run_write(test_pipeline, split(to_batch(rows), [7]), schema=MATCHES, target=str(bucketed),
              partition_by='candidate_id', buckets=4)
    expected = {f'candidate_id_bucket={keyed_write.bucket_of(r["candidate_id"], 4):05d}/part-00000.parquet'
                for r in rows}
    assert set(dataset_files(bucketed)) == expected and len(expected) > 1
    for name in expected:
        bucket = int(name.split('=')[1].split('/')[0])
        ids = pq.read_table(bucketed / name).column('candidate_id').to_pylist()
        assert {keyed_write.bucket_of(i, 4) for i in ids} == {bucket}
    assert read_parquet_dataset(str(bucketed)).equals(expected_table(rows))

    whole = tmp_path / 'whole'
    run_write(test_pipeline, split(to_batch(rows), [9]), schema=MATCHES, target=str(whole),
              expected_output=[str(whole / 'part-00000.parquet')])
    assert set(dataset_files(whole)) == {'part-00000.parquet'}
    assert read_parquet_dataset(str(whole)).equals(expected_table(rows))


@settings(max_examples=15, deadline=None)
@given(keyed=st.dictionaries(_KEYS, _VALUES, min_size=1, max_size=25),
       sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4), buckets=st.one_of(st.none(), st.integers(1, 3)))
def test_parquet_writing_twice_equals_writing_once(keyed, sizes, buckets):
    # The pipeline's steps as plain calls: split each batch, group by partition, write each group.
    rows = _rows_from(keyed)

    def write(target: str, batches: list[pa.RecordBatch]) -> None:
        groups: dict[str, list[pa.RecordBatch]] = {}
        for batch in batches:
            for directory, part in keyed_write.split_by_partition(
                    keyed_write.conform_batch(batch, MATCHES), 'offer_id', buckets):
                groups.setdefault(directory, []).append(part)
        temp_dir = f'{target}/.tmp-test'
        for directory, parts in groups.items():
            keyed_write.write_partition(parts, schema=MATCHES, target=target, directory=directory,
                                        temp_dir=temp_dir)
        keyed_write.remove_temp_dir(temp_dir)

    with tempfile.TemporaryDirectory() as tmp:
        once, twice = pathlib.Path(tmp, 'once'), pathlib.Path(tmp, 'twice')
        write(str(once), [to_batch(rows)])
        write(str(twice), split(to_batch(rows), sizes))
        write(str(twice), list(reversed(split(to_batch(rows), sizes))))
        assert dataset_files(once) == dataset_files(twice)
        assert read_parquet_dataset(str(once)).equals(expected_table(rows))


def test_partition_dir_is_derived_from_the_value():
    assert keyed_write.partition_dir(None, 'x') == ''
    assert keyed_write.partition_dir('offer_id', 'a/b=c d') == 'offer_id=a%2Fb%3Dc%20d'
    assert keyed_write.partition_dir('offer_id', '..') == 'offer_id=..'
    assert keyed_write.partition_dir('day', datetime.date(2024, 3, 1)) == 'day=2024-03-01'
    assert keyed_write.partition_dir('n', 42) == 'n=42'
    # blake2b(b'O-001', digest_size=8), big-endian, mod 1000: pinned so the layout never drifts.
    assert keyed_write.partition_dir('offer_id', 'O-001', buckets=1000) == (
        f'offer_id_bucket={keyed_write.bucket_of("O-001", 1000):05d}')
    assert keyed_write.bucket_of('O-001', 1000) == int.from_bytes(
        keyed_write.hashlib.blake2b(b'O-001', digest_size=8).digest(), 'big') % 1000


def test_split_by_partition_routes_every_row_once():
    batch = keyed_write.conform_batch(to_batch(match_rows(20)), MATCHES)
    parts = keyed_write.split_by_partition(batch, 'offer_id')
    assert [d for d, _ in parts] == sorted(d for d, _ in parts)
    assert sum(p.num_rows for _, p in parts) == 20
    for directory, part in parts:
        values = set(part.column('offer_id').to_pylist())
        assert {keyed_write.partition_dir('offer_id', v) for v in values} == {directory}
    assert keyed_write.split_by_partition(batch.slice(0, 0), 'offer_id') == []


def test_duplicate_keys_in_a_partition_fail():
    batch = keyed_write.conform_batch(to_batch(match_rows(3)), MATCHES)
    with pytest.raises(ValueError, match='1 rows repeat the key'):
        keyed_write.sort_partition([batch, batch.slice(1, 1)], MATCHES, label='offer_id=x')


def test_conform_batch_drops_metadata_casts_and_rejects_nulls():
    batch = to_batch(match_rows(2))
    widened = batch.set_column(batch.schema.get_field_index('score'), 'score',
                               batch.column('score').cast(pa.float64()))
    conformed = keyed_write.conform_batch(widened, MATCHES)
    assert conformed.schema == MATCHES.arrow_schema()
    with pytest.raises(ValueError, match='has no column'):
        keyed_write.conform_batch(batch.drop_columns(['weights']), MATCHES)
    with_null = batch.set_column(batch.schema.get_field_index('weights'), 'weights', pa.array([None, 'x']))
    with pytest.raises(ValueError, match=r"\['weights'\] hold nulls"):
        keyed_write.conform_batch(with_null, MATCHES)


def test_publish_replaces_an_existing_file(tmp_path):
    final = tmp_path / 'p=1' / 'part-00000.parquet'
    final.parent.mkdir()
    final.write_bytes(b'old')
    temp = tmp_path / '.tmp-x' / 'new.tmp'
    temp.parent.mkdir()
    temp.write_bytes(b'new')
    keyed_write.publish(str(temp), str(final))
    assert final.read_bytes() == b'new' and not temp.exists()


def test_read_parquet_dataset_of_nothing_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_parquet_dataset(str(tmp_path / 'missing'))


# ------------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize('config, words', [
    (dict(target='sqlite:///:memory:'), 'in-memory'),
    (dict(target='sqlite:///'), 'database file'),
    (dict(target='sqlite://hr.db'), 'sqlite:///'),
    (dict(target='postgres://u:pw@h/db'), 'postgresql://'),
    (dict(target='nosuchfs://bucket/x'), 'neither'),
    (dict(target=''), 'target'),
    (dict(target='sqlite:///x.db', table='bad name'), 'table'),
    (dict(target='sqlite:///x.db', partition_by='offer_id'), 'Parquet'),
    (dict(target='out', table='t'), 'postgresql:// targets only'),
    (dict(target='out', partition_by='nope'), 'partition_by'),
    (dict(target='out', partition_by='score'), 'non-nullable string, integer or date32'),
    (dict(target='out', partition_by='rank'), 'nullable'),
    (dict(target='out', buckets=4), 'without partition_by'),
    (dict(target='out', partition_by='offer_id', buckets=0), 'buckets'),
    (dict(target='out', partition_by='offer_id', buckets=100_001), '1 to 100_000'),
    (dict(target='out', max_batch_rows=0), 'max_batch_rows'),
    (dict(target='out', max_batch_rows=True), 'max_batch_rows'),
    (dict(target='out', schema='matches'), 'RecordSchema'),
    (dict(target='sqlite:///x.db', retries=-1), 'retries=-1'),
    (dict(target='sqlite:///x.db', retries=21), 'from 0'),
    (dict(target='sqlite:///x.db', retries=True), 'retries=True'),
    (dict(target='sqlite:///x.db', retries=1.5), 'retries=1.5'),
    (dict(target='sqlite:///x.db', retry_delay_s=0), 'retry_delay_s=0'),
    (dict(target='sqlite:///x.db', retry_delay_s=11), 'at most 10'),
    (dict(target='sqlite:///x.db', retry_delay_s=float('nan')), 'retry_delay_s=nan'),
    (dict(target='sqlite:///x.db', retry_delay_s='1'), 'retry_delay_s'),
])
def test_bad_parameters_are_value_errors(config, words):
    config = {'schema': MATCHES, **config}
    with pytest.raises(ValueError, match=words) as raised:
        WriteKeyed(**config)
    assert 'pw' not in str(raised.value)


def test_unsupported_sql_column_type_is_a_value_error():
    schema = schemas.RecordSchema(name='t', key=('id',), fields=(
        schemas.Field('id', pa.string()), schemas.Field('when', pa.timestamp('s'))))
    with pytest.raises(ValueError, match="field 'when' has type timestamp"):
        WriteKeyed(schema=schema, target='sqlite:///x.db')


@settings(max_examples=15, deadline=None)
@given(first=st.lists(_ALL_TYPES_ROW, min_size=1, max_size=12), second=st.lists(_ALL_TYPES_ROW, min_size=1, max_size=12),
       overlap=st.integers(0, 12))
def test_postgres_copy_first_then_upsert_when_keys_exist(postgres_url, first, second, overlap):
    """A writer loads new keys with a plain COPY; once a batch meets a stored key it upserts."""
    table = f'copy_then_upsert_{uuid.uuid4().hex[:10]}'
    target = keyed_write.parse_sql_target(postgres_url)
    keyed_write.ensure_table(target, table, _ALL_TYPES)
    first_rows = [{'id': i, **v} for i, v in enumerate(first)]
    # The second batch reuses ``overlap`` keys of the first (new values) and adds new ones.
    start = len(first) - min(overlap, len(first))
    second_rows = [{'id': start + i, **v} for i, v in enumerate(second)]
    writer = keyed_write.PostgresUpserter(target, table, _ALL_TYPES)
    try:
        for rows in (first_rows, second_rows):
            writer.write(pa.RecordBatch.from_pylist(rows, schema=_ALL_TYPES.arrow_schema()))
    finally:
        writer.close()
    expected = {r['id']: r for r in first_rows} | {r['id']: r for r in second_rows}
    assert read_exact(postgres_url, table, _ALL_TYPES) == [
        exact(tuple(expected[k][n] for n in _ALL_TYPES.names)) for k in sorted(expected)]


def test_in_key_order_compares_rows_column_by_column():
    rows = pa.table({'a': ['x', 'x', 'y', 'y'], 'b': [2, 3, 1, 1]})
    assert keyed_write.in_key_order(rows, ('a', 'b'))            # ties on the whole key are allowed
    assert not keyed_write.in_key_order(rows, ('b',))
    assert not keyed_write.in_key_order(rows, ('b', 'a'))
    swapped = pa.table({'a': ['x', 'y', 'x'], 'b': [1, 0, 2]})
    assert not keyed_write.in_key_order(swapped, ('a', 'b'))      # decided by the first column
    assert keyed_write.in_key_order(pa.table({'a': ['x', 'x'], 'b': [1, 2]}).slice(0, 1), ('a', 'b'))
    assert not keyed_write.in_key_order(pa.table({'a': ['x', None]}), ('a',))  # the sort places nulls


def test_sort_partition_gives_the_same_table_whether_or_not_rows_arrive_sorted():
    rows = [{'offer_id': 'o', 'candidate_id': f'c{i}', 'score': i / 10} for i in (3, 1, 2)]
    shuffled = pa.RecordBatch.from_pylist(rows)
    ordered = pa.RecordBatch.from_pylist(sorted(rows, key=lambda r: r['candidate_id']))
    schema = schemas.RecordSchema(name='scores', key=('offer_id', 'candidate_id'), fields=(
        schemas.Field('offer_id', pa.string()), schemas.Field('candidate_id', pa.string()),
        schemas.Field('score', pa.float64())))
    one, other = (keyed_write.sort_partition([b], schema) for b in (shuffled, ordered))
    assert one.equals(other) and one.column('candidate_id').to_pylist() == ['c1', 'c2', 'c3']

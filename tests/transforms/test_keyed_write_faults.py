"""WriteKeyed against a PostgreSQL server that fails: restarts, cut sessions, rotated passwords,
tables changed under a running pipeline.

These tests start their own server (``running_server``), not the session's ``postgres_url``: they
restart it, terminate its sessions and change its role's password, which must not reach other tests.
"""
import random
import threading
import time
import uuid

import apache_beam as beam
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
from psycopg import sql

from tests.fixtures.postgres import USER
from tests.fixtures.postgres import running_server
from tests.transforms.test_keyed_write import counter
from tests.transforms.test_keyed_write import exact
from tests.transforms.test_keyed_write import match_rows
from tests.transforms.test_keyed_write import read_exact
from tests.transforms.test_keyed_write import to_batch
from transforms import keyed_write
from transforms import schemas
from transforms.keyed_write import SqlWriteError
from transforms.keyed_write import WriteKeyed

MATCHES = schemas.MATCHES


@pytest.fixture(scope='module')
def server():
    """A server of this module's own: its tests restart it."""
    with running_server() as started:
        yield started


def unique_table() -> str:
    return f'matches_{uuid.uuid4().hex[:10]}'


def generated_matches(rows: int, seed: int = 11) -> pa.Table:
    """``rows`` distinct matches in the MATCHES layout, built column by column (deterministic)."""
    rng = np.random.default_rng(seed)
    i = np.arange(rows)
    offers = pa.array([f'O-{k:04d}' for k in range(300)])
    return pa.Table.from_pydict({
        'offer_id': offers.take(pa.array(i % 300)),
        'candidate_id': pa.compute.binary_join_element_wise(
            'C', pa.compute.utf8_lpad(pa.array(i // 300).cast(pa.string()), 6, '0'), ''),
        'score': pa.array(rng.random(rows, dtype=np.float32)),
        'rank': pa.array((i // 300 + 1).astype(np.int32), mask=i % 5 == 0),
        **{f'score_{c}': pa.array(rng.random(rows, dtype=np.float32)) for c in schemas.SCORE_COMPONENTS},
        'distance_km': pa.array((rng.random(rows) * 100).astype(np.float32)),
        'weights': pa.array(['{"required_skills": 1.0}'] * rows),
    }, schema=MATCHES.arrow_schema())


def read_row_group(element):
    path, group = element
    yield from pq.ParquetFile(path).read_row_group(group).to_batches()


def rows_of(table: pa.Table) -> list[tuple]:
    """The rows as read_exact returns them: by key, floats as their exact bytes."""
    ordered = table.sort_by([(k, 'ascending') for k in MATCHES.key])
    return [exact(tuple(row[n] for n in MATCHES.names)) for row in ordered.to_pylist()]


def no_sleep(seconds: float) -> None:
    """The sleep of a writer that must never retry: permanent errors fail at once."""
    raise AssertionError(f'a permanent error was retried (sleep {seconds:.2f} s)')


# ------------------------------------------------------------------------------------------------
# Transient: the write goes on


def test_server_restart_while_writing_loses_and_duplicates_no_row(test_pipeline, server, tmp_path):
    table = unique_table()
    expected = generated_matches(200_000)
    path = str(tmp_path / 'matches.parquet')
    pq.write_table(expected, path, row_group_size=20_000)
    groups = [(path, g) for g in range(pq.ParquetFile(path).num_row_groups)]
    target = keyed_write.parse_sql_target(server.url)
    keyed_write.ensure_table(target, table, MATCHES)
    restarts, failures = [], []

    def restart_once_rows_arrive():
        # The pipeline is writing once a first transaction is visible: restart the server then,
        # cutting every session, as a failover or `pg_ctl restart -m fast` in production would.
        try:
            with psycopg.connect(server.url, autocommit=True) as conn:
                deadline = time.monotonic() + 120
                while conn.execute(sql.SQL('SELECT count(*) FROM {}').format(sql.Identifier(table))).fetchone()[0] == 0:
                    assert time.monotonic() < deadline, 'no row was written within 120 s'
                    time.sleep(0.005)  # polling the table, not waiting out a race
            server.restart()
            restarts.append(time.monotonic())
        except BaseException as error:  # reported by the test thread below
            failures.append(error)

    watcher = threading.Thread(target=restart_once_rows_arrive, daemon=True)
    with test_pipeline() as p:
        counts = (p | 'RowGroups' >> beam.Create(groups)
                  | 'Read' >> beam.FlatMap(read_row_group).with_output_types(pa.RecordBatch)
                  | 'Write' >> WriteKeyed(schema=MATCHES, target=server.url, table=table, max_batch_rows=5_000,
                                          retries=12, retry_delay_s=0.05))
        assert_that(counts | 'Total' >> beam.CombineGlobally(sum), equal_to([200_000]), label='Total')
        assert_that(counts | 'Largest' >> beam.CombineGlobally(max), equal_to([5_000]), label='Largest')
        watcher.start()
    watcher.join(timeout=120)
    assert not failures, failures
    assert restarts
    # The restart cut the writer's session: it reconnected and replayed at least one transaction.
    assert counter(p.result, f'{table}_write_retries') >= 1
    assert counter(p.result, f'{table}_written') == 200_000
    assert read_exact(server.url, table, MATCHES) == rows_of(expected)


def test_a_cut_session_is_reopened_and_the_transaction_replayed(server):
    table = unique_table()
    target = keyed_write.parse_sql_target(server.url)
    keyed_write.ensure_table(target, table, MATCHES)
    slept, retried = [], []
    writer = keyed_write.PostgresUpserter(target, table, MATCHES, on_retry=lambda: retried.append(1),
                                          sleep=slept.append, rng=random.Random(1))
    rows = match_rows(30)
    batch = keyed_write.conform_batch(to_batch(rows), MATCHES)
    try:
        writer.write(batch.slice(0, 10))
        with psycopg.connect(server.url, autocommit=True) as admin:
            (cut,) = admin.execute('SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity '
                                   'WHERE datname = current_database() AND pid <> pg_backend_pid()').fetchone()
        assert cut == 1
        writer.write(batch.slice(10, 20))
    finally:
        writer.close()
    assert len(retried) == 1 and len(slept) == 1 and 0 <= slept[0] <= 0.5
    assert read_exact(server.url, table, MATCHES) == rows_of(pa.Table.from_batches([batch]))


def test_an_unreachable_server_is_retried_then_fails_naming_the_attempts(server):
    # A port nobody listens on: every attempt is refused, a transient error.
    closed_port = server.url.replace(f':{server.port}/', ':1/')
    slept = []
    writer = keyed_write.PostgresUpserter(keyed_write.parse_sql_target(closed_port), 'matches', MATCHES,
                                          policy=keyed_write.RetryPolicy(retries=3, base_s=0.5), sleep=slept.append)
    with pytest.raises(SqlWriteError) as raised:
        writer.open()
    message = str(raised.value)
    assert "table 'matches'" in message and 'after 4 attempts' in message and 'OperationalError' in message
    assert server.password not in message and '***' in message
    assert len(slept) == 3 and all(0 <= s <= c for s, c in zip(slept, (0.5, 1.0, 2.0)))


# ------------------------------------------------------------------------------------------------
# Permanent: fail at once, say what and where, show no row value and no password


def test_wrong_password_fails_at_once_without_showing_it(server):
    wrong = server.url.replace(f':{server.password}@', ':not-the-password@')
    writer = keyed_write.PostgresUpserter(keyed_write.parse_sql_target(wrong), 'matches', MATCHES, sleep=no_sleep)
    with pytest.raises(SqlWriteError) as raised:
        writer.open()
    message = str(raised.value)
    assert "table 'matches'" in message and 'password authentication failed' in message
    assert 'OperationalError' in message and 'not retried' in message
    assert 'not-the-password' not in message and server.password not in message


def test_password_rotated_under_a_running_pipeline_fails_it_without_showing_either(test_pipeline, server):
    table = unique_table()
    rotated = 'rotated-' + uuid.uuid4().hex
    with psycopg.connect(server.url, autocommit=True) as admin:
        try:
            with pytest.raises(SqlWriteError) as raised:
                with test_pipeline() as p:
                    _ = (p | beam.Create([to_batch(match_rows(10))])
                         | WriteKeyed(schema=MATCHES, target=server.url, table=table))
                    # After the launch checked the table, before the workers connect.
                    admin.execute(sql.SQL('ALTER ROLE {} PASSWORD {}').format(sql.Identifier(USER), rotated))
        finally:
            admin.execute(sql.SQL('ALTER ROLE {} PASSWORD {}').format(sql.Identifier(USER), server.password))
    message = str(raised.value)
    assert repr(table) in message and 'password authentication failed' in message and 'not retried' in message
    assert server.password not in message and rotated not in message


def test_table_changed_under_a_running_pipeline_fails_at_once_naming_table_and_error(test_pipeline, server):
    table = unique_table()
    with psycopg.connect(server.url, autocommit=True) as admin:
        with pytest.raises(SqlWriteError) as raised:
            with test_pipeline() as p:
                _ = (p | beam.Create([to_batch(match_rows(10))])
                     | WriteKeyed(schema=MATCHES, target=server.url, table=table))
                # The launch checked the columns; someone drops one before the rows arrive.
                admin.execute(sql.SQL('ALTER TABLE {} DROP COLUMN weights').format(sql.Identifier(table)))
    message = str(raised.value)
    assert repr(table) in message and 'UndefinedColumn' in message and 'not retried' in message
    assert server.password not in message


def test_constraint_violation_names_the_constraint_never_the_row(server):
    table = unique_table()
    target = keyed_write.parse_sql_target(server.url)
    keyed_write.ensure_table(target, table, MATCHES)
    with psycopg.connect(server.url, autocommit=True) as admin:
        # PostgreSQL's own message for this quotes the whole failing row in its DETAIL.
        admin.execute(sql.SQL('ALTER TABLE {} ADD CONSTRAINT score_below_zero CHECK (score < 0) NOT VALID')
                      .format(sql.Identifier(table)))
    rows = [dict(r, candidate_id=f'Jean-Dupont-{i}') for i, r in enumerate(match_rows(3))]
    writer = keyed_write.PostgresUpserter(target, table, MATCHES, sleep=no_sleep)
    try:
        with pytest.raises(SqlWriteError) as raised:
            writer.write(keyed_write.conform_batch(to_batch(rows), MATCHES))
    finally:
        writer.close()
    message = str(raised.value)
    assert repr(table) in message and 'CheckViolation' in message and "'score_below_zero'" in message
    assert 'Dupont' not in message and 'O-001' not in message
    # Not even attached: the driver's exception holds the failing row in its DETAIL.
    assert raised.value.__cause__ is None and raised.value.__context__ is None

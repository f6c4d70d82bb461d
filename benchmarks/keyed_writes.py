"""Keyed SQL writes: PostgreSQL upserts through WriteKeyed against a raw COPY of the same rows.

    python benchmarks/keyed_writes.py                          # 200,000 rows, best of 3, about 30 s
    python benchmarks/keyed_writes.py --rows 50000 --repeat 1  # quick

Generates ``--rows`` rows in the ``schemas.MATCHES`` layout (numpy, seeded; offers interleaved, so
rows arrive in no key order), writes them once to a Parquet file, starts a throw-away PostgreSQL
server in a temporary directory (the tests' own code, ``tests/fixtures/postgres.py``; fsync off, as
there) and measures, on the same rows:
  (a) a raw binary ``COPY`` of every row into an empty table with the same columns and primary key,
      in one transaction: no staging table, no upsert. The reference;
  (b) ``WriteKeyed`` upserting them into an empty table (a first load) in a Beam pipeline on the
      FnApiRunner (one worker, its default), timed from building the pipeline (which checks the
      table) to the last commit, reading the Parquet file included;
  (c) the same pipeline again, every row already there and unchanged (a rerun);
  (d) the same pipeline into a new SQLite file.
For context it also times psycopg's own ``write_row`` COPY (text, and binary with ``set_types``),
the raw COPY into a table without primary key, the pipeline with no write at all (the Beam and
Parquet share of (b) to (d)), (b)'s DoFn called directly without Beam, and (b) with two workers.
Each figure is the best of ``--repeat`` runs (on a shared machine, noise only ever slows a run
down). Prints rows per second and the ratio to (a), then one JSON line; ``upsert_vs_copy`` is
(b) / (a). The server is stopped at the end. Nothing here asserts a time.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import apache_beam as beam
import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from pipelines.runner import LOCAL_RUNNER  # noqa: E402
from tests.fixtures.postgres import start_server  # noqa: E402
from transforms import keyed_write  # noqa: E402
from transforms import schemas  # noqa: E402
from transforms.keyed_write import WriteKeyed  # noqa: E402

MATCHES = schemas.MATCHES
OFFERS = 500
ROW_GROUP_ROWS = 65_536  # about the size of the batches ScoreMatches emits
TWO_WORKERS = ('--direct_num_workers=2', '--direct_running_mode=multi_threading')


def generate(rows: int, seed: int) -> pa.Table:
    """``rows`` distinct matches over ``OFFERS`` offers, offers interleaved."""
    rng = np.random.default_rng(seed)
    i = np.arange(rows)
    offer_ids = pa.array([f'O-{k:05d}' for k in range(OFFERS)])
    candidate_numbers = pa.array(i // OFFERS).cast(pa.string())
    columns = {
        'offer_id': offer_ids.take(pa.array(i % OFFERS)),
        'candidate_id': pc.binary_join_element_wise('C', pc.utf8_lpad(candidate_numbers, 7, '0'), ''),
        'score': pa.array(rng.random(rows, dtype=np.float32)),
        'rank': pa.array((i // OFFERS + 1).astype(np.int32), mask=i % 4 == 0),
        **{f'score_{c}': pa.array(rng.random(rows, dtype=np.float32)) for c in schemas.SCORE_COMPONENTS},
        'distance_km': pa.array((rng.random(rows) * 100).astype(np.float32)),
        'weights': pa.array([json.dumps({'required_skills': 0.4, 'experience': 0.2, 'distance': 0.4})] * rows),
    }
    return pa.Table.from_pydict(columns, schema=MATCHES.arrow_schema())


def read_row_group(element: tuple[str, int]):
    """One row group of the Parquet file as RecordBatches (the pipeline's source)."""
    path, group = element
    yield from pq.ParquetFile(path).read_row_group(group).to_batches()


def fresh_table(url: str, table: str, primary_key: bool = True) -> None:
    ddl = keyed_write.create_table_sql(MATCHES, table, 'postgresql')
    if not primary_key:
        ddl = ddl.rsplit(', PRIMARY KEY', 1)[0] + ')'
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS {table}')
        conn.execute(ddl)


def checkpoint(url: str) -> None:
    """Flushes dirty pages and starts a new WAL segment, so no measurement pays for an earlier one's
    checkpoint (each load writes ~60 MB of WAL; max_wal_size would otherwise trigger one mid-run)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute('CHECKPOINT')


def count(url: str, table: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(f'SELECT count(*) FROM {table}').fetchone()[0]


def raw_copy(url: str, table: pa.Table, encoding: str, primary_key: bool = True) -> float:
    """Seconds to COPY every row into an empty table in one transaction (no staging, no upsert)."""
    fresh_table(url, 'raw_copy', primary_key)
    names = ', '.join(f'"{n}"' for n in MATCHES.names)
    with psycopg.connect(url, autocommit=True) as conn:
        start = time.perf_counter()
        with conn.transaction(), conn.cursor() as cursor:
            if encoding == 'arrow_binary':  # WriteKeyed's encoder
                with cursor.copy(f'COPY raw_copy ({names}) FROM STDIN (FORMAT BINARY)') as copy:
                    copy.write(keyed_write.PGCOPY_HEADER)
                    for batch in table.to_batches(max_chunksize=32_768):
                        copy.write(keyed_write.binary_copy_rows(batch, MATCHES))
                    copy.write(keyed_write.PGCOPY_TRAILER)
            else:
                rows = keyed_write.sql_rows(table.combine_chunks().to_batches()[0], MATCHES, 'postgresql')
                binary = encoding == 'write_row_binary'
                with cursor.copy(f'COPY raw_copy ({names}) FROM STDIN{" (FORMAT BINARY)" if binary else ""}') as copy:
                    if binary:
                        copy.set_types([keyed_write.expected_columns(MATCHES, 'postgresql')[n].lower()
                                        for n in MATCHES.names])
                    for row in rows:
                        copy.write_row(row)
        seconds = time.perf_counter() - start
    assert count(url, 'raw_copy') == table.num_rows
    return seconds


def pipeline_seconds(path: str, target: str | None, *, max_batch_rows: int, extra_args=()) -> float:
    """Seconds to build and run read -> WriteKeyed (or read and count only, with target None)."""
    options = PipelineOptions([f'--runner={LOCAL_RUNNER}', *extra_args])
    groups = [(path, g) for g in range(pq.ParquetFile(path).num_row_groups)]
    start = time.perf_counter()
    with beam.Pipeline(runner=LOCAL_RUNNER, options=options) as pipeline:
        # One element per row group: with several workers, each reads and writes its own groups.
        batches = (pipeline | 'RowGroups' >> beam.Create(groups)
                   | 'Read' >> beam.FlatMap(read_row_group).with_output_types(pa.RecordBatch))
        if target is None:
            _ = batches | 'Count' >> beam.Map(lambda batch: batch.num_rows)
        else:
            _ = batches | 'Write' >> WriteKeyed(schema=MATCHES, target=target, table='matches',
                                                max_batch_rows=max_batch_rows)
    return time.perf_counter() - start


def writer_seconds(table: pa.Table, url: str, *, max_batch_rows: int) -> float:
    """Seconds for WriteKeyed's PostgreSQL DoFn alone (no Beam): check the table, connect, write
    the row groups' batches, disconnect."""
    target = keyed_write.parse_sql_target(url)
    batches = table.to_batches(max_chunksize=ROW_GROUP_ROWS)
    start = time.perf_counter()
    keyed_write.ensure_table(target, 'matches', MATCHES)
    upsert = keyed_write._UpsertFn(MATCHES, target, 'matches', max_batch_rows)
    upsert.setup()
    try:
        for batch in batches:
            for _ in upsert.process(batch):
                pass
    finally:
        upsert.teardown()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rows', type=int, default=200_000)
    parser.add_argument('--seed', type=int, default=7)
    parser.add_argument('--repeat', type=int, default=3, help='runs of each measurement; the best is kept')
    parser.add_argument('--max_batch_rows', type=int, default=keyed_write.DEFAULT_MAX_BATCH_ROWS,
                        help="rows per transaction (default: WriteKeyed's)")
    args = parser.parse_args(argv)

    table = generate(args.rows, args.seed)
    n = args.rows
    workdir = tempfile.mkdtemp(prefix='hrbatch-bench-')
    server = start_server(database='hrbatch_bench')
    try:
        path = os.path.join(workdir, 'matches.parquet')
        pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)
        url = server.url
        runs: dict[str, list[float]] = {}

        def measure(label: str, timed) -> None:
            checkpoint(url)
            runs.setdefault(label, []).append(timed())

        for run in range(args.repeat):
            measure('copy', lambda: raw_copy(url, table, 'arrow_binary'))
            measure('copy_write_row_text', lambda: raw_copy(url, table, 'write_row_text'))
            measure('copy_write_row_binary', lambda: raw_copy(url, table, 'write_row_binary'))
            measure('copy_no_primary_key', lambda: raw_copy(url, table, 'arrow_binary', primary_key=False))
            measure('read_only', lambda: pipeline_seconds(path, None, max_batch_rows=args.max_batch_rows))
            fresh_table(url, 'matches')
            measure('first_load_writer_only', lambda: writer_seconds(table, url, max_batch_rows=args.max_batch_rows))
            assert count(url, 'matches') == n
            fresh_table(url, 'matches')
            measure('first_load', lambda: pipeline_seconds(path, url, max_batch_rows=args.max_batch_rows))
            assert count(url, 'matches') == n
            measure('rerun', lambda: pipeline_seconds(path, url, max_batch_rows=args.max_batch_rows))
            assert count(url, 'matches') == n
            fresh_table(url, 'matches')
            measure('first_load_2_workers', lambda: pipeline_seconds(
                path, url, max_batch_rows=args.max_batch_rows, extra_args=TWO_WORKERS))
            assert count(url, 'matches') == n
            sqlite_target = f'sqlite:///{workdir}/hr-{run}.db'
            measure('sqlite', lambda: pipeline_seconds(path, sqlite_target, max_batch_rows=args.max_batch_rows))
            assert len(keyed_write.read_sql_table(sqlite_target, 'matches')) == n

        rate = {label: n / min(seconds) for label, seconds in runs.items()}
        print(f'{n:,} rows (schemas.MATCHES), PostgreSQL {server.bindir.parent.name}, '
              f'max_batch_rows={args.max_batch_rows:,}, best of {args.repeat}')
        print(f'{"":<70} {"rows/s":>11} {"vs (a)":>7}')
        for label, text in (
                ('copy', '(a) raw binary COPY, one transaction, empty table with primary key'),
                ('copy_write_row_text', '    the same with psycopg write_row, text COPY'),
                ('copy_write_row_binary', '    the same with psycopg write_row, binary COPY (set_types)'),
                ('copy_no_primary_key', '    raw binary COPY into a table without primary key'),
                ('read_only', '    pipeline that reads only (Beam + Parquet share of (b)-(d))'),
                ('first_load', '(b) WriteKeyed -> PostgreSQL, empty table (first load)'),
                ('first_load_writer_only', '    (b) without Beam: its DoFn called directly, no pipeline'),
                ('rerun', '(c) WriteKeyed -> PostgreSQL, every row already there (rerun)'),
                ('sqlite', '(d) WriteKeyed -> SQLite, new file'),
                ('first_load_2_workers', '    (b) with 2 workers (multi_threading)')):
            print(f'{text:<70} {rate[label]:>11,.0f} {rate[label] / rate["copy"]:>7.2f}')
        print(json.dumps({
            'rows': n, 'max_batch_rows': args.max_batch_rows, 'repeat': args.repeat,
            **{f'{label}_rows_per_s': round(value) for label, value in rate.items()},
            'upsert_vs_copy': round(rate['first_load'] / rate['copy'], 3),
            'upsert_without_beam_vs_copy': round(rate['first_load_writer_only'] / rate['copy'], 3),
            'upsert_2_workers_vs_copy': round(rate['first_load_2_workers'] / rate['copy'], 3),
            'rerun_vs_copy': round(rate['rerun'] / rate['copy'], 3),
            'sqlite_vs_copy': round(rate['sqlite'] / rate['copy'], 3),
        }))
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

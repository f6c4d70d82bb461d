"""The SQL side of the Celery baseline: one SQLite file, shared with the pipelines (other tables).

Inputs are loaded into the tables ``candidates``, ``offers``, ``employees``, ``establishments``,
``contracts``, ``variable_elements`` and ``withholding_rates`` (the project's schemas, lists as JSON
text, dates as ISO text, as ``transforms.keyed_write`` stores them) before anything is timed: a Celery
team has them in its database already. The tasks write ``celery_matches``, ``celery_payslips`` and
``celery_payslip_lines``; the pipelines write ``matches``, ``payslips`` and ``payslip_lines``.
"""
import os
import sqlite3

import pyarrow.parquet as pq

from transforms import keyed_write
from transforms import schemas

DATABASE_ENV = 'CELERY_BASELINE_DATABASE'
BUSY_TIMEOUT_S = 60.0

MATCH_COLUMNS = ('offer_id', 'candidate_id', 'score', *(f'score_{c}' for c in schemas.SCORE_COMPONENTS),
                 'distance_km')
CELERY_TABLES = {
    'celery_matches': 'CREATE TABLE IF NOT EXISTS celery_matches (offer_id TEXT NOT NULL, candidate_id TEXT NOT NULL, '
                      + ''.join(f'{c} DOUBLE PRECISION NOT NULL, ' for c in MATCH_COLUMNS[2:])
                      + 'PRIMARY KEY (offer_id, candidate_id))',
    'celery_payslips': keyed_write.create_table_sql(schemas.PAYSLIPS, 'celery_payslips', 'sqlite'),
    'celery_payslip_lines': keyed_write.create_table_sql(schemas.PAYSLIP_LINES, 'celery_payslip_lines', 'sqlite'),
}
INPUTS = {
    'candidates': schemas.CANDIDATES, 'offers': schemas.OFFERS, 'employees': schemas.EMPLOYEES,
    'establishments': schemas.ESTABLISHMENTS, 'contracts': schemas.CONTRACTS,
    'variable_elements': schemas.VARIABLE_ELEMENTS, 'withholding_rates': schemas.WITHHOLDING_RATES,
}


def connect(path: str | None = None) -> sqlite3.Connection:
    """A connection as a web or worker process of such a team opens it: WAL (readers never wait for
    the writer), a busy timeout for the other worker's writes, synchronous=NORMAL (no fsync per commit)."""
    conn = sqlite3.connect(path or os.environ[DATABASE_ENV], timeout=BUSY_TIMEOUT_S)
    conn.execute('PRAGMA journal_mode=WAL')
    conn.execute('PRAGMA synchronous=NORMAL')
    return conn


def upsert_sql(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    others = ', '.join(f'{c} = excluded.{c}' for c in columns if c not in key)
    return (f'INSERT INTO {table} ({", ".join(columns)}) VALUES ({", ".join("?" * len(columns))}) '
            f'ON CONFLICT ({", ".join(key)}) DO UPDATE SET {others}')


def create_output_tables(path: str) -> None:
    conn = connect(path)
    with conn:
        for table, ddl in CELERY_TABLES.items():
            conn.execute(f'DROP TABLE IF EXISTS {table}')
            conn.execute(ddl)
    conn.close()


def load_inputs(path: str, files: dict[str, str], *, batch_rows: int = 50_000) -> dict[str, int]:
    """Loads Parquet ``files`` ({table: path}, tables of ``INPUTS``) into SQLite tables; {table: rows}."""
    conn = connect(path)
    counts = {}
    for table, file in files.items():
        schema = INPUTS[table]
        statement = keyed_write.upsert_sql(schema, table, 'sqlite')
        with conn:
            conn.execute(f'DROP TABLE IF EXISTS {table}')
            conn.execute(keyed_write.create_table_sql(schema, table, 'sqlite'))
        counts[table] = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_rows, columns=list(schema.names)):
            batch = keyed_write.conform_batch(batch, schema)
            with conn:
                conn.executemany(statement, keyed_write.sql_rows(batch, schema, 'sqlite'))
            counts[table] += batch.num_rows
    if 'contracts' in files:
        with conn:  # the payroll tasks look contracts up by employee, as any such schema would index them
            conn.execute('CREATE INDEX IF NOT EXISTS contracts_employee ON contracts (employee_id)')
    conn.close()
    return counts

"""The two Celery tasks, written the way the Celery documentation shows (bound tasks, ``self.retry``
with a countdown, ``self.update_state`` for custom progress states).

``match_offer(offer_id)``: one task per job offer. Loads the offer and every active candidate from the
database (the generated candidates have no status: all are active, as the pipeline scores them all),
scores them in chunks of 50 with the project's formula (``transforms.scoring.score_pair``), upserts
each match reaching the offer's ``minimum_match_score`` (one statement per match, one transaction per
chunk), and reports ``PROGRESS`` after each chunk.

``pay_employees(employee_ids, period)``: one task per 50 employees. Reads their rows (employee,
contracts, the month's variable elements and withholding rate, their establishments) from the
database, builds the Arrow month input and computes the payslips with the project's engine
(``transforms.payroll_inputs.assemble``, ``transforms.payslips.compute``), then upserts the payslips
and their lines.

A database error (``sqlite3.OperationalError``: locked, busy, I/O) retries the whole task, at most 3
times, after 1, 2, then 4 seconds (and a little jitter): every write is an upsert, so a replay is
harmless.
"""
import datetime
import functools
import json
import os
import random
import sqlite3

import pyarrow as pa

from celery_baseline import db
from celery_baseline.app import app
from transforms import payroll_inputs
from transforms import payslips
from transforms import schemas
from transforms.payroll_rules import PayrollRules
from transforms.scoring import ScoringConfig
from transforms.scoring import score_pair

CHUNK = 50
CONFIG = ScoringConfig.create()  # the project's default weights, distance and salary tolerance
MATCH_UPSERT = db.upsert_sql('celery_matches', db.MATCH_COLUMNS, ('offer_id', 'candidate_id'))
PAYSLIP_UPSERT = db.upsert_sql('celery_payslips', schemas.PAYSLIPS.names, schemas.PAYSLIPS.key)
LINE_UPSERT = db.upsert_sql('celery_payslip_lines', schemas.PAYSLIP_LINES.names, schemas.PAYSLIP_LINES.key)

_connection = {}


def connection() -> sqlite3.Connection:
    """One connection per worker process (opened after the prefork pool forked it)."""
    pid = os.getpid()
    if pid not in _connection:
        _connection[pid] = db.connect()
    return _connection[pid]


def backoff(retries: int) -> float:
    return 2 ** retries + random.uniform(0, 0.5)


# --- matching ---------------------------------------------------------------------------------------

def load_offer(conn, offer_id: str) -> dict:
    cursor = conn.execute('SELECT * FROM offers WHERE offer_id = ?', (offer_id,))
    names = [d[0] for d in cursor.description]
    offer = dict(zip(names, cursor.fetchone()))
    for name in ('required_skills', 'nice_to_have_skills'):
        offer[name] = json.loads(offer[name])
    return offer


def load_active_candidates(conn) -> list[dict]:
    rows = conn.execute('SELECT candidate_id, latitude, longitude, skills, years_experience, expected_salary, '
                        'contract_types FROM candidates ORDER BY candidate_id')
    return [{'candidate_id': c, 'latitude': lat, 'longitude': lon, 'skills': json.loads(skills),
             'years_experience': years, 'expected_salary': salary, 'contract_types': json.loads(contracts)}
            for c, lat, lon, skills, years, salary, contracts in rows]


@app.task(bind=True, max_retries=3)
def match_offer(self, offer_id: str) -> dict:
    try:
        conn = connection()
        offer = load_offer(conn, offer_id)
        candidates = load_active_candidates(conn)
        total, scored, saved = len(candidates), 0, 0
        for start in range(0, total, CHUNK):
            chunk = candidates[start:start + CHUNK]
            matches = []
            for candidate in chunk:
                result = score_pair(candidate, offer, CONFIG)
                if result['score'] >= offer['minimum_match_score']:
                    matches.append((offer_id, candidate['candidate_id'], result['score'],
                                    *(result[c] for c in schemas.SCORE_COMPONENTS), result['distance_km']))
            if matches:
                with conn:  # one transaction per chunk
                    for match in matches:
                        conn.execute(MATCH_UPSERT, match)
            scored += len(chunk)
            saved += len(matches)
            self.update_state(state='PROGRESS', meta={'offer_id': offer_id, 'current': scored, 'total': total,
                                                      'matches': saved})
    except sqlite3.OperationalError as exc:
        raise self.retry(exc=exc, countdown=backoff(self.request.retries))
    return {'offer_id': offer_id, 'pairs': scored, 'matches': saved}


# --- payroll ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def rules(period: str) -> PayrollRules:
    """The month's rules, read once per worker process."""
    return PayrollRules.for_period(period)


def _in(ids) -> str:
    return ', '.join('?' * len(ids))


def _select(conn, schema: schemas.RecordSchema, where: str, params) -> pa.Table:
    """Rows of ``schema.name`` as an Arrow table of the schema (dates and booleans converted back)."""
    rows = conn.execute(f'SELECT {", ".join(schema.names)} FROM {schema.name} WHERE {where}', params).fetchall()
    records = []
    for row in rows:
        record = dict(zip(schema.names, row))
        for field in schema.fields:
            value = record[field.name]
            if value is not None and pa.types.is_date32(field.type):
                record[field.name] = datetime.date.fromisoformat(value)
            elif value is not None and pa.types.is_boolean(field.type):
                record[field.name] = bool(value)
        records.append(record)
    return pa.Table.from_pylist(records, schema=schema.arrow_schema())


@app.task(bind=True, max_retries=3)
def pay_employees(self, employee_ids: list[str], period: str) -> dict:
    try:
        conn = connection()
        ids = tuple(employee_ids)
        employees = _select(conn, schemas.EMPLOYEES, f'employee_id IN ({_in(ids)})', ids)
        contracts = _select(conn, schemas.CONTRACTS, f'employee_id IN ({_in(ids)})', ids)
        variables = _select(conn, schemas.VARIABLE_ELEMENTS, f'period = ? AND employee_id IN ({_in(ids)})',
                            (period, *ids))
        rates = _select(conn, schemas.WITHHOLDING_RATES, f'period = ? AND employee_id IN ({_in(ids)})',
                        (period, *ids))
        sites = tuple(sorted(set(contracts.column('establishment_siret').to_pylist())))
        establishments = _select(conn, schemas.ESTABLISHMENTS, f'establishment_siret IN ({_in(sites)})', sites)
        assembled = payroll_inputs.assemble(period, employees, contracts, variables, rates, establishments, {})
        paid = 0
        if assembled.month.num_rows:
            lines, totals = payslips.compute(assembled.month, rules(period))
            with conn:  # one transaction per task: its payslips and their lines
                conn.executemany(PAYSLIP_UPSERT, [tuple(r.values()) for r in
                                                  totals.select(list(schemas.PAYSLIPS.names)).to_pylist()])
                conn.executemany(LINE_UPSERT, [tuple(r.values()) for r in
                                               lines.select(list(schemas.PAYSLIP_LINES.names)).to_pylist()])
            paid = totals.num_rows
    except sqlite3.OperationalError as exc:
        raise self.retry(exc=exc, countdown=backoff(self.request.retries))
    return {'employees': len(ids), 'paid': paid, 'refused': len(assembled.dead_letters)}

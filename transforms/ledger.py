"""The run ledger: one row per pipeline run, so a rerun of work that already succeeded does nothing.

Every run of a pipeline has a **run key**, the logical unit of work it performs: the operation plus
its business scope (``matching:2026-12-03``, ``payroll:123456789:2026-11``). Before reading any data a
pipeline calls ``RunLedger(url).begin(run_key, ...)``:

* no run of the key has succeeded: a new run is recorded in state ``running`` (``attempt`` = number
  of earlier runs of the key + 1) and the pipeline goes ahead (``Begin.should_run``);
* a run of the key has succeeded: nothing is recorded and ``Begin`` says
  ``already succeeded as <run_id> at <time>: nothing to do``, unless ``force=True``, which starts a new
  run and keeps the earlier success in the history (``Begin.forced``);
* a run of the key is ``running``: ``begin`` raises ``RunInProgressError``, unless ``resume=True``
  (or ``force=True``), see *Crashed runs* below.

When the pipeline ends it calls ``succeed(run_id, counts, outputs)``, ``fail(run_id, error)`` or
``cancel(run_id)``. Only ``running`` -> ``succeeded`` / ``failed`` / ``cancelled`` is allowed
(``InvalidTransitionError`` otherwise), so a run taken over by another cannot record a late success.

Crashed runs
------------
A launcher that is killed leaves its row ``running`` forever, and the ledger cannot tell it from a
live run: on Dataflow the job keeps running after the launching process is gone, so neither "the
process is dead" nor a heartbeat timeout of the launcher proves the work stopped. Taking over is
therefore an explicit operator decision: ``begin(..., resume=True)`` (meant for a ``--resume`` flag
of the pipelines) marks the ``running`` row ``failed`` with the error ``abandoned: taken over by <new run_id>``
and starts the new run; ``Begin.taken_over`` names the abandoned run so the caller can audit it.
The writes are idempotent (upserts, publish by rename), so redoing the crashed run's work is safe.

Storage and concurrency
-----------------------
One table, ``hrbatch_runs``, in ``sqlite:///PATH`` or ``postgresql://...`` (the URL forms of
``transforms.keyed_write``), created if missing and checked if present (``ConfigError`` if its columns
differ). The schema is the same on both: JSON columns are ``TEXT`` (not ``JSONB``) and times are
UTC ISO 8601 text (``2026-12-03T19:06:35.123456Z``, which sorts as it reads). ``begin`` runs in one
transaction that first takes a lock (SQLite: ``BEGIN IMMEDIATE``, the database write lock;
PostgreSQL: a transaction-scoped advisory lock on the run key), so two concurrent ``begin`` of a key
are serialised: exactly one starts, the other sees its ``running`` row. A unique partial index
(``run_key WHERE state = 'running'``) makes two running rows of a key impossible even for a writer
that bypasses this module. Every call opens and closes its own connection: a handful of calls per
run, safe from any thread or process.

What is stored
--------------
``parameters`` are the run's options after ``safe_parameters`` (``begin`` applies it again, so a
caller that forgets cannot store a secret): keys naming a secret are dropped, passwords in URLs are
masked. ``input_fingerprints`` come from ``fingerprint_inputs``; ``counts`` usually from
``metric_counts`` (the Beam counters); ``outputs`` are the locations written. ``error`` is a short
message (first 500 characters) with e-mail addresses, NIRs and phone numbers masked: a failure must
be recorded even when an exception message quotes a record.

Input fingerprints
------------------
``fingerprint_inputs`` records, for each file matched by the input patterns (local or ``gs://``),
its path and size, and:

* Parquet files (recognised by the ``PAR1`` magic at both ends, whatever the extension): the footer's
  ``num_rows``, ``num_row_groups``, ``created_by`` and the sha256 of the serialized footer. The footer
  holds every column chunk's offsets, sizes and statistics, so any rewrite of the file changes it,
  and it is a few KB to read whatever the file size. It does not see a same-size in-place edit of a
  data page that leaves the statistics unchanged: the fingerprint detects changed inputs, it is not a
  tamper seal.
* other files up to ``full_hash_max_bytes`` (default 256 MiB): the sha256 of the whole content,
  streamed in 1 MiB chunks (``method: sha256``);
* larger ones: the sha256 of the first and last MiB followed by the size in decimal
  (``method: sha256_head_tail``): reading a multi-GB CSV from GCS at every launch would cost more
  than the run's bookkeeping is worth; an append or truncation changes the tail or the size.

Bytes are hashed as stored (``.gz`` files are not decompressed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import getpass
import hashlib
import json
import os
import pathlib
import re
import struct
import typing
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.errors import ConfigError
from transforms.errors import HrbatchError
from transforms.keyed_write import _quote
from transforms.keyed_write import connect
from transforms.keyed_write import parse_sql_target
from transforms.keyed_write import redact_url
from transforms.keyed_write import table_columns

RUNS_TABLE = 'hrbatch_runs'
RUNNING, SUCCEEDED, FAILED, CANCELLED = 'running', 'succeeded', 'failed', 'cancelled'
STATES = (RUNNING, SUCCEEDED, FAILED, CANCELLED)
OPERATOR_ENV = 'HRBATCH_OPERATOR'
# Substrings of option names whose values are secrets (case-insensitive). Beyond the usual four,
# 'hmac' and 'credential' cover the pseudonymisation key and credential files of GDPR pipelines.
SECRET_WORDS = ('password', 'secret', 'key_file', 'token', 'credential', 'hmac', 'private_key', 'api_key')
DEFAULT_FULL_HASH_MAX_BYTES = 256 << 20
_CHUNK = 1 << 20
_MAX_ERROR_CHARS = 500
_OPERATION = re.compile(r'^[a-z][a-z0-9_]*$')
_MAX_KEY_CHARS = 200
_PARQUET_MAGIC = b'PAR1'
_MASKED = '***'
# Fixed key of the PostgreSQL advisory lock that serialises table creation: CREATE TABLE IF NOT
# EXISTS is not safe against a concurrent CREATE of the same table.
_DDL_LOCK = 0x6872626174636801  # 'hrbatch' + 1

_RUN_COLUMNS = {
    'run_id': 'TEXT', 'run_key': 'TEXT', 'operation': 'TEXT', 'state': 'TEXT', 'parameters': 'TEXT',
    'input_fingerprints': 'TEXT', 'counts': 'TEXT', 'outputs': 'TEXT', 'operator': 'TEXT',
    'started_at': 'TEXT', 'ended_at': 'TEXT', 'error': 'TEXT', 'attempt': 'INTEGER',
}
_RUN_DDL = (
    f'CREATE TABLE IF NOT EXISTS {_quote(RUNS_TABLE)} ('
    'run_id TEXT NOT NULL PRIMARY KEY, run_key TEXT NOT NULL, operation TEXT NOT NULL, '
    f"state TEXT NOT NULL CHECK (state IN ({', '.join(repr(s) for s in STATES)})), "
    'parameters TEXT NOT NULL, input_fingerprints TEXT NOT NULL, counts TEXT, outputs TEXT, '
    'operator TEXT NOT NULL, started_at TEXT NOT NULL, ended_at TEXT, error TEXT, attempt INTEGER NOT NULL)',
    # At most one running run per key, whoever writes the table.
    f'CREATE UNIQUE INDEX IF NOT EXISTS hrbatch_runs_one_running ON {_quote(RUNS_TABLE)} (run_key) '
    f"WHERE state = '{RUNNING}'",
    f'CREATE INDEX IF NOT EXISTS hrbatch_runs_by_key ON {_quote(RUNS_TABLE)} (run_key, started_at)',
)


class LedgerError(HrbatchError):
    """A ledger operation that cannot be done: unknown run id, or a transition from a final state."""


class InvalidTransitionError(LedgerError):
    """Only a running run can succeed, fail or be cancelled."""


class RunInProgressError(ConfigError):
    """The run key is already running; raised by ``begin`` at launch, before any data is read."""


# ------------------------------------------------------------------------------------------------
# Small shared helpers (the audit trail uses them too)


def utc_now() -> str:
    """Now, UTC, ISO 8601 with microseconds and a ``Z``: fixed width, so text order is time order."""
    return format_time(datetime.datetime.now(datetime.timezone.utc))


def format_time(moment: datetime.datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError(f'moment={moment!r} is not allowed: it must be timezone-aware')
    return moment.astimezone(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace('Z', '+00:00'))


def current_operator(operator: str | None = None) -> str:
    """Who runs this: ``operator`` if given, else $HRBATCH_OPERATOR, else the OS user name."""
    for candidate in (operator, os.environ.get(OPERATOR_ENV)):
        if candidate and candidate.strip():
            return candidate.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        return f'uid:{os.getuid()}' if hasattr(os, 'getuid') else 'unknown'


def new_run_id(operation: str) -> str:
    """``<operation>-<UTC time>-<8 hex>``, e.g. ``matching-20261203T190635Z-aa5a5a46``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f'{operation}-{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}'


def _to_json(value) -> str:
    # default=str: an option value of an odd type (a path object, an enum) is recorded as its text
    # rather than failing the launch.
    return json.dumps(value, sort_keys=True, separators=(',', ':'), ensure_ascii=False, default=str)


def _from_json(text: str | None):
    return None if text is None else json.loads(text)


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


_FLAG = re.compile(r'^--?([A-Za-z0-9_.-]+)(=.*)?$', re.DOTALL)
_INLINE_PASSWORD = re.compile(r'(?i)\b(password|passwd|pwd)\s*=\s*[^\s&;]+')


def _mask_text(text: str) -> str:
    if '://' in text:
        text = redact_url(text)
    # libpq keyword strings ("host=db password=x") and query strings redact_url did not see.
    return _INLINE_PASSWORD.sub(lambda m: f'{m.group(1)}={_MASKED}', text)


def safe_parameters(parameters):
    """``parameters`` without secrets, for the ledger.

    In mappings, keys containing one of ``SECRET_WORDS`` are dropped (at any depth); in lists of
    command-line arguments, such flags are dropped with their value (``--db_password x``,
    ``--db_password=x``); in every string, URL passwords are masked with ``redact_url`` and
    ``password=...`` pairs are masked.
    """
    if isinstance(parameters, typing.Mapping):
        return {str(k): safe_parameters(v) for k, v in parameters.items() if not _is_secret_name(str(k))}
    if isinstance(parameters, (list, tuple)):
        kept, skip_value = [], False
        for item in parameters:
            if skip_value:
                skip_value = False
                if not (isinstance(item, str) and item.startswith('-')):
                    continue
            flag = _FLAG.match(item) if isinstance(item, str) else None
            if flag and _is_secret_name(flag.group(1)):
                skip_value = flag.group(2) is None  # '--x value': the next item is the secret
                continue
            kept.append(safe_parameters(item))
        return kept
    if isinstance(parameters, str):
        return _mask_text(parameters)
    return parameters


def short_error(error) -> str:
    """A one-paragraph message for the ledger: whitespace collapsed, at most 500 characters, with
    anything that looks like personal data masked (exception messages may quote a record)."""
    # Imported here: the audit module builds on this one.
    from transforms.audit import scrub_personal_data
    if isinstance(error, BaseException):
        text = f'{type(error).__name__}: {error}'
    else:
        text = str(error)
    text = scrub_personal_data(_mask_text(' '.join(text.split())))
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 3] + '...'


def metric_counts(result, namespace: str | None = 'hrbatch') -> dict[str, int]:
    """The Beam counters of a finished pipeline ``result``, summed by name over steps.

    Committed values where the runner reports them, else attempted ones.
    """
    from apache_beam.metrics.metric import MetricsFilter
    query = MetricsFilter()
    if namespace:
        query = query.with_namespace(namespace)
    counts: dict[str, int] = {}
    for counter in result.metrics().query(query)['counters']:
        value = counter.committed if counter.committed is not None else counter.attempted
        counts[counter.key.metric.name] = counts.get(counter.key.metric.name, 0) + int(value or 0)
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------------------------------------
# The database


class Database:
    """A ``sqlite:///PATH`` or ``postgresql://...`` database for hrbatch's own tables.

    ``what`` names the option the URL came from, for error messages. Raises ConfigError for a URL
    that is neither; messages never show a password.
    """

    def __init__(self, url: str, *, what: str = 'database'):
        if not isinstance(url, str) or not url:
            raise ConfigError(f'{what}={url!r}: give a database URL, sqlite:///PATH or postgresql://...')
        try:
            target = parse_sql_target(url)
        except ValueError as error:
            raise ConfigError(f'{what}: {error}') from None
        if target is None:
            raise ConfigError(f'{what}={redact_url(url)!r}: must be sqlite:///PATH (e.g. '
                              'sqlite:///hrbatch-demo/output/hrbatch.db) or postgresql://user@host:port/db')
        self.target = target
        self.what = what

    @property
    def dialect(self) -> str:
        return self.target.dialect

    def __str__(self) -> str:
        return str(self.target)

    def __repr__(self) -> str:
        return f'Database({str(self)!r})'

    def sql(self, statement: str) -> str:
        """``statement`` written with ``?`` placeholders, in this database's placeholder style."""
        return statement.replace('?', '%s') if self.dialect == 'postgresql' else statement

    def execute(self, conn, statement: str, params: tuple = ()):
        return conn.execute(self.sql(statement), params)

    @contextlib.contextmanager
    def session(self, *, create: bool = True):
        """A connection, closed on exit. Without ``create``, a missing SQLite file is a ConfigError
        (reading commands must not leave an empty database behind a mistyped path)."""
        if self.dialect == 'sqlite':
            path = pathlib.Path(self.target.location)
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not path.is_file():
                raise ConfigError(f'{self.what}: no SQLite database at {str(path)!r} ({self}); '
                                  'check the path (it is relative to the current directory)')
        try:
            conn = connect(self.target)
        except Exception as error:  # the driver's own errors: sqlite3.Error, psycopg.Error, OSError
            raise ConfigError(f'{self.what}: cannot connect to {self}: {type(error).__name__}: '
                              f'{_mask_text(str(error))}') from None
        try:
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def transaction(self, conn, *, lock: int | None = None):
        """A write transaction. SQLite: ``BEGIN IMMEDIATE`` takes the database write lock at once
        (waiting up to the busy timeout), so check-then-write cannot interleave with another
        writer. PostgreSQL: with ``lock``, a transaction-scoped advisory lock on that key."""
        if self.dialect == 'postgresql':
            with conn.transaction():
                if lock is not None:
                    conn.execute('SELECT pg_advisory_xact_lock(%s)', (lock,))
                yield conn
            return
        conn.execute('BEGIN IMMEDIATE')
        try:
            yield conn
        except BaseException:
            conn.execute('ROLLBACK')
            raise
        conn.execute('COMMIT')

    def ensure_table(self, table: str, statements: typing.Sequence[str], columns: dict[str, str],
                     key: tuple[str, ...]) -> None:
        """Runs ``statements`` (``CREATE TABLE IF NOT EXISTS``, then its ``CREATE INDEX IF NOT
        EXISTS``), checking after the first that the table has exactly ``columns`` (name -> type) and
        primary key ``key``; ConfigError otherwise, before any index is made on a foreign table."""
        with self.session(create=True) as conn:
            with self.transaction(conn, lock=_DDL_LOCK):
                conn.execute(statements[0])
                found, found_key = table_columns(conn, self.dialect, table)
                self._check_columns(table, found, found_key, columns, key)
                for statement in statements[1:]:
                    conn.execute(statement)

    def check_table(self, table: str, columns: dict[str, str], key: tuple[str, ...], *, purpose: str) -> None:
        """ConfigError unless ``table`` exists with ``columns``; for commands that only read."""
        with self.session(create=False) as conn:
            found, found_key = table_columns(conn, self.dialect, table)
        if not found:
            raise ConfigError(f'{self.what}: {self} has no table {table!r}, so no {purpose} was ever '
                              'recorded there; check the database URL')
        self._check_columns(table, found, found_key, columns, key)

    def _check_columns(self, table, found, found_key, columns, key) -> None:
        if found != columns or tuple(found_key) != tuple(key):
            raise ConfigError(
                f'table {table!r} in {self} exists with columns {found} and primary key {list(found_key)}, '
                f'but hrbatch expects columns {columns} and primary key {list(key)}. It was not created '
                'by this version of hrbatch: use another database, or migrate or rename that table.')


def _key_lock(run_key: str) -> int:
    # A stable signed 64-bit key for pg_advisory_xact_lock (never Python's salted hash()).
    return struct.unpack('>q', hashlib.sha256(run_key.encode()).digest()[:8])[0]


# ------------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One row of the ledger, JSON columns decoded."""
    run_id: str
    run_key: str
    operation: str
    state: str
    parameters: dict
    input_fingerprints: list
    counts: dict | None
    outputs: typing.Any
    operator: str
    started_at: str
    ended_at: str | None
    error: str | None
    attempt: int

    @classmethod
    def from_row(cls, row: typing.Sequence) -> Run:
        values = dict(zip(_RUN_COLUMNS, row))
        for name in ('parameters', 'input_fingerprints', 'counts', 'outputs'):
            values[name] = _from_json(values[name])
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Begin:
    """What ``RunLedger.begin`` decided.

    ``should_run``: True if a new run was started (``run_id`` is it), False if the key already
    succeeded (``run_id`` is that run, ``previous`` its row). ``forced``: a success of the key was
    overridden; ``taken_over``: the run id of a ``running`` run marked failed (abandoned);
    ``inputs_changed``: when skipping or forcing, whether the inputs differ from the success's.
    """
    should_run: bool
    run_id: str
    run_key: str
    operation: str
    attempt: int
    message: str
    previous: Run | None = None
    forced: bool = False
    taken_over: str | None = None
    inputs_changed: bool | None = None


_SELECT_RUNS = f'SELECT {", ".join(_RUN_COLUMNS)} FROM {_quote(RUNS_TABLE)}'


class RunLedger:
    """The runs recorded in the database at ``url`` (``sqlite:///PATH`` or ``postgresql://...``).

    With ``create`` (the default) the table is created if missing; without, a missing database or
    table is a ConfigError (for commands that only read). Either way an existing table is checked.
    """

    def __init__(self, url: str, *, create: bool = True):
        self._db = Database(url, what='run ledger database')
        key = ('run_id',)
        if create:
            self._db.ensure_table(RUNS_TABLE, _RUN_DDL, _RUN_COLUMNS, key)
        else:
            self._db.check_table(RUNS_TABLE, _RUN_COLUMNS, key, purpose='run')

    def __repr__(self) -> str:
        return f'RunLedger({str(self._db)!r})'

    def begin(self, run_key: str, operation: str, parameters: typing.Mapping | None = None,
              inputs: typing.Sequence[dict] = (), operator: str | None = None, *, force: bool = False,
              resume: bool = False, run_id: str | None = None) -> Begin:
        """Starts a run of ``run_key`` unless the key already succeeded (see the module docstring).

        ``inputs``: the fingerprints of ``fingerprint_inputs``; ``operator``: defaults to
        ``current_operator()``; ``run_id``: defaults to ``new_run_id(operation)``. Raises
        RunInProgressError if the key is running and neither ``resume`` nor ``force`` is given.
        """
        if not isinstance(operation, str) or not _OPERATION.match(operation):
            raise ValueError(f'operation={operation!r} is not allowed: operation must be a lower-case '
                             'name such as "matching" (letters, digits, _)')
        if not isinstance(run_key, str) or not run_key.strip() or len(run_key) > _MAX_KEY_CHARS:
            raise ValueError(f'run_key={run_key!r} is not allowed: run_key must be a non-empty string of '
                             f'at most {_MAX_KEY_CHARS} characters, e.g. "{operation}:2026-12-03"')
        run_id = run_id or new_run_id(operation)
        operator = current_operator(operator)
        parameters_json = _to_json(safe_parameters(dict(parameters or {})))
        inputs = list(inputs)
        inputs_json = _to_json(inputs)
        db = self._db
        with db.session() as conn, db.transaction(conn, lock=_key_lock(run_key)):
            runs = [Run.from_row(row) for row in db.execute(
                conn, f'{_SELECT_RUNS} WHERE run_key = ? ORDER BY started_at, run_id', (run_key,)).fetchall()]
            if self._exists(conn, run_id):
                raise LedgerError(f'run id {run_id!r} is already in the ledger; run ids must be unique')
            succeeded = [r for r in runs if r.state == SUCCEEDED]
            previous = succeeded[-1] if succeeded else None
            inputs_changed = None if previous is None else _to_json(previous.input_fingerprints) != inputs_json
            if previous is not None and not force:
                return Begin(should_run=False, run_id=previous.run_id, run_key=run_key, operation=operation,
                             attempt=previous.attempt, previous=previous, inputs_changed=inputs_changed,
                             message=f'already succeeded as {previous.run_id} at {previous.ended_at}: '
                                     'nothing to do')
            running = [r for r in runs if r.state == RUNNING]
            taken_over = None
            if running:
                live = running[-1]
                if not (resume or force):
                    raise RunInProgressError(
                        f'run key {run_key!r} is already running as {live.run_id} (attempt {live.attempt}, '
                        f'started {live.started_at} by {live.operator}). If it is still running, wait '
                        'for it. If it crashed or was killed, rerun with --resume: its row is marked '
                        'failed ("abandoned") and a new run takes over.')
                taken_over = live.run_id
                db.execute(conn, f'UPDATE {_quote(RUNS_TABLE)} SET state = ?, ended_at = ?, error = ? '
                                 'WHERE run_id = ? AND state = ?',
                           (FAILED, utc_now(), f'abandoned: taken over by {run_id}', live.run_id, RUNNING))
            attempt = len(runs) + 1
            db.execute(conn, f'INSERT INTO {_quote(RUNS_TABLE)} ({", ".join(_RUN_COLUMNS)}) '
                             f'VALUES ({", ".join("?" * len(_RUN_COLUMNS))})',
                       (run_id, run_key, operation, RUNNING, parameters_json, inputs_json, None, None,
                        operator, utc_now(), None, None, attempt))
        notes = [f'attempt {attempt}']
        if taken_over:
            notes.append(f'took over abandoned run {taken_over}')
        if previous is not None:
            notes.append(f'forced: {run_key} already succeeded as {previous.run_id} at {previous.ended_at}')
        return Begin(should_run=True, run_id=run_id, run_key=run_key, operation=operation, attempt=attempt,
                     previous=previous, forced=previous is not None, taken_over=taken_over,
                     inputs_changed=inputs_changed, message=f'start run {run_id} ({"; ".join(notes)})')

    def succeed(self, run_id: str, counts: typing.Mapping | None = None, outputs=None) -> Run:
        """Records the success of running run ``run_id`` with its ``counts`` and ``outputs``."""
        return self._finish(run_id, SUCCEEDED, counts=_to_json(dict(counts or {})),
                            outputs=_to_json(safe_parameters(outputs if outputs is not None else {})))

    def fail(self, run_id: str, error) -> Run:
        """Records the failure of running run ``run_id``; ``error`` (text or exception) is shortened
        and scrubbed by ``short_error``."""
        return self._finish(run_id, FAILED, error=short_error(error))

    def cancel(self, run_id: str) -> Run:
        return self._finish(run_id, CANCELLED)

    def _finish(self, run_id: str, state: str, *, counts: str | None = None, outputs: str | None = None,
                error: str | None = None) -> Run:
        db = self._db
        with db.session() as conn, db.transaction(conn):
            # Conditional on the state, so the check and the change are one atomic statement.
            updated = db.execute(
                conn, f'UPDATE {_quote(RUNS_TABLE)} SET state = ?, ended_at = ?, counts = ?, outputs = ?, '
                      'error = ? WHERE run_id = ? AND state = ?',
                (state, utc_now(), counts, outputs, error, run_id, RUNNING)).rowcount
            row = db.execute(conn, f'{_SELECT_RUNS} WHERE run_id = ?', (run_id,)).fetchone()
        if row is None:
            raise LedgerError(f'run id {run_id!r} is not in the ledger {db}')
        run = Run.from_row(row)
        if updated != 1:
            detail = f' ({run.error})' if run.error else ''
            raise InvalidTransitionError(
                f'run {run_id} is {run.state}{detail}, it cannot become {state}: only a running run '
                'can succeed, fail or be cancelled')
        return run

    def _exists(self, conn, run_id: str) -> bool:
        return self._db.execute(conn, f'SELECT 1 FROM {_quote(RUNS_TABLE)} WHERE run_id = ?',
                                (run_id,)).fetchone() is not None

    def get(self, run_id: str) -> Run | None:
        with self._db.session() as conn:
            row = self._db.execute(conn, f'{_SELECT_RUNS} WHERE run_id = ?', (run_id,)).fetchone()
        return None if row is None else Run.from_row(row)

    def latest(self, run_key: str) -> Run | None:
        """The most recently started run of ``run_key``, whatever its state."""
        runs = self.list(run_key=run_key, limit=1)
        return runs[0] if runs else None

    def list(self, operation: str | None = None, run_key: str | None = None, limit: int = 50) -> list[Run]:
        """The most recently started runs, newest first, optionally of one operation or run key."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f'limit={limit!r} is not allowed: limit must be an integer >= 1')
        conditions, params = [], []
        for column, value in (('operation', operation), ('run_key', run_key)):
            if value is not None:
                conditions.append(f'{column} = ?')
                params.append(value)
        where = f' WHERE {" AND ".join(conditions)}' if conditions else ''
        with self._db.session() as conn:
            rows = self._db.execute(
                conn, f'{_SELECT_RUNS}{where} ORDER BY started_at DESC, run_id DESC LIMIT ?',
                (*params, limit)).fetchall()
        return [Run.from_row(row) for row in rows]


# ------------------------------------------------------------------------------------------------
# Input fingerprints


def fingerprint_inputs(patterns: typing.Sequence[str], *,
                       full_hash_max_bytes: int = DEFAULT_FULL_HASH_MAX_BYTES) -> list[dict]:
    """The fingerprint of every file matched by ``patterns`` (see the module docstring), sorted by
    path, each file once. ConfigError if a pattern matches nothing: a run must not be recorded as
    having read an input that is not there."""
    if isinstance(patterns, str):
        raise ValueError(f'patterns={patterns!r} is not allowed: give a list of file patterns')
    if not isinstance(full_hash_max_bytes, int) or full_hash_max_bytes < 2 * _CHUNK:
        raise ValueError(f'full_hash_max_bytes={full_hash_max_bytes!r} is not allowed: it must be an '
                         f'integer >= {2 * _CHUNK} (the head and tail sampled above it)')
    files = {}
    for pattern in patterns:
        # One pattern per call: FileSystems.match uses the filesystem of the first pattern for all.
        metadata_list = FileSystems.match([pattern])[0].metadata_list
        if not metadata_list:
            raise ConfigError(f'input {pattern!r} matches no file')
        for metadata in metadata_list:
            files[metadata.path] = metadata.size_in_bytes
    return [fingerprint_file(path, size, full_hash_max_bytes=full_hash_max_bytes)
            for path, size in sorted(files.items())]


def fingerprint_file(path: str, size: int, *, full_hash_max_bytes: int = DEFAULT_FULL_HASH_MAX_BYTES) -> dict:
    """The fingerprint of one file of ``size`` bytes (see ``fingerprint_inputs``)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        parquet = _parquet_footer(handle, size)
        if parquet is not None:
            return {'path': path, 'size': size, 'format': 'parquet', 'method': 'parquet_footer', **parquet}
        handle.seek(0)
        digest = hashlib.sha256()
        if size <= full_hash_max_bytes:
            method = 'sha256'
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        else:
            method = 'sha256_head_tail'
            digest.update(handle.read(_CHUNK))
            handle.seek(size - _CHUNK)
            digest.update(handle.read(_CHUNK))
            digest.update(str(size).encode())
    return {'path': path, 'size': size, 'format': 'other', 'method': method, 'sha256': digest.hexdigest()}


def _parquet_footer(handle, size: int) -> dict | None:
    """The footer fingerprint if the file is Parquet (magic at both ends), else None."""
    if size < 12 or handle.read(4) != _PARQUET_MAGIC:
        return None
    handle.seek(size - 8)
    tail = handle.read(8)
    if tail[4:] != _PARQUET_MAGIC:
        return None
    footer_length = struct.unpack('<I', tail[:4])[0]
    if footer_length > size - 12:
        return None
    handle.seek(size - 8 - footer_length)
    footer = handle.read(footer_length)
    # The footer alone, framed as a file, is all pyarrow needs to decode the metadata: no second read.
    metadata = pq.read_metadata(pa.BufferReader(_PARQUET_MAGIC + footer + tail))
    return {'num_rows': metadata.num_rows, 'num_row_groups': metadata.num_row_groups,
            'created_by': metadata.created_by, 'footer_sha256': hashlib.sha256(footer).hexdigest()}


# ------------------------------------------------------------------------------------------------
# Progress and cancellation requests


PROGRESS_TABLE = 'hrbatch_run_progress'
_PROGRESS_COLUMNS = {
    'run_id': 'TEXT', 'counter': 'TEXT', 'processed': 'INTEGER', 'total': 'INTEGER', 'rate': 'REAL',
    'updated_at': 'TEXT', 'runner': 'TEXT', 'runner_job_id': 'TEXT', 'cancel_requested_at': 'TEXT',
    'cancel_requested_by': 'TEXT',
}
_PROGRESS_DDL = (
    f'CREATE TABLE IF NOT EXISTS {_quote(PROGRESS_TABLE)} ('
    'run_id TEXT NOT NULL PRIMARY KEY, counter TEXT, processed INTEGER, total INTEGER, rate REAL, '
    'updated_at TEXT, runner TEXT, runner_job_id TEXT, cancel_requested_at TEXT, cancel_requested_by TEXT)',
)
_SELECT_PROGRESS = f'SELECT {", ".join(_PROGRESS_COLUMNS)} FROM {_quote(PROGRESS_TABLE)}'


@dataclasses.dataclass(frozen=True)
class RunProgressRow:
    """The last progress a run reported, its runner (and the runner's job id), and any cancel request.

    ``processed`` is the value of the run's main read counter (``counter``), ``total`` what it will
    reach if known at launch (None otherwise), ``rate`` items per second since the start."""
    run_id: str
    counter: str | None
    processed: int | None
    total: int | None
    rate: float | None
    updated_at: str | None
    runner: str | None
    runner_job_id: str | None
    cancel_requested_at: str | None
    cancel_requested_by: str | None

    @classmethod
    def from_row(cls, row: typing.Sequence) -> RunProgressRow:
        return cls(**dict(zip(_PROGRESS_COLUMNS, row)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RunProgress:
    """Table ``hrbatch_run_progress``, beside ``hrbatch_runs``: one row per run, upserted by the
    process watching the run (throttled: a few writes a minute) and by ``hrbatch cancel``.

    A table of its own rather than columns of ``hrbatch_runs``: ledgers created by earlier versions
    keep working unchanged (their ``hrbatch_runs`` is checked column for column). Without ``create``
    a missing table reads as "no progress recorded" (it is only created by a run that reports).
    """

    def __init__(self, url: str, *, create: bool = True):
        self._db = Database(url, what='run ledger database')
        self._present = True
        key = ('run_id',)
        if create:
            self._db.ensure_table(PROGRESS_TABLE, _PROGRESS_DDL, _PROGRESS_COLUMNS, key)
        else:
            with self._db.session(create=False) as conn:
                found, found_key = table_columns(conn, self._db.dialect, PROGRESS_TABLE)
            self._present = bool(found)
            if found:
                self._db._check_columns(PROGRESS_TABLE, found, found_key, _PROGRESS_COLUMNS, key)

    def __repr__(self) -> str:
        return f'RunProgress({str(self._db)!r})'

    def _upsert(self, run_id: str, values: dict) -> None:
        columns = ['run_id', *values]
        updates = ', '.join(f'{c} = excluded.{c}' for c in values)
        with self._db.session() as conn, self._db.transaction(conn):
            self._db.execute(
                conn, f'INSERT INTO {_quote(PROGRESS_TABLE)} ({", ".join(columns)}) '
                      f'VALUES ({", ".join("?" * len(columns))}) ON CONFLICT (run_id) DO UPDATE SET {updates}',
                (run_id, *values.values()))

    def start(self, run_id: str, *, runner: str, counter: str | None, total: int | None,
              runner_job_id: str | None = None, now: str | None = None) -> None:
        """Records the run's runner and what its progress counts, before it processes anything."""
        self._upsert(run_id, {'counter': counter, 'processed': 0, 'total': total, 'rate': None,
                              'updated_at': now or utc_now(), 'runner': runner, 'runner_job_id': runner_job_id})

    def set_job_id(self, run_id: str, runner_job_id: str | None) -> None:
        self._upsert(run_id, {'runner_job_id': runner_job_id})

    def record(self, run_id: str, processed: int, total: int | None, rate: float | None,
               now: str | None = None) -> None:
        """The run's latest progress (replaces the previous one)."""
        self._upsert(run_id, {'processed': int(processed), 'total': total,
                              'rate': None if rate is None else float(rate), 'updated_at': now or utc_now()})

    def request_cancel(self, run_id: str, operator: str | None = None, now: str | None = None) -> RunProgressRow:
        """Marks a request to cancel ``run_id``; the process running it polls for it and stops.
        The first request is kept (a second one does not move its time)."""
        with self._db.session() as conn, self._db.transaction(conn):
            self._db.execute(
                conn, f'INSERT INTO {_quote(PROGRESS_TABLE)} (run_id, cancel_requested_at, cancel_requested_by) '
                      'VALUES (?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET '
                      f'cancel_requested_at = COALESCE({_quote(PROGRESS_TABLE)}.cancel_requested_at, '
                      'excluded.cancel_requested_at), '
                      f'cancel_requested_by = COALESCE({_quote(PROGRESS_TABLE)}.cancel_requested_by, '
                      'excluded.cancel_requested_by)',
                (run_id, now or utc_now(), current_operator(operator)))
        return self.get(run_id)

    def cancel_requested(self, run_id: str) -> bool:
        row = self.get(run_id)
        return row is not None and row.cancel_requested_at is not None

    def get(self, run_id: str) -> RunProgressRow | None:
        if not self._present:
            return None
        with self._db.session() as conn:
            row = self._db.execute(conn, f'{_SELECT_PROGRESS} WHERE run_id = ?', (run_id,)).fetchone()
        return None if row is None else RunProgressRow.from_row(row)

    def get_many(self, run_ids: typing.Iterable[str]) -> dict[str, RunProgressRow]:
        run_ids = list(dict.fromkeys(run_ids))
        if not self._present or not run_ids:
            return {}
        found = {}
        with self._db.session() as conn:
            for start in range(0, len(run_ids), 500):
                chunk = run_ids[start:start + 500]
                rows = self._db.execute(conn, f'{_SELECT_PROGRESS} WHERE run_id IN ({", ".join("?" * len(chunk))})',
                                        tuple(chunk)).fetchall()
                found.update((r[0], RunProgressRow.from_row(r)) for r in rows)
        return found

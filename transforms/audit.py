"""The audit trail: an append-only, tamper-evident record of what the pipelines did to personal data.

Each record says who (``operator``), when (``recorded_at``, UTC), what (``action`` such as
``run.started``, ``run.succeeded``, ``run.skipped``; ``operation``, ``run_key``, ``run_id``), to which
kinds of data (``data_categories``, e.g. ``["candidates", "job offers", "matches"]``), how much
(``counts``) and which records (``record_refs``: file paths, row counts, key ranges, hashes of keys).
As the CNIL and GDPR require of an audit record, it never holds the personal data itself:
``append`` refuses (``ValueError``) any value that looks like an e-mail address, a NIR or a phone
number, in any field, at any depth (dict keys included). ``operator`` is the one exception for
e-mail addresses: it is the accountable person or service account (``hrbatch@PROJECT.iam.
gserviceaccount.com`` on Dataflow), which the record exists to name. Names cannot be recognised:
record references must be ids (``C0000001``) or hashes by construction, not by this check.

Tamper evidence
---------------
Records are numbered ``seq`` = 1, 2, 3 ... without gaps and chained: ``hash`` is the sha256 of the
canonical JSON (sorted keys, no spaces, UTF-8) of every other field, ``prev_hash`` included, and
``prev_hash`` is the previous record's ``hash`` (64 zeros for seq 1). ``verify()`` recomputes the
chain and reports the first bad record and what happened to it:

* ``modified``: its content no longer matches its hash;
* ``removed``: a seq is missing, or the chain is broken before a record whose own hash is right (a
  record was deleted and the next ones renumbered, or the previous one rewritten with a new hash);
* ``reordered``: its ``prev_hash`` is the hash of another record than its predecessor.

Limits, by construction of an unkeyed hash chain: someone who can write the table can rewrite a
suffix of it with recomputed hashes, or delete its last records, and the chain still verifies.
``verify()`` returns the head hash: keep it outside the database (a log line, a locked object) and
compare it later to detect that. Database privileges are the first line: the pipelines' role needs
only SELECT and INSERT on ``hrbatch_audit``; DELETE belongs to the role that applies retention.

Retention
---------
Audit records are logs: the CNIL (délibération 2021-122) recommends keeping them 6 months to 1 year.
``apply_retention(days=365)`` deletes the oldest records (the longest prefix of seqs recorded before
now - ``days``) and, in the same transaction, appends a ``retention.applied`` anchor whose
``record_refs`` hold ``removed_through_seq``, ``removed_count`` and ``last_removed_hash``. ``verify()``
starts from the first remaining record, checks that an anchor accounts for every seq before it and
that its ``prev_hash`` is the anchor's ``last_removed_hash``; the anchor is itself chained, so it
cannot be edited unseen. Retention refuses to run on a chain that does not verify: it must not erase
the evidence of tampering.

Storage and concurrency
-----------------------
Table ``hrbatch_audit`` in ``sqlite:///PATH`` or ``postgresql://...``, same schema on both (JSON as
``TEXT``, times as UTC ISO 8601 text), created if missing and checked if present. Appends are
serialised: SQLite ``BEGIN IMMEDIATE``, PostgreSQL ``LOCK TABLE ... IN EXCLUSIVE MODE`` (readers are
not blocked), then read the last record, then insert the next seq; ``seq`` is the primary key, so even
a writer bypassing this module cannot reuse one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import re
import typing

from stdnum.fr import nir

from transforms.errors import HrbatchError
from transforms.keyed_write import _quote
from transforms.ledger import Database
from transforms.ledger import current_operator
from transforms.ledger import format_time
from transforms.ledger import utc_now

AUDIT_TABLE = 'hrbatch_audit'
GENESIS_HASH = '0' * 64
DEFAULT_RETENTION_DAYS = 365  # DOMAIN.md: logs are kept 6 months to 1 year

# Actions the pipelines record; any lower-case dotted name is accepted.
RUN_STARTED = 'run.started'
RUN_SUCCEEDED = 'run.succeeded'
RUN_FAILED = 'run.failed'
RUN_CANCELLED = 'run.cancelled'
RUN_SKIPPED = 'run.skipped'        # the run key already succeeded: nothing done
RUN_FORCED = 'run.forced'          # started although the run key already succeeded
RUN_TAKEN_OVER = 'run.taken_over'  # a crashed run marked failed by a resumed one
WINDOW_REFUSED = 'window.refused'
WINDOW_OVERRIDDEN = 'window.overridden'  # started outside its maintenance window with --force
RETENTION_APPLIED = 'retention.applied'

MODIFIED, REMOVED, REORDERED = 'modified', 'removed', 'reordered'

_ACTION = re.compile(r'^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$')
_OPERATION = re.compile(r'^[a-z][a-z0-9_]*$')
_MAX_TEXT = 200
# How far verify() looks for a renumbered record's original seq (only once the chain is broken).
_MAX_RENUMBERING = 10_000

_AUDIT_COLUMNS = {
    'seq': 'INTEGER', 'recorded_at': 'TEXT', 'operator': 'TEXT', 'action': 'TEXT', 'operation': 'TEXT',
    'run_key': 'TEXT', 'run_id': 'TEXT', 'data_categories': 'TEXT', 'counts': 'TEXT', 'record_refs': 'TEXT',
    'prev_hash': 'TEXT', 'hash': 'TEXT',
}
_JSON_COLUMNS = ('data_categories', 'counts', 'record_refs')
_AUDIT_DDL = (
    f'CREATE TABLE IF NOT EXISTS {_quote(AUDIT_TABLE)} ('
    'seq INTEGER NOT NULL PRIMARY KEY, recorded_at TEXT NOT NULL, operator TEXT NOT NULL, '
    'action TEXT NOT NULL, operation TEXT, run_key TEXT, run_id TEXT, data_categories TEXT NOT NULL, '
    'counts TEXT NOT NULL, record_refs TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)',
)
_SELECT = f'SELECT {", ".join(_AUDIT_COLUMNS)} FROM {_quote(AUDIT_TABLE)}'


class AuditIntegrityError(HrbatchError):
    """The chain does not verify, so an operation that would hide it (retention) is refused."""


# ------------------------------------------------------------------------------------------------
# Personal data: recognised, refused in records, masked in free text

_EMAIL = re.compile(r'[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}')
# 15 characters with the key, optionally grouped with spaces or dots ("1 85 05 78 006 084 36"):
# confirmed by the key (stdnum), so 96 in 97 random 15-digit numbers pass.
_NIR_WITH_KEY = re.compile(r'(?<!\w)[0-9](?:[ .]?[0-9AB]){14}(?!\w)')
# 13 characters, as a DSN carries it (no key to check): sex 1/2/3/7/8, a month that is not 00.
# Ids in record_refs should not be bare 13-digit numbers: prefix them (C...) or hash them.
_NIR_WITHOUT_KEY = re.compile(
    r'(?<!\w)[12378][0-9]{2}(?:0[1-9]|1[0-2]|[2-9][0-9])(?:[0-9]{2}|2A|2B)[0-9]{6}(?!\w)')
_NIR_SHAPE = re.compile(r'^[12378][0-9]{2}(?:0[1-9]|1[0-2]|[2-9][0-9])(?:[0-9]{2}|2A|2B)[0-9]{8}$')
# French numbers (0X XX XX XX XX, +33 / 0033, "+33 (0)4 ..."), then any other international one.
_PHONE = re.compile(
    r'(?<![\w+])(?:(?:\+|00)33[ .-]?(?:\(0\)[ .-]?)?[1-9]|0[1-9])(?:[ .-]?[0-9]{2}){4}(?!\w)'
    r'|(?<![\w+])\+[1-9][0-9]{0,2}(?:[ .()-]{0,2}[0-9]){6,13}(?!\w)')


def _valid_nir(text: str) -> bool:
    return nir.is_valid(text)


def personal_data_kind(text: str, *, allow_email: bool = False) -> str | None:
    """What ``text`` contains that looks like personal data ('an e-mail address', 'a NIR',
    'a phone number'), or None."""
    if not allow_email and _EMAIL.search(text):
        return 'an e-mail address'
    if any(_valid_nir(m.group()) for m in _NIR_WITH_KEY.finditer(text)) or _NIR_WITHOUT_KEY.search(text):
        return 'a NIR (social security number)'
    if _PHONE.search(text):
        return 'a phone number'
    return None


def scrub_personal_data(text: str) -> str:
    """``text`` with e-mail addresses, NIRs and phone numbers replaced by ``<email>``, ``<nir>``,
    ``<phone>``: for free text such as error messages, which must be kept but not leak."""
    text = _EMAIL.sub('<email>', text)
    # Any NIR-shaped 15 characters, right key or not: a mistyped NIR is still someone's.
    text = _NIR_WITH_KEY.sub(
        lambda m: '<nir>' if _NIR_SHAPE.match(nir.compact(m.group())) else m.group(), text)
    text = _NIR_WITHOUT_KEY.sub('<nir>', text)
    return _PHONE.sub('<phone>', text)


def check_no_personal_data(field: str, value, *, allow_email: bool = False) -> None:
    """ValueError if a string (or integer, or dict key) anywhere in ``value`` looks like personal data.

    The message names the field and the position, never the value: it may end up in a log.
    """
    def scan(item, where: str) -> None:
        if isinstance(item, str):
            kind = personal_data_kind(item, allow_email=allow_email)
        elif isinstance(item, int) and not isinstance(item, bool):
            # A NIR typed as a number; other numbers (counts) are not inspected.
            kind = 'a NIR (social security number)' if _valid_nir(str(item)) else None
        elif isinstance(item, typing.Mapping):
            for key, nested in item.items():
                scan(key, f'{where} key')  # first: a key that is personal data must not be quoted below
                scan(nested, f'{where}[{key!r}]')
            return
        elif isinstance(item, (list, tuple)):
            for index, nested in enumerate(item):
                scan(nested, f'{where}[{index}]')
            return
        else:
            return
        if kind:
            raise ValueError(
                f'{where} looks like {kind}: audit records hold who, when, what operation, data '
                'categories and record references (ids, key ranges, hashes), never personal data')
    scan(value, field)


# ------------------------------------------------------------------------------------------------
# Records and the chain


def canonical_json(value) -> str:
    """Sorted keys, no spaces, UTF-8 characters as they are, no NaN: one text per value."""
    return json.dumps(value, sort_keys=True, separators=(',', ':'), ensure_ascii=False, allow_nan=False)


def record_hash(fields: typing.Mapping) -> str:
    """The sha256 (hex) of the canonical JSON of every field of a record but ``hash``."""
    payload = {name: fields[name] for name in _AUDIT_COLUMNS if name != 'hash'}
    return hashlib.sha256(canonical_json(payload).encode('utf-8')).hexdigest()


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    seq: int
    recorded_at: str
    operator: str
    action: str
    operation: str | None
    run_key: str | None
    run_id: str | None
    data_categories: list
    counts: dict
    record_refs: typing.Any
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: typing.Sequence) -> AuditRecord:
        values = dict(zip(_AUDIT_COLUMNS, row))
        for name in _JSON_COLUMNS:
            values[name] = json.loads(values[name])
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def row(self) -> tuple:
        values = self.to_dict()
        return tuple(canonical_json(values[n]) if n in _JSON_COLUMNS else values[n] for n in _AUDIT_COLUMNS)


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """``ok`` and the number of ``records`` checked (``first_seq``..``last_seq``, ``head_hash`` the
    last one's hash), or the first bad record: ``bad_seq``, ``problem`` (modified, removed,
    reordered) and a ``message`` naming both."""
    ok: bool
    records: int
    message: str
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None
    bad_seq: int | None = None
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def _decoded(row: typing.Sequence) -> dict | None:
    """The fields of a stored row, JSON decoded, or None if a JSON column no longer parses."""
    values = dict(zip(_AUDIT_COLUMNS, row))
    try:
        for name in _JSON_COLUMNS:
            values[name] = json.loads(values[name])
    except (TypeError, ValueError):
        return None
    return values


def _content_matches_hash(values: dict | None) -> bool:
    if values is None:
        return False
    try:
        return record_hash(values) == values['hash']
    except (TypeError, ValueError):  # a value canonical JSON cannot hold (NaN written in by hand)
        return False


def _renumbered_from(values: dict | None, seq: int) -> int | None:
    """The larger seq this record's content was hashed with, if it was only renumbered down (the
    trace of deleted records whose successors were renumbered to close the gap), else None."""
    if values is None:
        return None
    for original in range(seq + 1, seq + 1 + _MAX_RENUMBERING):
        if _content_matches_hash({**values, 'seq': original}):
            return original
    return None


def verify_rows(rows: typing.Sequence[typing.Sequence]) -> VerifyResult:
    """Verifies stored rows (tuples in ``hrbatch_audit`` column order), sorted by seq."""
    if not rows:
        return VerifyResult(ok=True, records=0, message='0 audit records: nothing to verify')
    records = [dict(zip(_AUDIT_COLUMNS, row)) for row in rows]
    decoded = [_decoded(row) for row in rows]
    seq_of_hash = {r['hash']: r['seq'] for r in records}

    def bad(seq: int, problem: str, message: str) -> VerifyResult:
        return VerifyResult(ok=False, records=len(rows), bad_seq=seq, problem=problem,
                            message=f'seq {seq} {problem}: {message}', first_seq=records[0]['seq'],
                            last_seq=records[-1]['seq'])

    first = records[0]['seq']
    expected_prev, start_note = GENESIS_HASH, 'the genesis hash'
    if first != 1:
        anchors = [(d['seq'], d['record_refs']) for d in decoded
                   if d is not None and d['action'] == RETENTION_APPLIED and isinstance(d['record_refs'], dict)]
        covering = [(seq, refs) for seq, refs in anchors if refs.get('removed_through_seq') == first - 1]
        if not covering:
            # An older anchor tells where the legitimately removed records end.
            earlier = [refs['removed_through_seq'] for _, refs in anchors
                       if isinstance(refs.get('removed_through_seq'), int) and refs['removed_through_seq'] < first - 1]
            missing_from = max(earlier, default=0) + 1
            return bad(missing_from, REMOVED,
                       f'seq {missing_from}..{first - 1} are missing and no {RETENTION_APPLIED} record '
                       'accounts for them (deleted without applying retention)')
        anchor_seq, refs = covering[-1]
        expected_prev = refs.get('last_removed_hash')
        start_note = f'the last removed hash in {RETENTION_APPLIED} record seq {anchor_seq}'

    expected_seq = first
    for record, values in zip(records, decoded):
        seq = record['seq']
        if seq != expected_seq:
            missing = f'seq {expected_seq}' if seq == expected_seq + 1 else f'seq {expected_seq}..{seq - 1}'
            return bad(expected_seq, REMOVED, f'{missing} missing from the sequence (the next present '
                                              f'record is seq {seq})')
        intact = _content_matches_hash(values)
        if record['prev_hash'] != expected_prev:
            predecessor = f'seq {seq - 1}' if seq != first else start_note
            linked = seq_of_hash.get(record['prev_hash'])
            if linked is not None:
                return bad(seq, REORDERED, f'it follows seq {linked} in the chain, not {predecessor}: '
                                           'records were moved or swapped')
            hashed_as = None if intact else _renumbered_from(values, seq)
            if hashed_as is not None:
                return bad(seq, REMOVED, f'seq {seq}..{hashed_as - 1} were deleted and the next records '
                                         f'renumbered: this record was seq {hashed_as}')
            if not intact:
                return bad(seq, MODIFIED, 'its content (prev_hash included) no longer matches its hash')
            return bad(seq, REMOVED, f'the chain is broken before it: its prev_hash is not the hash of '
                                     f'{predecessor} nor of any record (a record was deleted and the next '
                                     f'renumbered, or {predecessor} was rewritten with a new hash)')
        if not intact:
            return bad(seq, MODIFIED, 'its content no longer matches its hash')
        expected_prev = record['hash']
        expected_seq += 1
    return VerifyResult(ok=True, records=len(rows), first_seq=first, last_seq=records[-1]['seq'],
                        head_hash=records[-1]['hash'],
                        message=f'{len(rows)} audit records verified (seq {first}..{records[-1]["seq"]})')


# ------------------------------------------------------------------------------------------------
# The trail


def _check_optional_text(name: str, value) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > _MAX_TEXT):
        raise ValueError(f'{name}={value!r} is not allowed: {name} must be None or a non-empty string of '
                         f'at most {_MAX_TEXT} characters')


def _check_counts(counts) -> None:
    def numbers_only(value) -> bool:
        if isinstance(value, typing.Mapping):
            return all(isinstance(k, str) and numbers_only(v) for k, v in value.items())
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if not isinstance(counts, typing.Mapping) or not numbers_only(counts):
        raise ValueError(f'counts={counts!r} is not allowed: counts must map names to numbers '
                         '(or to such mappings)')


class AuditTrail:
    """The audit trail in the database at ``url`` (``sqlite:///PATH`` or ``postgresql://...``).

    With ``create`` (the default) the table is created if missing; without, a missing database or
    table is a ConfigError (for commands that only read). Either way an existing table is checked.
    """

    def __init__(self, url: str, *, create: bool = True):
        self._db = Database(url, what='audit database')
        if create:
            self._db.ensure_table(AUDIT_TABLE, _AUDIT_DDL, _AUDIT_COLUMNS, ('seq',))
        else:
            self._db.check_table(AUDIT_TABLE, _AUDIT_COLUMNS, ('seq',), purpose='audit record')

    def __repr__(self) -> str:
        return f'AuditTrail({str(self._db)!r})'

    @contextlib.contextmanager
    def _append_lock(self, conn):
        """A write transaction during which no other writer can append."""
        with self._db.transaction(conn):
            if self._db.dialect == 'postgresql':
                # EXCLUSIVE: other writers wait, readers do not.
                conn.execute(f'LOCK TABLE {_quote(AUDIT_TABLE)} IN EXCLUSIVE MODE')
            yield conn

    def append(self, action: str, *, operation: str | None = None, run_key: str | None = None,
               run_id: str | None = None, data_categories: typing.Sequence[str] = (),
               counts: typing.Mapping | None = None, record_refs=None,
               operator: str | None = None) -> AuditRecord:
        """Appends one record and returns it (with its seq and hash).

        ``operator`` defaults to ``current_operator()`` ($HRBATCH_OPERATOR, else the OS user).
        ValueError for a malformed field or anything that looks like personal data.
        """
        if not isinstance(action, str) or not _ACTION.match(action):
            raise ValueError(f'action={action!r} is not allowed: action must be a lower-case dotted name '
                             'such as "run.started"')
        if operation is not None and (not isinstance(operation, str) or not _OPERATION.match(operation)):
            raise ValueError(f'operation={operation!r} is not allowed: operation must be a lower-case name '
                             'such as "matching"')
        _check_optional_text('run_key', run_key)
        _check_optional_text('run_id', run_id)
        if isinstance(data_categories, str) or \
                not all(isinstance(c, str) and c.strip() for c in data_categories):
            raise ValueError(f'data_categories={data_categories!r} is not allowed: give a list of category '
                             'names such as ["candidates", "matches"]')
        data_categories = list(data_categories)
        counts = dict(counts or {})
        _check_counts(counts)
        record_refs = {} if record_refs is None else record_refs
        if not isinstance(record_refs, (typing.Mapping, list, tuple)):
            raise ValueError(f'record_refs of type {type(record_refs).__name__} is not allowed: record_refs '
                             'must be a JSON object or array')
        operator = current_operator(operator)
        check_no_personal_data('operator', operator, allow_email=True)
        for name, value in (('action', action), ('operation', operation), ('run_key', run_key),
                            ('run_id', run_id), ('data_categories', data_categories), ('counts', counts),
                            ('record_refs', record_refs)):
            check_no_personal_data(name, value)
        try:
            # Round-trip now: what is hashed must be exactly what verify() will read back.
            data_categories, counts, record_refs = (json.loads(canonical_json(v))
                                                    for v in (data_categories, counts, record_refs))
        except (TypeError, ValueError) as error:
            raise ValueError(f'audit record fields must be plain JSON (no NaN, no objects): {error}') from None
        fields = dict(operator=operator, action=action, operation=operation, run_key=run_key, run_id=run_id,
                      data_categories=data_categories, counts=counts, record_refs=record_refs)
        with self._db.session() as conn, self._append_lock(conn):
            return self._insert_next(conn, fields)

    def _insert_next(self, conn, fields: dict, last: tuple[int, str] | None = None) -> AuditRecord:
        """Inserts ``fields`` as the record after ``last`` (seq, hash), by default the last one in the
        table; the caller holds the append lock."""
        db = self._db
        if last is None:
            last = db.execute(
                conn, f'SELECT seq, hash FROM {_quote(AUDIT_TABLE)} ORDER BY seq DESC LIMIT 1').fetchone()
        seq, prev_hash = (1, GENESIS_HASH) if last is None else (last[0] + 1, last[1])
        # recorded_at is taken under the lock, so time order is seq order on one clock.
        values = dict(seq=seq, recorded_at=utc_now(), prev_hash=prev_hash, **fields)
        record = AuditRecord(**values, hash=record_hash(values))
        db.execute(conn, f'INSERT INTO {_quote(AUDIT_TABLE)} ({", ".join(_AUDIT_COLUMNS)}) '
                         f'VALUES ({", ".join("?" * len(_AUDIT_COLUMNS))})', record.row())
        return record

    def list_for_run_key(self, run_key: str, *, action: str | None = None, limit: int = 1000) -> list[AuditRecord]:
        """The records of ``run_key`` (of one ``action`` if given), in seq order, at most the last ``limit``."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f'limit={limit!r} is not allowed: limit must be an integer >= 1')
        condition, params = 'run_key = ?', [run_key]
        if action is not None:
            condition, params = condition + ' AND action = ?', params + [action]
        statement = (f'SELECT * FROM ({_SELECT} WHERE {condition} ORDER BY seq DESC LIMIT ?) AS last_records '
                     'ORDER BY seq')
        with self._db.session() as conn:
            rows = self._db.execute(conn, statement, (*params, limit)).fetchall()
        return [AuditRecord.from_row(row) for row in rows]

    def list(self, since: int | str | datetime.datetime | None = None, limit: int = 100) -> list[AuditRecord]:
        """Records in seq order: without ``since``, the last ``limit``; with ``since`` a seq, the first
        ``limit`` after it; with ``since`` a time (datetime or ISO text), the first ``limit`` recorded
        at or after it."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f'limit={limit!r} is not allowed: limit must be an integer >= 1')
        db = self._db
        if since is None:
            statement = f'SELECT * FROM ({_SELECT} ORDER BY seq DESC LIMIT ?) AS last_records ORDER BY seq'
            params: tuple = (limit,)
        elif isinstance(since, int) and not isinstance(since, bool):
            statement, params = f'{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?', (since, limit)
        else:
            moment = since if isinstance(since, datetime.datetime) else \
                datetime.datetime.fromisoformat(str(since).replace('Z', '+00:00'))
            if moment.tzinfo is None:
                raise ValueError(f'since={since!r} is not allowed: give a seq, or a time with its time zone')
            statement = f'{_SELECT} WHERE recorded_at >= ? ORDER BY seq LIMIT ?'
            params = (format_time(moment), limit)
        with db.session() as conn:
            rows = db.execute(conn, statement, params).fetchall()
        return [AuditRecord.from_row(row) for row in rows]

    def verify(self) -> VerifyResult:
        """Recomputes the whole chain (records are small: a year of runs fits in memory)."""
        with self._db.session() as conn:
            rows = self._db.execute(conn, f'{_SELECT} ORDER BY seq').fetchall()
        return verify_rows(rows)

    def apply_retention(self, days: int = DEFAULT_RETENTION_DAYS, *, now: datetime.datetime | None = None,
                        operator: str | None = None) -> AuditRecord | None:
        """Deletes the records older than ``days`` (see the module docstring) and returns the
        ``retention.applied`` anchor, or None when nothing is old enough (and nothing is written).

        ``now`` (timezone-aware) defaults to the current time. Raises AuditIntegrityError, deleting
        nothing, if the chain does not verify.
        """
        if not isinstance(days, int) or isinstance(days, bool) or days < 1:
            raise ValueError(f'days={days!r} is not allowed: days must be an integer >= 1 '
                             f'(default {DEFAULT_RETENTION_DAYS}; the CNIL recommends 6 months to 1 year)')
        now = now or datetime.datetime.now(datetime.timezone.utc)
        cutoff = format_time(now - datetime.timedelta(days=days))
        operator = current_operator(operator)
        check_no_personal_data('operator', operator, allow_email=True)
        db = self._db
        with db.session() as conn, self._append_lock(conn):
            rows = db.execute(conn, f'{_SELECT} ORDER BY seq').fetchall()
            result = verify_rows(rows)
            if not result.ok:
                raise AuditIntegrityError(f'audit trail in {db} does not verify, retention not applied '
                                          f'(it would hide the evidence): {result.message}')
            # The longest prefix recorded before the cutoff: deletions never open a gap.
            removed = []
            for row in rows:
                if row[1] >= cutoff:
                    break
                removed.append(row)
            if not removed:
                return None
            through, last_removed_hash = removed[-1][0], removed[-1][-1]
            db.execute(conn, f'DELETE FROM {_quote(AUDIT_TABLE)} WHERE seq <= ?', (through,))
            refs = {'removed_from_seq': removed[0][0], 'removed_through_seq': through,
                    'removed_count': len(removed), 'last_removed_hash': last_removed_hash,
                    'cutoff': cutoff, 'retention_days': days}
            # After the last record as read before the deletion, which may have removed it.
            return self._insert_next(conn, dict(
                operator=operator, action=RETENTION_APPLIED, operation=None, run_key=None, run_id=None,
                data_categories=[], counts={'records_removed': len(removed)}, record_refs=refs),
                last=(rows[-1][0], rows[-1][-1]))

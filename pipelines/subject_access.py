"""Subject access (GDPR art. 15): one bundle per person, with every record held about them.

``--subjects`` is a CSV file of requests, one a line: ``request_id`` (a reference such as
``SAR-2026-0042``, never personal data), ``received`` (YYYY-MM-DD), at least one identifier among
``email``, ``nir``, ``candidate_id``, ``employee_id``, and optionally ``extended`` (``true`` when the
deadline was extended by two months, art. 12.3). Each dataset given (``--candidates``, ``--matches``,
``--employees``, ``--contracts``, ``--payslips``, ``--payslip_lines``, ``--cpf_credits``: Parquet
directories, files or globs; ``--dsn``: the DSN files) is read exactly once, whatever the number of
requests:

1. the requests are parsed once and broadcast as a side input (a malformed one, an identifier that
   is not an e-mail address or a valid NIR, a repeated request id, becomes a dead letter);
2. the identity datasets (candidates, employees) are scanned once, keeping the rows whose e-mail,
   NIR or id is requested, which gives each request its candidate ids, employee ids and NIRs;
3. those (a side input too) select, in one scan each, the matches (with their score components and
   weights), contracts, payslips, payslip lines, CPF credits and the DSN lines of the person (the
   S21.G00.30 individual block and every block under it, found by the NIR's 13 characters or the
   employee number S21.G00.30.019);
4. the rows are grouped by request and each bundle is written under ``OUTPUT/bundles/REQUEST_ID/``:
   ``bundle.json`` (machine-readable, art. 20), one CSV per dataset, and ``summary.html`` with the
   article 15 information (purposes, categories, recipients, retention, source, rights, the right
   to complain to the CNIL, the automated ranking of candidates) and the audit references (runs of
   the operations that processed the person's datasets).

A person is found only by the identifiers given, never by name: two people with the same name get
two bundles, each with only their own records. Identifiers that designate different people (the
e-mail of one candidate with the id of another) are refused (dead letter, no bundle). An unknown
person gets a bundle that says no record is held. Each request's deadline (one month after receipt,
three if extended) is in the run ledger's outputs; a request answered after it is flagged late.

    hrbatch run subject_access --subjects requests.csv --candidates data/candidates.parquet \\
        --matches out/matches --employees data/employees.parquet --contracts data/contracts.parquet \\
        --payslips 'out/payroll-*/payslips' --payslip_lines 'out/payroll-*/payslip_lines' \\
        --cpf_credits out/cpf-2026/cpf_credits --dsn 'out/dsn-*/files' --output out/sar-2026-12-04
    hrbatch run subject_access --subjects gs://B/sar/requests.csv --candidates gs://B/out/candidates ... \\
        --output gs://B/sar/2026-12-04 --ledger postgresql://... --runner DataflowRunner --project P \\
        --region europe-west9 --temp_location gs://B/tmp
"""
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import re
import sys
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from stdnum.fr import nir as stdnum_nir

from pipelines import lifecycle
from pipelines import options as opts
from transforms import audit
from transforms import datasets
from transforms import dsn_format
from transforms import keyed_write
from transforms import normalize
from transforms import report_html as rh
from transforms import retention
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.dead_letters import DeadLetter
from transforms.dead_letters import WriteDeadLetters
from transforms.errors import ConfigError
from transforms.schemas import LIST_SEPARATOR
from transforms.schemas import to_jsonable

NAME = 'subject_access'
STEP = 'ParseRequests'
_DEAD_LETTERS = 'dead_letters'
_IDENTITY = ('candidates', 'employees')
_LINKED = ('matches', 'contracts', 'payslips', 'payslip_lines', 'cpf_credits', 'dsn')
DATASET_ORDER = _IDENTITY + _LINKED
_REQUEST_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$')
_DSN_COLUMNS = ('file', 'line', 'rubric', 'value')
_ROLE_OF = {'candidates': 'candidate_id', 'employees': 'employee_id'}
COMPLAINT = ('You may lodge a complaint with the CNIL (Commission nationale de l\'informatique et des libertés, '
             '3 place de Fontenoy, TSA 80715, 75334 Paris Cedex 07, www.cnil.fr/plaintes) or the supervisory '
             'authority of the EU country where you live or work (GDPR art. 77).')
RIGHTS = ('You have the right to access your data (art. 15), to have it corrected (art. 16) or erased (art. 17), '
          'to restrict its processing (art. 18), to receive it in a machine-readable format (art. 20, this '
          'bundle\'s JSON and CSV files), and to object to its processing (art. 21). Write to the data '
          'protection officer to use them.')
NOT_FOUND = 'No record about this person is held in any of the datasets searched.'

OPTIONS = (
    opts.Option('subjects', 'CSV file of requests: request_id, received (YYYY-MM-DD), and at least one of email, '
                'nir, candidate_id, employee_id; optional extended (true/false).', required=True),
    *(opts.Option(name, f'The {datasets.CATALOGUE[name].title.lower()}: Parquet dataset directory, file or glob. '
                  'Default: not searched.') for name in DATASET_ORDER if name != 'dsn'),
    opts.Option('dsn', 'The DSN files (*.dsn): a directory (or its files/ subdirectory) or a glob. '
                'Default: not searched.'),
    opts.Option('output', 'Output directory (local or gs://): bundles/REQUEST_ID/, requests/ (the index, no '
                'personal data) and dead_letters/.', required=True),
    opts.Option('as_of', 'The day the bundles are answered, YYYY-MM-DD, for the deadlines. Default: today (UTC).'),
) + lifecycle.LIFECYCLE_OPTIONS


# ------------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass(frozen=True)
class Request:
    request_id: str
    received: datetime.date
    deadline: datetime.date
    extended: bool
    email: str | None = None
    nir: str | None = None
    candidate_id: str | None = None
    employee_id: str | None = None

    def identifiers(self) -> dict:
        return {k: getattr(self, k) for k in datasets.IDENTIFIER_KINDS if getattr(self, k)}

    def late(self, answered: datetime.date) -> bool:
        return answered > self.deadline


def deadline_of(received: datetime.date, extended: bool) -> datetime.date:
    """One month after receipt (art. 12.3), three when extended; 31 January gives 28/29 February."""
    return retention.add_months(received, 3 if extended else 1)


def _compact_nir(text: str) -> str:
    return re.sub(r'[\s.]', '', text).upper()


def parse_requests(text: str, source: str = 'requests') -> tuple[list[Request], list[DeadLetter]]:
    """The valid requests of a CSV text and a dead letter for each malformed one.

    ConfigError for a file that is not a request list at all (no header, no request_id column, no
    identifier column)."""
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if 'request_id' not in header or 'received' not in header or not set(header) & set(datasets.IDENTIFIER_KINDS):
        raise ConfigError(f'--subjects={source!r}: the header must have request_id, received and at least one of '
                          f'{", ".join(datasets.IDENTIFIER_KINDS)}; found {header}')
    unknown = sorted(set(header) - {'request_id', 'received', 'extended', *datasets.IDENTIFIER_KINDS})
    if unknown:
        raise ConfigError(f'--subjects={source!r}: unknown columns {unknown}')
    requests, letters, seen = [], [], set()
    for number, row in enumerate(reader, start=2):
        row = {k: (v or '').strip() for k, v in row.items() if k is not None}
        problem, request = _parse_request(row, seen)
        if problem:
            letters.append(DeadLetter(step=STEP, error=problem, payload=json.dumps(row, ensure_ascii=False,
                                                                                  sort_keys=True),
                                      source=f'{source}#line={number}'))
        else:
            seen.add(request.request_id)
            requests.append(request)
    return requests, letters


def _parse_request(row: dict, seen: set) -> tuple[str | None, Request | None]:
    request_id = row.get('request_id', '')
    if not _REQUEST_ID.match(request_id) or audit.personal_data_kind(request_id):
        return ('request_id must be a reference of 1 to 64 letters, digits, _ . : - (never personal data such '
                'as an e-mail address)'), None
    if request_id in seen:
        return f'request_id {request_id} is repeated: each request is answered once', None
    try:
        received = datetime.date.fromisoformat(row.get('received', ''))
    except ValueError:
        return f'request {request_id}: received must be a date YYYY-MM-DD', None
    extended_text = row.get('extended', '').lower()
    if extended_text not in ('', 'true', 'false'):
        return f'request {request_id}: extended must be true or false', None
    values = {}
    if row.get('email'):
        email, invalid = normalize.email(pa.array([row['email']]))
        if invalid[0] or email[0].as_py() is None:
            return f'request {request_id}: email is not an e-mail address', None
        values['email'] = email[0].as_py()
    if row.get('nir'):
        compact = _compact_nir(row['nir'])
        if not stdnum_nir.is_valid(compact):
            return f'request {request_id}: nir is not a valid NIR (15 characters with its key)', None
        values['nir'] = compact
    for kind in ('candidate_id', 'employee_id'):
        if row.get(kind):
            if not _ID.match(row[kind]):
                return f'request {request_id}: {kind} must be letters, digits, _ . : - (at most 64)', None
            values[kind] = row[kind]
    if not values:
        return f'request {request_id}: no identifier; give at least one of {", ".join(datasets.IDENTIFIER_KINDS)}', None
    extended = extended_text == 'true'
    return None, Request(request_id=request_id, received=received, deadline=deadline_of(received, extended),
                         extended=extended, **values)


def read_text(path: str) -> str:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read().decode('utf-8-sig')


class _ParseRequestsFn(beam.DoFn):
    """Reads the request file on a worker: the identifiers are never part of the job graph."""

    def process(self, path: str):
        requests, letters = parse_requests(read_text(path), path)
        Metrics.counter(METRICS_NAMESPACE, 'requests_read').inc(len(requests))
        yield from requests
        for letter in letters:
            yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, letter)


# ------------------------------------------------------------------------------------------------
# Scanning a dataset once


def _wanted_index(triples) -> dict:
    """kind -> value -> sorted request ids, from (kind, value, request_id) triples."""
    index = {}
    for kind, value, request_id in triples:
        index.setdefault(kind, {}).setdefault(value, set()).add(request_id)
    return {kind: {v: sorted(ids) for v, ids in values.items()} for kind, values in index.items()}


def request_identifiers(request: Request):
    """The (kind, value, request_id) triples a request looks for directly."""
    return [(kind, value, request.request_id) for kind, value in request.identifiers().items()]


def _normalised(values: pa.Array, kind: str) -> pa.Array:
    values = pc.cast(values, pa.string())
    if kind == 'email':
        return pc.utf8_lower(pc.utf8_trim_whitespace(values))
    if kind == 'nir':
        return pc.utf8_upper(pc.replace_substring_regex(values, r'[\s.]', ''))
    return values


def matching_rows(batch: pa.RecordBatch, person_fields: dict, index: dict):
    """(request id, via kind, row) for each row of ``batch`` a request looks for, once per identifier
    kind that finds it; a vectorised filter, Python only for the rows kept."""
    for field, kind in person_fields.items():
        wanted = index.get(kind)
        if not wanted or field not in batch.schema.names:
            continue
        values = _normalised(batch.column(field), kind)
        mask = pc.fill_null(pc.is_in(values, value_set=pa.array(list(wanted), pa.string())), False)
        rows = pc.indices_nonzero(mask)
        if not len(rows):
            continue
        picked = batch.take(rows)
        keys = _normalised(picked.column(field), kind).to_pylist()
        for key, row in zip(keys, picked.to_pylist()):
            for request_id in wanted[key]:
                yield request_id, kind, row


class _ScanParquetFn(beam.DoFn):
    """One file of one dataset, read once: (request id, (dataset, via, row JSON)) per wanted row."""

    def __init__(self, dataset: str):
        self._dataset = dataset
        self._fields = datasets.CATALOGUE[dataset].person_fields
        self._scanned = Metrics.counter(METRICS_NAMESPACE, f'{dataset}_files_scanned')
        self._rows = Metrics.counter(METRICS_NAMESPACE, f'{dataset}_rows_scanned')
        self._found = Metrics.counter(METRICS_NAMESPACE, f'{dataset}_rows_found')
        self._cache = (None, None)

    def _index(self, triples):
        if self._cache[0] is not triples:
            self._cache = (triples, _wanted_index(triples))
        return self._cache[1]

    def process(self, path: str, triples):
        index = self._index(triples)
        self._scanned.inc()
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            with pq.ParquetFile(handle) as parquet_file:
                for batch in parquet_file.iter_batches(batch_size=65_536):
                    self._rows.inc(batch.num_rows)
                    for request_id, via, row in matching_rows(batch, self._fields, index):
                        self._found.inc()
                        yield request_id, (self._dataset, via, _row_json(row))


def _row_json(row: dict) -> str:
    return json.dumps({k: to_jsonable(v) for k, v in row.items()}, ensure_ascii=False, sort_keys=True)


def dsn_person_blocks(data: bytes):
    """(NIR's 13 characters, employee number, [(line number, rubric, value)]) of every individual
    block (S21.G00.30 and the blocks under it, S21.G00.31 to .99) of a DSN file."""
    lines = dsn_format.parse(data)
    block, nir13, number = None, None, None
    previous_group = None
    for line_number, (rubric, value) in enumerate(lines, start=1):
        group = rubric[:10]
        individual = group.startswith('S21.G00.') and int(group[8:10]) >= 30
        if group == 'S21.G00.30' and previous_group != 'S21.G00.30':
            if block:
                yield nir13, number, block
            block, nir13, number = [], None, None
        elif not individual and block is not None:
            if block:
                yield nir13, number, block
            block = None
        if block is not None:
            block.append((line_number, rubric, value))
            if rubric == 'S21.G00.30.001':
                nir13 = value
            elif rubric == 'S21.G00.30.019':
                number = value
        previous_group = group
    if block:
        yield nir13, number, block


class _ScanDsnFn(_ScanParquetFn):

    def __init__(self):
        super().__init__('dsn')

    def process(self, path: str, triples):
        index = self._index(triples)
        nirs = {value[:13]: ids for value, ids in index.get('nir', {}).items()}
        numbers = index.get('employee_id', {})
        self._scanned.inc()
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            data = handle.read()
        try:
            blocks = list(dsn_person_blocks(data))
        except dsn_format.DsnFormatError as error:
            yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, DeadLetter(
                step='ScanDsn', error=f'not a DSN file: {error}', payload='', source=path))
            return
        name = FileSystems.split(path)[1]
        for nir13, number, block in blocks:
            self._rows.inc(len(block))
            requests = sorted(set(nirs.get(nir13, ())) | set(numbers.get(number, ())))
            for request_id in requests:
                via = 'nir' if request_id in nirs.get(nir13, ()) else 'employee_id'
                for line_number, rubric, value in block:
                    self._found.inc()
                    yield request_id, ('dsn', via, json.dumps(
                        {'file': name, 'line': line_number, 'rubric': rubric, 'value': value},
                        ensure_ascii=False, sort_keys=True))


def _linked_identifiers(element) -> list:
    """The ids an identity row gives its request, for the second scan."""
    request_id, (dataset, _, row_json) = element
    row = json.loads(row_json)
    triples = []
    for field in ('candidate_id', 'employee_id', 'nir'):
        if row.get(field):
            triples.append((field, row[field] if field != 'nir' else _compact_nir(row[field]), request_id))
    return triples


# ------------------------------------------------------------------------------------------------
# Bundles


def conflicts(request: Request, hits: list[tuple[str, str, dict]]) -> str | None:
    """Why the identifiers of ``request`` designate different people, or None.

    For each role (candidate, employee), each identifier given finds a set of records; two
    identifiers that both find records but none in common designate two people."""
    for dataset, id_field in _ROLE_OF.items():
        found_by = {}
        for hit_dataset, via, row in hits:
            if hit_dataset == dataset:
                found_by.setdefault(via, set()).add(row.get(id_field))
        sets = [ids for ids in found_by.values() if ids]
        if len(sets) > 1 and not set.intersection(*sets):
            return (f'request {request.request_id}: its identifiers ({", ".join(sorted(found_by))}) designate '
                    f'different {dataset}; check the requester\'s identity and send one person\'s identifiers')
    return None


def _csv_text(dataset: str, rows: list[dict]) -> str:
    spec = datasets.CATALOGUE[dataset]
    columns = list(_DSN_COLUMNS if spec.schema is None else spec.schema.names)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator='\n')
    writer.writerow(columns)
    for row in rows:
        writer.writerow(['' if row.get(c) is None else
                         LIST_SEPARATOR.join(map(str, row[c])) if isinstance(row.get(c), list) else row[c]
                         for c in columns])
    return out.getvalue()


def _retention_text(spec: datasets.Dataset) -> str:
    r = spec.retention
    period = {'y': 'years', 'm': 'months', 'd': 'days'}[r.period[-1]]
    start = f'after {r.date_field.replace("_", " ")}' if r.date_field else f'with the {r.follows} record'
    return f'{r.period[:-1]} {period} {start} ({r.source})'


def bundle_document(request: Request, found: dict[str, list[dict]], audit_refs: list[dict],
                    answered: datetime.date) -> dict:
    """The machine-readable bundle: the request, every record per dataset, the article 15 information."""
    any_found = any(found.values())
    return {
        'request': {'request_id': request.request_id, 'received': request.received.isoformat(),
                    'deadline': request.deadline.isoformat(), 'extended': request.extended,
                    'answered': answered.isoformat(), 'late': request.late(answered),
                    'identifiers': request.identifiers()},
        'found': any_found,
        'message': None if any_found else NOT_FOUND,
        'datasets': {name: {
            'title': datasets.CATALOGUE[name].title, 'records': found.get(name, []),
            'purposes': datasets.CATALOGUE[name].purposes,
            'categories': list(datasets.CATALOGUE[name].categories),
            'recipients': datasets.CATALOGUE[name].recipients,
            'retention': _retention_text(datasets.CATALOGUE[name]),
            'source': datasets.CATALOGUE[name].source,
            'legal_basis': datasets.CATALOGUE[name].legal_basis,
        } for name in DATASET_ORDER},
        'automated_decision_making': datasets.CATALOGUE['candidates'].automated_decision
        if found.get('candidates') or found.get('matches') else
        'No decision about you is taken by automated means in the data held.',
        'rights': RIGHTS,
        'complaint': COMPLAINT,
        'audit_references': audit_refs,
    }


def bundle_html(document: dict) -> str:
    request = document['request']
    parts = [rh.kpis([
        ('Received', request['received'], 'request date'),
        ('Deadline', request['deadline'], 'three months (extended)' if request['extended'] else 'one month'),
        ('Answered', request['answered'], 'LATE' if request['late'] else 'within the deadline'),
        ('Records', rh.fmt_int(sum(len(d['records']) for d in document['datasets'].values())), 'in all datasets'),
    ])]
    if not document['found']:
        parts.append(rh.section('Your data', f'<p>{rh.esc(NOT_FOUND)}</p>'))
    info_rows = []
    for name, entry in document['datasets'].items():
        info_rows.append([entry['title'], len(entry['records']), entry['purposes'], ', '.join(entry['categories']),
                          entry['recipients'], entry['retention'], entry['source'], entry['legal_basis']])
        if not entry['records']:
            continue
        spec = datasets.CATALOGUE[name]
        columns = list(_DSN_COLUMNS if spec.schema is None else spec.schema.names)
        parts.append(rh.section(entry['title'], rh.table(
            [rh.Column(c, lambda v: '' if v is None else (LIST_SEPARATOR.join(map(str, v)) if isinstance(v, list)
                                                          else str(v))) for c in columns],
            [[record.get(c) for c in columns] for record in entry['records']]),
            note=f'{len(entry["records"]):,} records; every one is in {name}.csv and bundle.json.'))
    parts.append(rh.section('Why and how your data is processed (GDPR art. 15)', rh.table(
        [rh.Column(c, str, numeric=c == 'records') for c in (
            'dataset', 'records', 'purposes', 'categories', 'recipients', 'retention', 'source', 'legal basis')],
        info_rows)))
    parts.append(rh.section('Automated decision-making', f'<p>{rh.esc(document["automated_decision_making"])}</p>'))
    parts.append(rh.section('Your rights', f'<p>{rh.esc(document["rights"])}</p><p>{rh.esc(document["complaint"])}</p>'))
    if document['audit_references']:
        parts.append(rh.section('Processing runs (audit trail references)', rh.table(
            [rh.Column(c, lambda v: '' if v is None else str(v)) for c in ('seq', 'recorded_at', 'operation', 'run_id')],
            [[ref[c] for c in ('seq', 'recorded_at', 'operation', 'run_id')] for ref in document['audit_references']])))
    return rh.page(title=f'Subject access request {request["request_id"]}',
                   subtitle='A copy of the personal data we hold about you (GDPR article 15)',
                   meta=f'Answered {request["answered"]}; machine-readable copy: bundle.json and one CSV per dataset.',
                   body=''.join(parts), footer='hrbatch subject_access')


def _write_files(directory: str, files: dict[str, bytes]) -> None:
    """Writes each file under a temporary name, then renames them into ``directory``."""
    temp_dir = FileSystems.join(directory, f'.tmp-{uuid.uuid4().hex}')
    if FileSystems.get_filesystem(directory).has_dirs():
        FileSystems.mkdirs(temp_dir)
    for name, data in files.items():
        with FileSystems.create(FileSystems.join(temp_dir, name),
                                compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(data)
    for name in files:
        keyed_write.publish(FileSystems.join(temp_dir, name), FileSystems.join(directory, name))
    keyed_write.remove_temp_dir(temp_dir)


class _WriteBundleFn(beam.DoFn):
    """Writes one request's bundle; yields its index line (request id, dates, counts: nothing personal)."""

    def __init__(self, output: str, answered: datetime.date):
        self._output, self._answered = output, answered
        self._bundles = Metrics.counter(METRICS_NAMESPACE, 'bundles_written')
        self._not_found = Metrics.counter(METRICS_NAMESPACE, 'subjects_not_found')
        self._late = Metrics.counter(METRICS_NAMESPACE, 'requests_late')

    def process(self, element, audit_entries):
        request_id, items = element
        requests = [value for tag, value in items if tag == 'request']
        if not requests:
            return  # hits of a request that was refused upstream cannot happen; nothing to answer
        request = requests[0]
        hits = sorted({value for tag, value in items if tag == 'hit'})
        decoded = [(dataset, via, json.loads(row)) for dataset, via, row in hits]
        problem = conflicts(request, decoded)
        if problem:
            yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, DeadLetter(
                step='WriteBundles', error=problem, payload=json.dumps(request.identifiers(), sort_keys=True),
                source=request.request_id))
            yield json.dumps({'request_id': request_id, 'status': 'refused', **_dates(request, self._answered)})
            return
        found = {name: [] for name in DATASET_ORDER}
        seen = set()
        for dataset, _, row in decoded:
            marker = (dataset, json.dumps(row, sort_keys=True))
            if marker not in seen:
                seen.add(marker)
                found[dataset].append(row)
        operations = sorted({op for name, rows in found.items() if rows for op in datasets.CATALOGUE[name].operations})
        refs = [e for e in audit_entries if e['operation'] in operations]
        document = bundle_document(request, found, refs, self._answered)
        directory = FileSystems.join(self._output, 'bundles', request.request_id)
        files = {'bundle.json': (json.dumps(document, ensure_ascii=False, indent=1, sort_keys=True) + '\n').encode(),
                 'summary.html': bundle_html(document).encode()}
        for name in DATASET_ORDER:
            files[f'{name}.csv'] = _csv_text(name, found[name]).encode()
        _write_files(directory, files)
        self._bundles.inc()
        if not document['found']:
            self._not_found.inc()
        if request.late(self._answered):
            self._late.inc()
        yield json.dumps({'request_id': request_id, 'status': 'found' if document['found'] else 'not_found',
                          'records': {n: len(r) for n, r in found.items()}, **_dates(request, self._answered)},
                         sort_keys=True)


def _dates(request: Request, answered: datetime.date) -> dict:
    return {'received': request.received.isoformat(), 'deadline': request.deadline.isoformat(),
            'late': request.late(answered)}


# ------------------------------------------------------------------------------------------------
# The pipeline


@dataclasses.dataclass(frozen=True)
class SubjectAccessConfig:
    subjects: str
    files: dict            # dataset -> tuple of files (only the datasets given)
    output: str
    as_of: datetime.date
    ledger_url: str
    run_id: str
    requests: tuple        # parsed at launch for the ledger: ids and dates only are used

    @classmethod
    def from_values(cls, values: dict, *, run_id: str) -> 'SubjectAccessConfig':
        try:
            text = read_text(values['subjects'])
        except (OSError, IOError) as error:
            raise ConfigError(f'--subjects={values["subjects"]!r}: cannot read it ({type(error).__name__})') from None
        requests, _ = parse_requests(text, values['subjects'])
        files = {}
        for name in DATASET_ORDER:
            if values[name]:
                layout = datasets.CATALOGUE[name].layout
                files[name] = tuple(retention.dataset_files(values[name], layout=layout, where=f'--{name}'))
        if not files:
            raise ConfigError(f'give at least one dataset to search: {", ".join("--" + n for n in DATASET_ORDER)}')
        as_of = _parse_day(values['as_of'])
        url = lifecycle.RunSpec.from_values(NAME, values, values['output']).ledger_url
        return cls(subjects=values['subjects'], files=files, output=values['output'], as_of=as_of, ledger_url=url,
                   run_id=run_id, requests=tuple((r.request_id, r.received, r.deadline) for r in requests))


def _parse_day(text: str | None) -> datetime.date:
    if text is None:
        return datetime.datetime.now(datetime.timezone.utc).date()
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f'--as_of={text!r}: must be a date YYYY-MM-DD') from None


def audit_entries(ledger_url: str) -> list[dict]:
    """The successful runs of the audit trail (no personal data by construction): seq, time, operation, run.
    Read only: a ledger without an audit trail yet has no runs to refer to (and gets no table)."""
    try:
        trail = audit.AuditTrail(ledger_url, create=False)
    except ConfigError:
        return []
    records = trail.list(since=0, limit=10_000_000)
    return [{'seq': r.seq, 'recorded_at': r.recorded_at, 'operation': r.operation, 'run_id': r.run_id,
             'run_key': r.run_key, 'data_categories': r.data_categories}
            for r in records if r.action == audit.RUN_SUCCEEDED]


def build(pipeline: beam.Pipeline, config: SubjectAccessConfig, store=None) -> dict:
    del store  # bundles are rewritten whole on a rerun
    parsed = (pipeline
              | 'RequestsFile' >> beam.Create([config.subjects])
              | STEP >> beam.ParDo(_ParseRequestsFn()).with_outputs(_DEAD_LETTERS, main='requests'))
    requests = parsed.requests
    direct = requests | 'DirectIdentifiers' >> beam.FlatMap(request_identifiers)
    identity_hits = []
    for name in _IDENTITY:
        if name in config.files:
            label = name.title()
            identity_hits.append(
                pipeline | f'List{label}' >> beam.Create(list(config.files[name]))
                | f'Scan{label}' >> beam.ParDo(_ScanParquetFn(name), triples=beam.pvalue.AsList(direct)))
    identity = identity_hits | 'IdentityHits' >> beam.Flatten()
    linked_ids = ((direct, identity | 'LinkedIdentifiers' >> beam.FlatMap(_linked_identifiers))
                  | 'AllIdentifiers' >> beam.Flatten())
    hits, letters = [identity], [parsed[_DEAD_LETTERS]]
    for name in _LINKED:
        if name not in config.files:
            continue
        label = ''.join(part.title() for part in name.split('_'))
        files = pipeline | f'List{label}' >> beam.Create(list(config.files[name]))
        if name == 'dsn':
            scanned = files | 'ScanDsn' >> beam.ParDo(_ScanDsnFn(), triples=beam.pvalue.AsList(linked_ids)) \
                .with_outputs(_DEAD_LETTERS, main='hits')
            hits.append(scanned.hits)
            letters.append(scanned[_DEAD_LETTERS])
        else:
            hits.append(files | f'Scan{label}' >> beam.ParDo(_ScanParquetFn(name),
                                                             triples=beam.pvalue.AsList(linked_ids)))
    entries = pipeline | 'AuditTrail' >> beam.Create([audit_entries(config.ledger_url)])
    keyed = (
        (requests | 'KeyRequests' >> beam.Map(lambda r: (r.request_id, ('request', r))),
         hits | 'AllHits' >> beam.Flatten() | 'KeyHits' >> beam.MapTuple(lambda rid, hit: (rid, ('hit', hit))))
        | 'RequestsAndHits' >> beam.Flatten()
        | 'ByRequest' >> beam.GroupByKey())
    written = keyed | 'WriteBundles' >> beam.ParDo(
        _WriteBundleFn(config.output, config.as_of), audit_entries=beam.pvalue.AsSingleton(entries)) \
        .with_outputs(_DEAD_LETTERS, main='index')
    letters.append(written[_DEAD_LETTERS])
    written.index | 'WriteIndex' >> beam.io.WriteToText(
        FileSystems.join(config.output, 'requests', f'index-{config.run_id}'), file_name_suffix='.jsonl')
    dead_letters = letters | 'AllDeadLetters' >> beam.Flatten()
    dead_letters | 'WriteDeadLetters' >> WriteDeadLetters(
        output_prefix=FileSystems.join(config.output, 'dead_letters', 'dead_letters'), run_id=config.run_id)
    return {'index': written.index, 'dead_letters': dead_letters}


def read_index(output: str, run_id: str) -> list[dict]:
    pattern = FileSystems.join(output, 'requests', f'index-{run_id}*.jsonl')
    rows = []
    for result in FileSystems.match([pattern]):
        for metadata in sorted(result.metadata_list, key=lambda m: m.path):
            rows += [json.loads(line) for line in read_text(metadata.path).splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r['request_id'])


def summarize(result, config: SubjectAccessConfig, built) -> tuple[dict, lifecycle.Outcome]:
    index = read_index(config.output, config.run_id)
    passes = {name: round(lifecycle.counter(result, f'{name}_files_scanned') / len(files), 3)
              for name, files in config.files.items()}
    summary = {
        'run_id': config.run_id, 'as_of': config.as_of.isoformat(),
        **{n: lifecycle.counter(result, n) for n in ('requests_read', 'bundles_written', 'subjects_not_found',
                                                      'requests_late', 'dead_letters')},
        'refused': sum(1 for r in index if r['status'] == 'refused'),
        'late': [r['request_id'] for r in index if r['late']],
        'passes_per_dataset': passes,
        'rows_scanned': {n: lifecycle.counter(result, f'{n}_rows_scanned') for n in config.files},
        'output': config.output,
    }
    tracking = [{k: r[k] for k in ('request_id', 'received', 'deadline', 'late', 'status')} for r in index]
    counts = {k: summary[k] for k in ('requests_read', 'bundles_written', 'subjects_not_found', 'requests_late',
                                      'refused', 'dead_letters')}
    return summary, lifecycle.Outcome(
        counts=counts,
        outputs={'bundles': FileSystems.join(config.output, 'bundles'), 'requests': tracking},
        record_refs={'requests': [r['request_id'] for r in index], 'late': summary['late'],
                     'datasets': sorted(config.files)})


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, writes the bundles under the run ledger, returns the summary (or ``skipped``)."""
    values, beam_args = opts.parse(OPTIONS, list(sys.argv[1:] if argv is None else argv), prog=f'hrbatch run {NAME}')
    if not values['run_key']:
        try:
            digest = hashlib.sha256(read_text(values['subjects']).encode()).hexdigest()[:12]
        except (OSError, IOError):
            digest = 'unreadable'  # from_values names the problem
        values['run_key'] = f'{NAME}:{_parse_day(values["as_of"]).isoformat()}:{digest}'
    spec, summary = lifecycle.run_pipeline(
        NAME, values, beam_args, output=values['output'],
        make_config=lambda run_id: SubjectAccessConfig.from_values(values, run_id=run_id), build=build,
        summarize=summarize, inputs=lambda config: [config.subjects],
        data_categories=sorted({d.category for d in datasets.CATALOGUE.values()}))
    if 'bundles_written' not in summary:
        return summary
    print(f"Subject access, run {summary['run_id']}: {summary['bundles_written']:,} bundles "
          f"({summary['subjects_not_found']:,} for people of whom nothing is held), {summary['refused']:,} refused, "
          f"{summary['dead_letters']:,} dead letters.")
    if summary['late']:
        print(f"LATE: {len(summary['late'])} requests answered after their deadline: {', '.join(summary['late'][:20])}"
              f"{' ...' if len(summary['late']) > 20 else ''}")
    print(f"Bundles:               {FileSystems.join(summary['output'], 'bundles')}/REQUEST_ID/")
    print(f"Passes per dataset:    {summary['passes_per_dataset']}")
    print(lifecycle.ledger_line(spec))
    return summary


if __name__ == '__main__':
    from pipelines.cli import main_for
    sys.exit(main_for(NAME))

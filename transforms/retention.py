"""GDPR retention: the policy file, the secret key, and anonymisation on whole Arrow columns.

Pure functions, unit-tested without Beam (``tests/transforms/test_retention.py``); the pipelines
``gdpr_anonymize`` and ``subject_access`` call them.

Anonymisation of one record past retention (``anonymise_table``), field by field as the catalogue
(``transforms.datasets``) says:

- ``pseudonym``: a keyed pseudonym ``anon-`` + the first 20 hex digits of HMAC-SHA256(key,
  domain NUL value), the same for a value in every dataset (a candidate's id in its profile and in
  its matches), so anonymised records stay linked to each other and to nothing else. Without the
  key nobody can recompute it from an identifier (EDPB guidelines 01/2025).
  ``pseudonym_email``: the same, shaped as an address of the reserved ``.invalid`` domain
  (``anon-...@anonymised.invalid``), so the field still reads as an e-mail address.
- ``remove``: null, or the empty string in a field that cannot be null; ``clear`` (free text) the same.
- generalisations: ``year`` (a date to the 1st of January of its year), ``departement`` (a postcode to
  its département: 75, 2A, 2B, 971...), ``band`` (a number down to a multiple of the width),
  ``round`` (to so many decimals).

Every treatment is idempotent (a pseudonym, a département, a band... is left as it is), so
anonymising a record twice gives the record once anonymised, and ``anonymise_table`` applied to its
own output changes nothing: a run of ``gdpr_anonymize`` over already anonymised data rewrites no file.

k-anonymity (``group_keys``, ``small_groups``): the anonymised records of a dataset are grouped by
their generalised quasi-identifiers; a group of fewer than k records would single its members out
(WP216), so its records are suppressed (deleted: they are past retention anyway) and counted.
"""
import dataclasses
import datetime
import hmac
import os
import re
import typing

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.errors import ConfigError

PSEUDONYM_PREFIX = 'anon-'
PSEUDONYM_HEX = 20
EMAIL_DOMAIN = '@anonymised.invalid'
_PSEUDONYM = rf'^{PSEUDONYM_PREFIX}[0-9a-f]{{{PSEUDONYM_HEX}}}$'
_PSEUDONYM_EMAIL = rf'^{PSEUDONYM_PREFIX}[0-9a-f]{{{PSEUDONYM_HEX}}}{re.escape(EMAIL_DOMAIN)}$'
MIN_KEY_BYTES = 32
DEFAULT_K = 5
MAX_K = 1_000
_GROUP_SEPARATOR = '\x1f'
_NULL_TEXT = '\x00'

TREATMENTS = ('pseudonym', 'pseudonym_email', 'remove', 'clear', 'year', 'departement', 'band', 'round')
_GENERALISING = ('year', 'departement', 'band', 'round')


@dataclasses.dataclass(frozen=True)
class Treatment:
    """What anonymisation does to one field; ``param`` is the pseudonym domain, band width or decimals."""
    kind: str
    param: typing.Any = None

    def __post_init__(self):
        if self.kind not in TREATMENTS:
            raise ValueError(f'treatment {self.kind!r}: must be one of {TREATMENTS}')

    @property
    def generalises(self) -> bool:
        return self.kind in _GENERALISING


# ------------------------------------------------------------------------------------------------
# The key


@dataclasses.dataclass(frozen=True)
class KeyRef:
    """Where the pseudonymisation key is: a file (local or gs://) or an environment variable.

    Only the reference travels (options, pickled DoFns, the ledger); ``load`` reads the key where it
    is used (``DoFn.setup``) and it is never stored in an attribute that is pickled or displayed.
    """
    file: str | None = None
    env: str | None = None

    def describe(self) -> str:
        return f'file {self.file}' if self.file else f'environment variable {self.env}'

    def load(self) -> bytes:
        if bool(self.file) == bool(self.env):
            raise ConfigError('the pseudonymisation key: give exactly one of --key_file (a file holding the key) '
                              'or --key_env (the name of an environment variable holding it)')
        if self.file:
            try:
                with FileSystems.open(self.file, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                    key = handle.read()
            except (OSError, IOError) as error:
                raise ConfigError(f'--key_file={self.file!r}: cannot read the pseudonymisation key '
                                  f'({type(error).__name__}); create it with e.g. '
                                  '`head -c 32 /dev/urandom | base64 > FILE`, readable by the workers only') from None
        else:
            value = os.environ.get(self.env)
            if not value:
                raise ConfigError(f'--key_env={self.env!r}: the environment variable is not set or empty; '
                                  'it must hold the pseudonymisation key')
            key = value.encode('utf-8')
        key = key.strip()
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f'the pseudonymisation key in {self.describe()} has {len(key)} bytes; it needs at '
                              f'least {MIN_KEY_BYTES} (e.g. `head -c 32 /dev/urandom | base64`)')
        return key


# ------------------------------------------------------------------------------------------------
# Treatments on Arrow arrays


def _as_array(values) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def is_pseudonym(values: pa.Array, *, email: bool = False) -> np.ndarray:
    pattern = _PSEUDONYM_EMAIL if email else _PSEUDONYM
    return pc.fill_null(pc.match_substring_regex(values, pattern), False).to_numpy(zero_copy_only=False)


def pseudonyms(values: pa.Array, key: bytes, domain: str, *, email: bool = False) -> pa.Array:
    """The keyed pseudonym of each value (nulls stay null, pseudonyms stay as they are).

    One HMAC per distinct value, mapped back to the rows with Arrow. E-mail addresses are trimmed
    and lower-cased first, so one address has one pseudonym however it was typed.
    """
    values = _as_array(pc.cast(values, pa.string()))
    if email:
        values = pc.utf8_lower(pc.utf8_trim_whitespace(values))
    already = is_pseudonym(values, email=email)
    todo = pc.filter(values, pa.array(~already & values.is_valid().to_numpy(zero_copy_only=False)))
    distinct = pc.unique(todo)
    prefix = domain.encode('utf-8') + b'\x00'
    suffix = EMAIL_DOMAIN if email else ''
    mapped = pa.array([PSEUDONYM_PREFIX + hmac.digest(key, prefix + v.encode('utf-8'), 'sha256').hex()[:PSEUDONYM_HEX]
                       + suffix for v in distinct.to_pylist()], pa.string())
    out = mapped.take(pc.index_in(values, value_set=distinct))
    return pc.if_else(pa.array(already), values, out)


def remove(values: pa.Array, nullable: bool) -> pa.Array:
    if nullable:
        return pa.nulls(len(values), values.type)
    return pa.array([''] * len(values), values.type) if pa.types.is_string(values.type) else values


def to_year(values: pa.Array) -> pa.Array:
    """A date to the 1st of January of its year (nulls stay null)."""
    years = pc.fill_null(pc.year(values), 1970).to_numpy(zero_copy_only=False).astype(np.int64)
    days = (years - 1970).astype('datetime64[Y]').astype('datetime64[D]')
    return pa.array(days, pa.date32(), mask=~values.is_valid().to_numpy(zero_copy_only=False))


def to_departement(values: pa.Array) -> pa.Array:
    """A French postcode to its département: the first two digits, three overseas (971-976, 98x),
    2A / 2B in Corsica (20000-20199 / 20200-20999). Anything not a 5-digit postcode (a département
    already, or null) is left as it is."""
    values = pc.cast(values, pa.string())
    postcode = pc.fill_null(pc.match_substring_regex(values, r'^[0-9]{5}$'), False)
    two = pc.utf8_slice_codeunits(values, 0, 2)
    three = pc.utf8_slice_codeunits(values, 0, 3)
    overseas = pc.fill_null(pc.match_substring_regex(values, r'^9[78]'), False)
    corsica = pc.fill_null(pc.match_substring_regex(values, r'^20'), False)
    south = pc.fill_null(pc.match_substring_regex(values, r'^20[01]'), False)
    dept = pc.if_else(overseas, three, pc.if_else(corsica, pc.if_else(south, '2A', '2B'), two))
    return pc.if_else(postcode, dept, values)


def to_band(values: pa.Array, width: float) -> pa.Array:
    """A number down to a multiple of ``width`` (same type; nulls stay null)."""
    if pa.types.is_integer(values.type):
        width = int(width)
        return pc.multiply(pc.floor(pc.divide(pc.cast(values, pa.float64()), width)).cast(values.type), width) \
            if width > 1 else values
    return pc.multiply(pc.floor(pc.divide(values, float(width))), float(width)).cast(values.type)


def to_rounded(values: pa.Array, decimals: int) -> pa.Array:
    return pc.round(values, ndigits=int(decimals)).cast(values.type)


def treat(values: pa.Array, treatment: Treatment, key: bytes, *, nullable: bool) -> pa.Array:
    """``values`` after ``treatment``."""
    values = _as_array(values)
    kind, param = treatment.kind, treatment.param
    if kind == 'pseudonym':
        return pseudonyms(values, key, param)
    if kind == 'pseudonym_email':
        return pseudonyms(values, key, param, email=True)
    if kind in ('remove', 'clear'):
        return remove(values, nullable)
    if kind == 'year':
        return to_year(values)
    if kind == 'departement':
        return to_departement(values)
    if kind == 'band':
        return to_band(values, param)
    return to_rounded(values, param)


# ------------------------------------------------------------------------------------------------
# Retention dates


_PERIOD = re.compile(r'^\s*(\d{1,3})\s*(y|years?|m|months?|d|days?)\s*$', re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Period:
    amount: int
    unit: str  # 'y', 'm' or 'd'

    @classmethod
    def parse(cls, text, *, where: str) -> 'Period':
        match = _PERIOD.match(str(text)) if text is not None else None
        if not match or int(match.group(1)) == 0:
            raise ConfigError(f'{where}: retention {text!r} is not a period; write e.g. 2y, 5y, 6m or 365d '
                              '(years, months, days; at least 1)')
        return cls(int(match.group(1)), match.group(2)[0].lower())

    def before(self, day: datetime.date) -> datetime.date:
        """The date ``self`` before ``day`` (month ends clamp: 29 Feb minus a year is 28 Feb)."""
        if self.unit == 'd':
            return day - datetime.timedelta(days=self.amount)
        return add_months(day, -self.amount * (12 if self.unit == 'y' else 1))

    def __str__(self) -> str:
        return f'{self.amount}{self.unit}'


def add_months(day: datetime.date, months: int) -> datetime.date:
    """``day`` plus ``months`` months, clamped to the end of the month (31 Jan + 1 = 28/29 Feb)."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    last = (datetime.date(year + (month == 12), month % 12 + 1, 1) - datetime.timedelta(days=1)).day
    return datetime.date(year, month, min(day.day, last))


def expired_mask(values: pa.Array, kind: str, cutoff: datetime.date) -> np.ndarray:
    """Rows whose retention has run out: their date (a month counts from its last day, a year from
    31 December) is before ``cutoff`` (the day the retention period before today). Null: kept."""
    values = _as_array(values)
    if kind == 'date':
        result = pc.less(values, pa.scalar(cutoff, pa.date32()))
    elif kind == 'month':
        result = pc.less(values, cutoff.strftime('%Y-%m'))
    elif kind == 'year':
        result = pc.less(values, cutoff.year)
    else:
        raise ValueError(f'kind={kind!r}: must be date, month or year')
    return pc.fill_null(result, False).to_numpy(zero_copy_only=False)


# ------------------------------------------------------------------------------------------------
# The policy


@dataclasses.dataclass(frozen=True)
class PolicyEntry:
    dataset: str
    path: str
    category: str
    period: Period
    date_field: str | None
    date_kind: str | None
    follows: str | None
    follow_key: str | None
    k: int
    quasi_identifiers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Policy:
    entries: tuple[PolicyEntry, ...]
    k: int

    def entry(self, name: str) -> PolicyEntry:
        return next(e for e in self.entries if e.dataset == name)

    @property
    def followed(self) -> tuple[str, ...]:
        return tuple(sorted({e.follows for e in self.entries if e.follows}))


_TOP_KEYS = ('k', 'datasets')
_ENTRY_KEYS = ('name', 'path', 'category', 'retention', 'from', 'follows', 'k', 'quasi_identifiers')


def _check_k(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
        raise ConfigError(f'{where}: k={value!r} must be an integer from 1 (no check) to {MAX_K}')
    return value


def parse_policy(text: str, *, source: str = 'policy') -> Policy:
    """The retention policy in YAML ``text``; ConfigError naming the entry, the key and what is allowed."""
    from transforms import datasets  # the catalogue imports Treatment from here

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f'{source}: not valid YAML ({error})') from None
    if not isinstance(document, dict) or not isinstance(document.get('datasets'), list) or not document['datasets']:
        raise ConfigError(f'{source}: must be a mapping with a non-empty "datasets" list (see '
                          'pipelines/policies/retention.example.yaml)')
    unknown = sorted(set(document) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f'{source}: unknown keys {unknown}; allowed: {list(_TOP_KEYS)}')
    k = _check_k(document.get('k', DEFAULT_K), source)
    entries, seen = [], set()
    for number, raw in enumerate(document['datasets'], start=1):
        where = f'{source}, dataset #{number}'
        if not isinstance(raw, dict):
            raise ConfigError(f'{where}: must be a mapping with name, path, category, retention and from or follows')
        unknown = sorted(set(raw) - set(_ENTRY_KEYS))
        if unknown:
            raise ConfigError(f'{where}: unknown keys {unknown}; allowed: {list(_ENTRY_KEYS)}')
        name = raw.get('name')
        if name not in datasets.CATALOGUE:
            raise ConfigError(f'{where}: unknown dataset {name!r}; the datasets hrbatch holds are '
                              f'{", ".join(d for d in datasets.CATALOGUE if d != "dsn")}')
        where = f'{source}, dataset {name!r}'
        spec = datasets.CATALOGUE[name]
        if spec.layout != datasets.PARQUET:
            raise ConfigError(f'{where}: DSN files are declarations sent to the administrations and are not '
                              'anonymised; delete them once their retention has run out')
        if name in seen:
            raise ConfigError(f'{where}: named twice; name each dataset once')
        seen.add(name)
        path = raw.get('path')
        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f'{where}: "path" is required: the dataset directory, a Parquet file or a glob')
        category = raw.get('category')
        if category not in datasets.POLICY_CATEGORIES:
            raise ConfigError(f'{where}: category {category!r} is not a data category; allowed: '
                              f'{", ".join(datasets.POLICY_CATEGORIES)} (this dataset: {spec.category})')
        period = Period.parse(raw.get('retention'), where=where)
        date_field, follows = raw.get('from'), raw.get('follows')
        if date_field is None and follows is None:
            date_field, follows = spec.retention.date_field, spec.retention.follows
        if (date_field is None) == (follows is None):
            raise ConfigError(f'{where}: give exactly one of "from" (the date field the retention counts from: '
                              f'{", ".join(spec.date_fields) or "none in this dataset"}) or "follows" (a dataset '
                              'whose person records this one expires with)')
        date_kind = follow_key = None
        if date_field is not None:
            if date_field not in spec.field_names():
                raise ConfigError(f'{where}: unknown field {date_field!r} in "from"; the fields of {name} are '
                                  f'{", ".join(spec.field_names())}')
            if date_field not in spec.date_fields:
                raise ConfigError(f'{where}: field {date_field!r} is not a date; "from" must be one of '
                                  f'{", ".join(spec.date_fields) or "(none: use follows)"}')
            date_kind = datasets.pa_kind(spec.schema.field(date_field))
        else:
            follow_key = spec.retention.follow_key if follows == spec.retention.follows else None
            if follow_key is None:
                shared = [f for f in ('candidate_id', 'employee_id') if f in spec.field_names()
                          and follows in datasets.CATALOGUE and f in datasets.CATALOGUE[follows].field_names()]
                if not shared:
                    raise ConfigError(f'{where}: cannot follow {follows!r}: no person key in common')
                follow_key = shared[0]
        qis = raw.get('quasi_identifiers', list(spec.quasi_identifiers))
        if not isinstance(qis, list) or not all(isinstance(q, str) for q in qis):
            raise ConfigError(f'{where}: quasi_identifiers must be a list of field names')
        for qi in qis:
            if qi not in spec.field_names():
                raise ConfigError(f'{where}: unknown field {qi!r} in quasi_identifiers; the fields of {name} are '
                                  f'{", ".join(spec.field_names())}')
        entries.append(PolicyEntry(dataset=name, path=path.strip(), category=category, period=period,
                                   date_field=date_field, date_kind=date_kind, follows=follows,
                                   follow_key=follow_key, k=_check_k(raw.get('k', k), where),
                                   quasi_identifiers=tuple(qis)))
    names = {e.dataset for e in entries}
    for entry in entries:
        if entry.follows is None:
            continue
        where = f'{source}, dataset {entry.dataset!r}'
        if entry.follows not in names:
            raise ConfigError(f'{where}: follows {entry.follows!r}, which the policy does not name; add it '
                              '(its retention decides when these records expire)')
        if next(e for e in entries if e.dataset == entry.follows).follows:
            raise ConfigError(f'{where}: follows {entry.follows!r}, which itself follows another dataset; '
                              'follow a dataset with a date field')
    return Policy(entries=tuple(entries), k=k)


def read_policy(path: str) -> Policy:
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            text = handle.read().decode('utf-8')
    except (OSError, IOError) as error:
        raise ConfigError(f'--policy={path!r}: cannot read the policy file ({type(error).__name__})') from None
    except UnicodeDecodeError:
        raise ConfigError(f'--policy={path!r}: not UTF-8 text') from None
    return parse_policy(text, source=f'--policy={path}')


# ------------------------------------------------------------------------------------------------
# A dataset's files


def dataset_files(path: str, *, layout: str = 'parquet', where: str = '') -> list[str]:
    """The files of a dataset: a file or a glob of files, or a directory or a glob of directories (their
    ``part-*.parquet`` files and those one level down, as ``WriteKeyed`` writes them; ``*.dsn`` for DSN). Hidden temporary
    directories are never listed. ConfigError when nothing is there: a wrong path must not look empty."""
    suffix = '.dsn' if layout == 'dsn' else '.parquet'
    if path.endswith(suffix):
        patterns = [path]
    elif layout == 'dsn':
        patterns = [FileSystems.join(path, '*.dsn'), FileSystems.join(path, 'files', '*.dsn')]
    else:
        patterns = [FileSystems.join(path, 'part-*.parquet'), FileSystems.join(path, '*', 'part-*.parquet')]
    found = set()
    for pattern in patterns:
        try:
            results = FileSystems.match([pattern])
        except Exception:  # noqa: BLE001 - Beam raises BeamIOError or others for a missing dir
            continue
        for result in results:
            found.update(m.path for m in result.metadata_list)
    depth = len(path.rstrip('/').split('/'))
    files = sorted(p for p in found if p.endswith(suffix)
                   and not any(part.startswith('.') for part in p.split('/')[depth:]))  # temporary files
    if not files:
        raise ConfigError(f'{where or path}: no {suffix} file at {path!r}; give the dataset directory, a file or a glob')
    return files


# ------------------------------------------------------------------------------------------------
# One table


@dataclasses.dataclass(frozen=True)
class TablePlan:
    """What ``anonymise_table`` needs for one dataset: the catalogue entry's treatments, the field
    nullability, how expiry is decided, the quasi-identifiers."""
    treatments: dict
    nullable: dict
    date_field: str | None
    date_kind: str | None
    cutoff: datetime.date | None
    follow_key: str | None
    quasi_identifiers: tuple[str, ...]
    person_key: str | None       # pseudonymised person key (what a follower dataset matches on)
    person_domain: str | None


def plan_for(entry: PolicyEntry, as_of: datetime.date) -> TablePlan:
    from transforms import datasets
    spec = datasets.CATALOGUE[entry.dataset]
    key_field = next((f for f, kind in spec.person_fields.items() if kind in ('candidate_id', 'employee_id')), None)
    treatment = spec.treatments.get(key_field) if key_field else None
    return TablePlan(
        treatments=dict(spec.treatments), nullable={f.name: f.nullable for f in spec.schema.fields},
        date_field=entry.date_field, date_kind=entry.date_kind, cutoff=entry.period.before(as_of),
        follow_key=entry.follow_key, quasi_identifiers=entry.quasi_identifiers,
        person_key=key_field, person_domain=treatment.param if treatment else None)


def expired_rows(table: pa.Table, plan: TablePlan, key: bytes, follow_set: pa.Array | None) -> np.ndarray:
    if plan.date_field is not None:
        return expired_mask(table.column(plan.date_field), plan.date_kind, plan.cutoff)
    treatment = plan.treatments[plan.follow_key]
    ids = pseudonyms(_as_array(table.column(plan.follow_key)), key, treatment.param)
    if follow_set is None or not len(follow_set):
        return np.zeros(table.num_rows, dtype=bool)
    return pc.fill_null(pc.is_in(ids, value_set=follow_set), False).to_numpy(zero_copy_only=False)


def treat_rows(table: pa.Table, mask: np.ndarray, plan: TablePlan, key: bytes,
               fields: typing.Iterable[str] | None = None) -> pa.Table:
    """``table`` with the ``mask`` rows treated (only ``fields`` if given)."""
    if not mask.any():
        return table
    selector = pa.array(mask)
    for name, treatment in plan.treatments.items():
        if (fields is not None and name not in fields) or name not in table.column_names:
            continue
        column = _as_array(table.column(name))
        subset = pc.filter(column, selector)
        treated = treat(subset, treatment, key, nullable=plan.nullable.get(name, True)).cast(column.type)
        index = table.column_names.index(name)
        table = table.set_column(index, table.field(index), pc.replace_with_mask(column, selector, treated))
    return table


def group_keys(table: pa.Table, fields: typing.Sequence[str]) -> pa.Array:
    """One text per row joining its quasi-identifier values (what k-anonymity groups on)."""
    parts = [pc.fill_null(pc.cast(_as_array(table.column(f)), pa.string()), _NULL_TEXT) for f in fields]
    if len(parts) == 1:
        return parts[0]
    return pc.binary_join_element_wise(*parts, _GROUP_SEPARATOR)


def group_counts(table: pa.Table, mask: np.ndarray, fields: typing.Sequence[str]) -> dict[str, int]:
    """Rows per quasi-identifier group among the ``mask`` rows (already treated)."""
    if not fields or not mask.any():
        return {}
    keys = pc.filter(group_keys(table, fields), pa.array(mask))
    counted = pc.value_counts(keys)
    return dict(zip(counted.field('values').to_pylist(), counted.field('counts').to_pylist()))


def small_groups(counts: typing.Mapping[str, int], k: int) -> dict[str, int]:
    """The groups with fewer than ``k`` records (group -> size)."""
    return {g: n for g, n in counts.items() if n < k}


def k_of(counts: typing.Mapping[str, int], k: int) -> int | None:
    """The k-anonymity reached once the small groups are suppressed: the smallest group left."""
    kept = [n for n in counts.values() if n >= k]
    return min(kept) if kept else None


@dataclasses.dataclass(frozen=True)
class TableResult:
    table: pa.Table
    rows: int
    expired: int
    anonymised: int   # rows this call changed (newly anonymised) and kept
    suppressed: int   # rows deleted: in a quasi-identifier group smaller than k

    @property
    def changed(self) -> bool:
        return self.anonymised > 0 or self.suppressed > 0


def _changed_rows(old: pa.Table, new: pa.Table) -> np.ndarray:
    changed = np.zeros(old.num_rows, dtype=bool)
    for name in old.column_names:
        a, b = _as_array(old.column(name)), _as_array(new.column(name))
        if a is b:
            continue
        equal = pc.equal(a, b) if not pa.types.is_list(a.type) else \
            pa.array([x == y for x, y in zip(a.to_pylist(), b.to_pylist())])
        both_null = pc.and_(a.is_null(), b.is_null())
        same = pc.or_(pc.fill_null(equal, False), both_null)
        changed |= ~same.to_numpy(zero_copy_only=False)
    return changed


def anonymise_table(table: pa.Table, plan: TablePlan, key: bytes, *, follow_set: pa.Array | None = None,
                    suppress: typing.Collection[str] = frozenset()) -> TableResult:
    """The records of ``table`` past retention anonymised; those in a ``suppress``ed group deleted."""
    mask = expired_rows(table, plan, key, follow_set)
    treated = treat_rows(table, mask, plan, key)
    changed = (_changed_rows(table, treated) & mask) if mask.any() else np.zeros(table.num_rows, dtype=bool)
    drop = np.zeros(table.num_rows, dtype=bool)
    if suppress and plan.quasi_identifiers and mask.any():
        in_small = pc.fill_null(pc.is_in(group_keys(treated, plan.quasi_identifiers),
                                         value_set=pa.array(sorted(suppress), pa.string())), False)
        drop = in_small.to_numpy(zero_copy_only=False) & mask
    anonymised, suppressed = int((changed & ~drop).sum()), int(drop.sum())
    if suppressed:
        treated = treated.filter(pa.array(~drop))
    return TableResult(table=treated, rows=table.num_rows, expired=int(mask.sum()), anonymised=anonymised,
                       suppressed=suppressed)


def measure_table(table: pa.Table, plan: TablePlan, key: bytes, *, follow_set: pa.Array | None = None
                  ) -> tuple[dict[str, int], list[tuple[str, bool]]]:
    """For the first pass: the quasi-identifier group sizes of the rows past retention, and, for a
    dataset other datasets follow, (pseudonym of the person key, past retention) of every row."""
    mask = expired_rows(table, plan, key, follow_set)
    counts = {}
    if plan.quasi_identifiers:
        treated = treat_rows(table, mask, plan, key, fields=plan.quasi_identifiers)
        counts = group_counts(treated, mask, plan.quasi_identifiers)
    return counts, mask


def person_pairs(table: pa.Table, plan: TablePlan, key: bytes, mask: np.ndarray) -> list[tuple[str, bool]]:
    """(pseudonym of the person key, every row of that person past retention) for this table."""
    ids = pseudonyms(_as_array(table.column(plan.person_key)), key, plan.person_domain)
    pairs = pa.table({'id': ids, 'expired': pa.array(mask)}).group_by('id').aggregate([('expired', 'all')])
    return list(zip(pairs.column('id').to_pylist(), pairs.column('expired_all').to_pylist()))

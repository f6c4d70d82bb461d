"""Versioned migrations of stored datasets: the declared versions, the steps between them, and how the
version of a dataset on disk is known.

Versions
--------
``SCHEMAS`` declares every version of every migratable dataset; the newest is the canonical schema of
``transforms.schemas`` (candidates: version 2 is ``schemas.CANDIDATES``). ``STEPS`` declares one step
per (dataset, from version): a vectorised function ``pa.RecordBatch -> (migrated batch, dead letters)``
that turns rows of the step's source schema (with ``_source``/``_row``) into rows of its target schema.
``chain`` finds the steps from one version to another, or fails with a ``ConfigError``.

The version of a dataset on disk (``dataset_version``)
------------------------------------------------------
Every Parquet file a migration writes carries the key-value metadata ``hrbatch.dataset`` (the dataset
name) and ``hrbatch.dataset_version`` (the version, decimal) in its footer, so a file copied anywhere
still says what it holds. The rule, file by file:

* a file with the marker is at the version it names; a marker of another dataset is an error;
* a file without the marker is at version 1 (versioning came with version 2: nothing older was
  marked), and must hold every field of version 1, else the launch fails naming the missing fields
  and the declared version whose fields it does have (e.g. an unmarked version 2 file);
* all files of a dataset must be at one version: mixed versions fail the launch, naming them.

Candidates, version 1 -> 2 (``candidates_v1_to_v2``)
-------------------------------------------------
* ``full_name`` is split into ``first_name`` and ``last_name`` (``split_full_name``, rule below), then
  written by ``normalize.name`` (title case) and ``normalize.upper_name`` (upper case);
* ``phone``, as people typed it, becomes E.164 (``normalize.phone``; a number without a country code is
  French); a null phone stays null;
* ``skill_codes``, old internal codes, become ``skills``, ESCO skill ids, through the table
  ``transforms/rules/skill_codes_v1_to_esco.csv`` (codes compared trimmed and upper-cased; an ESCO id
  reached twice in one row is kept once, at its first place);
* every other field is kept as it is.

A row with an empty full name, a full name of one word, a phone number that cannot be read or an old
skill code the table does not know is dead-lettered with every reason; every other row is migrated.
The migrated rows are then validated against the target schema: what passes reads back with
``ReadRecords(schema=schemas.CANDIDATES)`` without a rejection.

Only the rows that are dead-lettered become Python objects (their payload); the rest is Arrow
compute and numpy on whole batches.
"""
import csv
import dataclasses
import functools
import json
import math
import pathlib
import re
import typing

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms import normalize
from transforms import schemas
from transforms import taxonomy
from transforms.dead_letters import DeadLetter
from transforms.dead_letters import locator
from transforms.errors import ConfigError
from transforms.schemas import ROW_COLUMN
from transforms.schemas import SOURCE_COLUMN
from transforms.schemas import Field
from transforms.schemas import RecordSchema
from transforms.schemas import row_to_json
from transforms.validation import validate_batch

DATASET_METADATA_KEY = b'hrbatch.dataset'
VERSION_METADATA_KEY = b'hrbatch.dataset_version'
UNMARKED_VERSION = 1
SKILL_CODES_CSV = pathlib.Path(__file__).resolve().parent / 'rules' / 'skill_codes_v1_to_esco.csv'


# ------------------------------------------------------------------------------------------------
# Declared versions

def _candidates_v1() -> RecordSchema:
    fields = []
    for field in schemas.CANDIDATES.fields:
        if field.name == 'first_name':
            fields.append(Field('full_name', pa.string(), nullable=True,
                                doc='First and last name in one text; empty ones are dead-lettered by the migration.'))
        elif field.name == 'last_name':
            continue
        elif field.name == 'phone':
            fields.append(Field('phone', pa.string(), nullable=True, doc='As typed: 06 12 34 56 78, +33 (0)6...'))
        elif field.name == 'skills':
            fields.append(Field('skill_codes', pa.list_(pa.string()), doc='Old internal skill codes.'))
        else:
            fields.append(field)
    return RecordSchema(name='candidates_v1', key=schemas.CANDIDATES.key, fields=tuple(fields))


CANDIDATES_V1 = _candidates_v1()
SCHEMAS = {
    ('candidates', 1): CANDIDATES_V1,
    ('candidates', 2): schemas.CANDIDATES,
}
DATASETS = tuple(sorted({dataset for dataset, _ in SCHEMAS}))


def current_version(dataset: str) -> int:
    return max(version for name, version in SCHEMAS if name == dataset)


# ------------------------------------------------------------------------------------------------
# Skill codes


@functools.lru_cache(maxsize=4)
def skill_code_mapping(path: str = str(SKILL_CODES_CSV)) -> tuple[pa.Array, pa.Array]:
    """(old codes, ESCO ids at the same positions) from the CSV; ConfigError for a bad table."""
    try:
        with open(path, newline='', encoding='utf-8') as handle:
            rows = list(csv.DictReader(handle))
    except OSError as err:
        raise ConfigError(f'skill code table {path}: cannot be read ({err})') from None
    if not rows or not {'old_code', 'esco_id'} <= set(rows[0]):
        raise ConfigError(f'skill code table {path}: needs the columns old_code, esco_id')
    codes = [(row['old_code'] or '').strip().upper() for row in rows]
    esco = [(row['esco_id'] or '').strip() for row in rows]
    repeated = sorted({c for c in codes if codes.count(c) > 1})
    if repeated or '' in codes:
        raise ConfigError(f'skill code table {path}: old codes must be non-empty and listed once; '
                          f'repeated: {repeated}')
    unknown = [e for e, ok in zip(esco, taxonomy.is_esco_skill(pa.array(esco, pa.string()))) if not ok]
    if unknown:
        raise ConfigError(f'skill code table {path}: {unknown} are not ESCO skill ids; '
                          'use ids of transforms/taxonomy.py (UUIDs of http://data.europa.eu/esco/skill/...)')
    return pa.array(codes, pa.string()), pa.array(esco, pa.string())


def map_skill_codes(codes: pa.Array, mapping: tuple[pa.Array, pa.Array] | None = None
                    ) -> tuple[pa.Array, np.ndarray, list[int]]:
    """``list<string>`` of old codes -> (``list<string>`` of ESCO ids, rows holding an unknown code,
    their positions in the flattened values). A code is compared trimmed and upper-cased; an ESCO id
    reached twice in a row is kept once, where it first appears."""
    old_codes, esco_ids = mapping or skill_code_mapping()
    codes = codes.combine_chunks() if isinstance(codes, pa.ChunkedArray) else codes
    num_rows = len(codes)
    flat = pc.list_flatten(codes)
    parents = pc.list_parent_indices(codes).to_numpy(zero_copy_only=False).astype(np.int64)
    found = pc.index_in(pc.utf8_upper(pc.utf8_trim_whitespace(flat)), value_set=old_codes)
    known = pc.is_valid(found).to_numpy(zero_copy_only=False)
    unknown_rows = np.zeros(num_rows, dtype=bool)
    unknown_rows[parents[~known]] = True
    # The ESCO ids as numbers (positions in the sorted distinct ids), to find repeats within a row.
    distinct = pc.unique(esco_ids)
    esco_of_code = pc.index_in(esco_ids, value_set=distinct).to_numpy(zero_copy_only=False)
    kept = np.flatnonzero(known)
    esco = esco_of_code[pc.fill_null(found, 0).to_numpy(zero_copy_only=False)[kept]]
    pair = parents[kept] * len(distinct) + esco
    _, first = np.unique(pair, return_index=True)
    chosen = np.sort(first)  # first occurrences, in the rows' order
    values = distinct.take(pa.array(esco[chosen]))
    counts = np.bincount(parents[kept][chosen], minlength=num_rows)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values), unknown_rows, np.flatnonzero(~known).tolist()


# ------------------------------------------------------------------------------------------------
# Full names

# A word with a capital and no lower-case letter, not an initial ('P.' belongs to the first name).
_UPPER_WORD = r'[^\s\p{Ll}]*\p{Lu}(?:[^\s\p{Ll}]*[^\s\p{Ll}.])?'
PARTICLES = ('de', 'du', 'des', 'del', 'della', 'di', 'da', 'le', 'la', 'les', 'van', 'von', 'der', 'den', 'ten', 'ter')
_PARTICLES = r'(?:(?i:' + '|'.join(PARTICLES) + r')\s+)*'
# The name has a lower-case letter before a trailing run of upper-case words: that run is the last name.
_BY_CASE = rf'^(?P<first>.*?\p{{Ll}}.*?)\s+(?P<last>{_PARTICLES}{_UPPER_WORD}(?:\s+{_UPPER_WORD})*)$'
# No case tells: the last word is the last name.
_BY_POSITION = rf'^(?P<first>.+?)\s+(?P<last>{_PARTICLES}\S+)$'


def split_full_name(values: pa.Array) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]:
    """``full_name`` -> (first names, last names, empty mask, one-word mask); vectorised (RE2).

    Spaces are trimmed and collapsed first. Then:

    1. when the name ends with words written in capitals and has a lower-case letter before them,
       the last name is that trailing run of capitalised words ('Jean-Pierre DE LA FONTAINE' ->
       'Jean-Pierre' / 'DE LA FONTAINE'; 'Anne Marie DUPONT' -> 'Anne Marie' / 'DUPONT'); an
       initial is not such a word ('Jean P. DUPONT' -> 'Jean P.' / 'DUPONT');
    2. otherwise (all in capitals, all in lower case, or title case) the last name is the last word
       ('Jean Dupont' -> 'Jean' / 'Dupont'; 'JEAN DUPONT' -> 'JEAN' / 'DUPONT');
    3. in both, particles just before the last name belong to it, whatever their case: de, du, des,
       del, della, di, da, le, la, les, van, von, der, den, ten, ter ('Marie de la Tour' -> 'Marie' /
       'de la Tour'; 'Jean de LA FONTAINE' -> 'Jean' / 'de LA FONTAINE').

    A null or blank name is empty; a name of one word cannot be split: both are flagged, with null
    parts. The parts are returned as found: ``normalize.name`` / ``upper_name`` write them.
    """
    text = pc.utf8_trim_whitespace(pc.replace_substring_regex(values.cast(pa.string()), r'\s+', ' '))
    text = pc.if_else(pc.equal(text, ''), pa.scalar(None, pa.string()), text)
    by_case = pc.extract_regex(text, _BY_CASE)
    by_position = pc.extract_regex(text, _BY_POSITION)
    first = pc.coalesce(pc.struct_field(by_case, [0]), pc.struct_field(by_position, [0]))
    last = pc.coalesce(pc.struct_field(by_case, [1]), pc.struct_field(by_position, [1]))
    empty = pc.is_null(text).to_numpy(zero_copy_only=False)
    one_word = ~empty & pc.is_null(first).to_numpy(zero_copy_only=False)
    return first, last, empty, one_word


# ------------------------------------------------------------------------------------------------
# Dead letters of a step


def _metadata(batch: pa.RecordBatch) -> tuple[list, list]:
    return batch.column(SOURCE_COLUMN).to_pylist(), batch.column(ROW_COLUMN).to_pylist()


def dead_letters(batch: pa.RecordBatch, reasons: dict[int, list[str]], *, step: str) -> list[DeadLetter]:
    """One letter per row of ``reasons`` (batch row -> reasons): the row without metadata, its place."""
    if not reasons:
        return []
    rows = sorted(reasons)
    taken = batch.take(pa.array(rows, pa.int64()))
    sources, numbers = _metadata(taken)
    data = taken.drop_columns([c for c in (SOURCE_COLUMN, ROW_COLUMN) if c in taken.schema.names])
    return [DeadLetter(step=step, error='; '.join(reasons[row]), payload=row_to_json(payload),
                       source=locator(source, number))
            for row, payload, source, number in zip(rows, data.to_pylist(), sources, numbers)]


def _add_reasons(reasons: dict, mask: np.ndarray, reason: typing.Callable[[int], str]) -> None:
    for row in np.flatnonzero(mask):
        reasons.setdefault(int(row), []).append(reason(int(row)))


# ------------------------------------------------------------------------------------------------
# Steps

STEP_CANDIDATES_V1_TO_V2 = 'MigrateCandidatesV1ToV2'


def candidates_v1_to_v2(batch: pa.RecordBatch) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """Candidates version 1 (with ``_source``/``_row``) -> version 2 rows and dead letters (see the
    module docstring)."""
    num_rows = batch.num_rows
    first, last, empty, one_word = split_full_name(batch.column('full_name'))
    first_name, _ = normalize.name(first)
    last_name, _ = normalize.upper_name(last)
    phone, bad_phone = normalize.phone(batch.column('phone'))
    skills, unknown_skills, unknown_positions = map_skill_codes(batch.column('skill_codes'))

    reasons: dict[int, list[str]] = {}
    names = batch.column('full_name')
    _add_reasons(reasons, empty, lambda row: 'full_name: empty: must hold a first and a last name')
    _add_reasons(reasons, one_word, lambda row: f'full_name: {names[row].as_py()!r} is one word: must hold a '
                                                'first and a last name')
    phones = batch.column('phone')
    _add_reasons(reasons, bad_phone, lambda row: f'phone: {phones[row].as_py()!r} is not a phone number '
                                                 'libphonenumber accepts: must be a French number or +country code')
    if unknown_skills.any():
        flat = pc.list_flatten(batch.column('skill_codes')).to_pylist()
        parents = pc.list_parent_indices(batch.column('skill_codes')).to_numpy(zero_copy_only=False)
        by_row: dict[int, list] = {}
        for position in unknown_positions:
            by_row.setdefault(int(parents[position]), []).append(flat[position])
        _add_reasons(reasons, unknown_skills, lambda row: f'skill_codes: unknown old codes {by_row[row]!r}: must be '
                                                          f'an old_code of {SKILL_CODES_CSV.name}')
    columns = {'first_name': first_name, 'last_name': last_name, 'phone': phone, 'skills': skills}
    arrays = [columns[f.name] if f.name in columns else batch.column(f.name) for f in schemas.CANDIDATES.fields]
    arrays += [batch.column(SOURCE_COLUMN), batch.column(ROW_COLUMN)]
    migrated = pa.RecordBatch.from_arrays(arrays, names=[*schemas.CANDIDATES.names, SOURCE_COLUMN, ROW_COLUMN])
    letters = dead_letters(batch, reasons, step=STEP_CANDIDATES_V1_TO_V2)
    if reasons:
        keep = np.ones(num_rows, dtype=bool)
        keep[list(reasons)] = False
        migrated = migrated.filter(pa.array(keep))
    return migrated, letters


@dataclasses.dataclass(frozen=True)
class Step:
    dataset: str
    from_version: int
    to_version: int
    name: str  # the stable label of the step: its dead letters' ``step``
    function: typing.Callable[[pa.RecordBatch], tuple[pa.RecordBatch, list[DeadLetter]]]

    @property
    def source(self) -> RecordSchema:
        return SCHEMAS[(self.dataset, self.from_version)]

    @property
    def target(self) -> RecordSchema:
        return SCHEMAS[(self.dataset, self.to_version)]

    def __str__(self) -> str:
        return f'{self.dataset} v{self.from_version} -> v{self.to_version} ({self.name})'


STEPS = {
    ('candidates', 1): Step('candidates', 1, 2, STEP_CANDIDATES_V1_TO_V2, candidates_v1_to_v2),
}


def declared_steps() -> str:
    return ', '.join(str(step) for _, step in sorted(STEPS.items())) or 'none'


def chain(dataset: str, from_version: int, to_version: int) -> list[Step]:
    """The declared steps leading from ``from_version`` to ``to_version``; ConfigError if none does."""
    if dataset not in DATASETS:
        raise ConfigError(f'--dataset={dataset!r}: no migration is declared for it; datasets: {", ".join(DATASETS)}')
    if to_version <= from_version:
        raise ConfigError(f'--from={from_version} --to={to_version}: --to must be above --from '
                          '(migrations go forward; restore a backup to go back)')
    steps, version = [], from_version
    while version < to_version:
        step = STEPS.get((dataset, version))
        if step is None:
            raise ConfigError(f'no declared migration step leads from {dataset} version {from_version} to version '
                              f'{to_version} (none starts at version {version}); declared steps: {declared_steps()}')
        steps.append(step)
        version = step.to_version
    if version != to_version:
        raise ConfigError(f'the declared steps from {dataset} version {from_version} reach version {version}, '
                          f'not {to_version}; declared steps: {declared_steps()}')
    return steps


def validate_step(step: str) -> str:
    return f'Validate{step}'


def migrate_batch(batch: pa.RecordBatch, steps: list[Step]) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """Runs ``steps`` in turn on ``batch`` (source schema plus ``_source``/``_row``), then validates the
    result against the last target schema. Returns the migrated rows and every dead letter."""
    letters = []
    for step in steps:
        batch, more = step.function(batch)
        letters += more
        batch, more = validate_batch(batch, step.target, step=validate_step(step.name))
        letters += more
    return batch, letters


# ------------------------------------------------------------------------------------------------
# The version of a dataset on disk


def has_wildcard(location: str) -> bool:
    return any(c in location for c in '*?[')


def dataset_files(location: str) -> list[str]:
    """The Parquet files of a stored dataset: ``location`` as a glob, or a directory holding
    ``part-*.parquet`` or ``*/part-*.parquet`` (as ``keyed_write`` writes them); sorted."""
    if has_wildcard(location):
        patterns = [location]
    else:
        patterns = [FileSystems.join(location, 'part-*.parquet'), FileSystems.join(location, '*', 'part-*.parquet')]
    paths = set()
    for pattern in patterns:  # one pattern per call: FileSystems uses the first pattern's filesystem
        paths.update(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    return sorted(paths)


def read_footer_schema(path: str) -> pa.Schema:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        with pq.ParquetFile(handle) as parquet_file:
            return parquet_file.schema_arrow


def file_version(schema: pa.Schema, dataset: str, path: str) -> int:
    """The version of one file from its Arrow schema (footer), by the module's rule."""
    metadata = schema.metadata or {}
    if VERSION_METADATA_KEY not in metadata:
        needed = SCHEMAS[(dataset, UNMARKED_VERSION)]
        missing = [name for name in needed.names if name not in schema.names]
        if missing:
            matching = [v for (d, v), s in sorted(SCHEMAS.items()) if d == dataset and set(s.names) <= set(schema.names)]
            hint = (f'; it has the fields of version {matching[-1]}: it was written outside the migrations, '
                    f'so it cannot be told from its footer; rewrite it with the metadata '
                    f'{VERSION_METADATA_KEY.decode()}={matching[-1]}') if matching else ''
            raise ConfigError(f'{path} carries no {VERSION_METADATA_KEY.decode()} marker, so it counts as {dataset} '
                              f'version {UNMARKED_VERSION}, but it lacks the fields {missing} of that version{hint}')
        return UNMARKED_VERSION
    named = metadata.get(DATASET_METADATA_KEY, dataset.encode()).decode()
    if named != dataset:
        raise ConfigError(f'{path} holds the dataset {named!r} ({DATASET_METADATA_KEY.decode()}), not {dataset!r}: '
                          'check --input and --dataset')
    text = metadata[VERSION_METADATA_KEY].decode()
    if not re.fullmatch(r'[1-9][0-9]*', text):
        raise ConfigError(f'{path}: {VERSION_METADATA_KEY.decode()}={text!r} is not a version number')
    return int(text)


def dataset_version(location: str, dataset: str) -> tuple[int, list[str]]:
    """(the version of the stored dataset at ``location``, its files); ConfigError when it has no
    file or its files are not all at one version."""
    files = dataset_files(location)
    if not files:
        raise ConfigError(f'--input={location!r} holds no Parquet file (part-*.parquet or */part-*.parquet of a '
                          'directory, or a glob): check the path')
    by_version: dict[int, list[str]] = {}
    for path in files:
        by_version.setdefault(file_version(read_footer_schema(path), dataset, path), []).append(path)
    if len(by_version) > 1:
        found = '; '.join(f'version {v}: {len(p)} files, e.g. {p[0]}' for v, p in sorted(by_version.items()))
        raise ConfigError(f'--input={location!r} mixes versions of {dataset} ({found}): a migration starts from '
                          'one version; keep the files of one version only')
    return next(iter(by_version)), files


def stamp(table: pa.Table, dataset: str, version: int) -> pa.Table:
    """``table`` with the dataset's name and version in its schema metadata (kept in the Parquet footer)."""
    metadata = dict(table.schema.metadata or {})
    metadata[DATASET_METADATA_KEY] = dataset.encode()
    metadata[VERSION_METADATA_KEY] = str(version).encode()
    return table.replace_schema_metadata(metadata)


# ------------------------------------------------------------------------------------------------
# Control totals


def _is_number(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)


def controls(table: pa.Table | pa.RecordBatch, schema: RecordSchema) -> dict:
    """Control totals of ``table``'s fields of ``schema``: rows, non-null values per field, sum per
    numeric field (NaN skipped)."""
    present = [f for f in schema.fields if f.name in table.schema.names]
    non_null = {f.name: len(table.column(f.name)) - table.column(f.name).null_count for f in present}
    sums = {}
    for f in present:
        column = table.column(f.name)
        if _is_number(column.type):
            total = pc.sum(column).as_py() if table.num_rows else 0
            sums[f.name] = float(total or 0)
    return {'rows': table.num_rows, 'non_null': non_null, 'sums': sums}


def add_controls(totals: dict, more: dict) -> dict:
    """The controls of two sets of rows together (ints added; sums added, in call order)."""
    if not totals:
        return json.loads(json.dumps(more))
    out = {'rows': totals['rows'] + more['rows'], 'non_null': dict(totals['non_null']), 'sums': dict(totals['sums'])}
    for name, count in more['non_null'].items():
        out['non_null'][name] = out['non_null'].get(name, 0) + count
    for name, total in more['sums'].items():
        out['sums'][name] = math.fsum([out['sums'].get(name, 0.0), total])
    return out


# ------------------------------------------------------------------------------------------------
# Masking, for the dry run


def mask_name(value: str | None) -> str:
    """Initials: 'Jean-Pierre DE LA FONTAINE' -> 'J.-P. D. L. F.'."""
    if not value:
        return '' if value is None else "''"
    return ' '.join('-'.join(part[:1] + '.' for part in word.split('-') if part) for word in value.split())


def mask_email(value: str | None) -> str:
    """'jean.dupont@example.fr' -> 'j***@e***.fr'."""
    if not value:
        return ''
    local, _, domain = value.strip().partition('@')
    name, dot, tld = domain.rpartition('.')
    if not dot:
        name, tld = domain, ''
    return f'{local[:1]}***@{name[:1]}***' + (f'.{tld}' if tld else '')


def mask_phone(value: str | None) -> str:
    """'+33612345678' -> '+33 6** ** ** 78'; any other writing keeps its first and last two digits."""
    if not value:
        return ''
    if re.fullmatch(r'\+33[1-9][0-9]{8}', value):
        return f'+33 {value[3]}** ** ** {value[-2:]}'
    digits = [i for i, c in enumerate(value) if c.isdigit()]
    shown = set(digits[:1] + digits[-2:])
    return ''.join('*' if c.isdigit() and i not in shown else c for i, c in enumerate(value))

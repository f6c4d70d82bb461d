"""ETL mappings: how the columns of an HR system's export become one canonical dataset.

A mapping is a YAML (or JSON) file::

    dataset: employees              # candidates, offers, employees, contracts or variable_elements
    source:                         # how the export is written (all optional)
      encoding: latin-1             # utf-8 (default; a BOM is accepted), latin-1 or cp1252
      delimiter: ';'                # CSV only; default ','
      decimal: ','                  # decimal separator of numbers; default '.'
      date_format: '%d/%m/%Y'       # strptime format of dates; default ISO '%Y-%m-%d'
      true_values: [oui, O, '1']    # booleans; defaults: true/false, oui/non, 1/0, o/n, y/n
      false_values: [non, N, '0']
      list_separator: '|'           # lists in one cell
    updated_at:                     # optional: the duplicate of a key that was updated last wins
      column: date_maj
      format: '%d/%m/%Y %H:%M'
    fields:                         # canonical field -> source column, or a mapping
      employee_id: matricule
      last_name: {column: nom, normalize: upper_name}
      cadre: {column: statut, values: {Cadre: true, 'Non cadre': false}}
      alsace_moselle: {default: false}

Every non-nullable canonical field must be mapped or have a default. ``normalize`` is one of
``transforms.normalize.NORMALIZERS``; ``values`` maps source codes to canonical values (an unknown
code is a dead letter); ``default`` fills empty cells. ``from_file`` checks all of this at launch
and raises ``ConfigError`` naming the problem; ``convert`` then turns a batch of source strings
into canonical typed columns on whole arrays, one dead-letter reason per bad cell.
"""
import collections
import dataclasses
import datetime
import functools
import json
import re
import typing

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from apache_beam.io.filesystems import FileSystems

from transforms import normalize
from transforms import schemas
from transforms.errors import ConfigError
from transforms.validation import Reasons

DATASETS = {schema.name: schema for schema in (
    schemas.CANDIDATES, schemas.OFFERS, schemas.EMPLOYEES, schemas.CONTRACTS, schemas.VARIABLE_ELEMENTS)}
ENCODINGS = {'utf-8': 'utf-8', 'utf8': 'utf-8', 'latin-1': 'latin-1', 'latin1': 'latin-1',
             'iso-8859-1': 'latin-1', 'cp1252': 'cp1252', 'windows-1252': 'cp1252'}
UPDATED_AT = '_updated_at'
_TRUE = ('true', 'oui', '1', 'o', 'y', 'yes', 'vrai')
_FALSE = ('false', 'non', '0', 'n', 'no', 'faux')
_SOURCE_KEYS = {'encoding', 'delimiter', 'decimal', 'date_format', 'true_values', 'false_values', 'list_separator'}
_FIELD_KEYS = {'column', 'normalize', 'values', 'default', 'format'}


@dataclasses.dataclass(frozen=True)
class FieldMapping:
    name: str                        # canonical field
    column: str | None               # source column (None: default only)
    normalize: str | None = None
    values: tuple | None = None      # ((source code, canonical value), ...)
    default: typing.Any = None
    format: str | None = None        # a date format for this field only


@dataclasses.dataclass(frozen=True)
class Mapping:
    dataset: str
    fields: tuple[FieldMapping, ...]
    encoding: str = 'utf-8'
    delimiter: str = ','
    decimal: str = '.'
    date_format: str = '%Y-%m-%d'
    true_values: tuple[str, ...] = _TRUE
    false_values: tuple[str, ...] = _FALSE
    list_separator: str = schemas.LIST_SEPARATOR
    updated_at: str | None = None
    updated_at_format: str | None = None
    path: str = ''

    @property
    def schema(self) -> schemas.RecordSchema:
        return DATASETS[self.dataset]

    @property
    def source_columns(self) -> tuple[str, ...]:
        """Every source column the mapping reads, in mapping order."""
        columns = [f.column for f in self.fields if f.column is not None]
        if self.updated_at:
            columns.append(self.updated_at)
        return tuple(dict.fromkeys(columns))


def _fail(path: str, problem: str) -> ConfigError:
    return ConfigError(f'Mapping {path}: {problem}')


def from_file(path: str) -> Mapping:
    """Reads and checks a mapping file (local or gs://, YAML or JSON)."""
    try:
        with FileSystems.open(path) as handle:
            text = handle.read().decode('utf-8')
    except (OSError, IOError, UnicodeDecodeError) as err:
        raise _fail(path, f'cannot be read ({err})') from err
    try:
        document = json.loads(text) if path.endswith('.json') else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise _fail(path, f'is not valid {"JSON" if path.endswith(".json") else "YAML"} ({err})') from err
    return from_dict(document, path)


def from_dict(document, path: str = '<mapping>') -> Mapping:
    if not isinstance(document, dict):
        raise _fail(path, 'must be a mapping with keys dataset, source, updated_at, fields')
    unknown = set(document) - {'dataset', 'source', 'updated_at', 'fields'}
    if unknown:
        raise _fail(path, f'unknown keys {sorted(unknown)}; allowed: dataset, source, updated_at, fields')
    dataset = document.get('dataset')
    if dataset not in DATASETS:
        raise _fail(path, f'dataset {dataset!r} is not one of {sorted(DATASETS)}')
    schema = DATASETS[dataset]
    source = document.get('source') or {}
    if not isinstance(source, dict) or set(source) - _SOURCE_KEYS:
        raise _fail(path, f'source must be a mapping with keys among {sorted(_SOURCE_KEYS)}')
    encoding = ENCODINGS.get(str(source.get('encoding', 'utf-8')).lower())
    if encoding is None:
        raise _fail(path, f'encoding {source.get("encoding")!r} is not one of {sorted(set(ENCODINGS))}')
    options = {'encoding': encoding}
    for key in ('delimiter', 'decimal', 'list_separator'):
        if key in source:
            if not isinstance(source[key], str) or len(source[key]) != 1:
                raise _fail(path, f'source.{key} must be one character; got {source[key]!r}')
            options[key] = source[key]
    if 'date_format' in source:
        options['date_format'] = _checked_format(path, 'source.date_format', source['date_format'])
    for key in ('true_values', 'false_values'):
        if key in source:
            if not isinstance(source[key], list) or not source[key]:
                raise _fail(path, f'source.{key} must be a non-empty list')
            options[key] = tuple(str(v).lower() for v in source[key])
    updated = document.get('updated_at')
    if updated is not None:
        updated = {'column': updated} if isinstance(updated, str) else updated
        if not isinstance(updated, dict) or not isinstance(updated.get('column'), str) or set(updated) - {'column', 'format'}:
            raise _fail(path, 'updated_at must be a column name or {column: ..., format: ...}')
        options['updated_at'] = updated['column']
        options['updated_at_format'] = _checked_format(path, 'updated_at.format', updated['format']) \
            if 'format' in updated else None
    fields = document.get('fields')
    if not isinstance(fields, dict) or not fields:
        raise _fail(path, 'fields must map canonical field names to source columns')
    mapped = []
    for name, spec in fields.items():
        if name not in schema.names:
            raise _fail(path, f'field {name!r} is not a field of {dataset}; its fields are {list(schema.names)}')
        spec = {'column': spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or set(spec) - _FIELD_KEYS or not ('column' in spec or 'default' in spec):
            raise _fail(path, f'field {name!r} must be a source column name or a mapping with "column" '
                              f'and/or "default" (keys among {sorted(_FIELD_KEYS)})')
        if spec.get('normalize') is not None and spec['normalize'] not in normalize.NORMALIZERS:
            raise _fail(path, f'field {name!r}: normalize {spec["normalize"]!r} is not one of '
                              f'{sorted(normalize.NORMALIZERS)}')
        values = spec.get('values')
        if values is not None and (not isinstance(values, dict) or not values):
            raise _fail(path, f'field {name!r}: values must map source codes to canonical values')
        mapped.append(FieldMapping(
            name=name, column=spec.get('column'), normalize=spec.get('normalize'),
            values=tuple((str(k), v) for k, v in values.items()) if values else None, default=spec.get('default'),
            format=_checked_format(path, f'{name}.format', spec['format']) if 'format' in spec else None))
    missing = [f.name for f in schema.fields if not f.nullable and f.name not in fields]
    if missing:
        raise _fail(path, f'the non-nullable {dataset} fields {missing} are neither mapped nor given a default')
    return Mapping(dataset=dataset, fields=tuple(mapped), path=path, **options)


def _checked_format(path: str, where: str, value) -> str:
    if not isinstance(value, str) or '%' not in value:
        raise _fail(path, f'{where} must be a strptime format such as %d/%m/%Y; got {value!r}')
    try:
        datetime.datetime.strptime(datetime.datetime(2026, 1, 31, 12, 30).strftime(value), value)
    except ValueError as err:
        raise _fail(path, f'{where} {value!r} is not a usable strptime format ({err})') from err
    return value


# ---------------------------------------------------------------------------------------------
# Converting a batch of source strings
# ---------------------------------------------------------------------------------------------

def _blame(reasons: Reasons, mask: np.ndarray, values: pa.Array, field: str, problem: str) -> None:
    for row in np.flatnonzero(mask):
        reasons[int(row)].append(f'{field}: {problem} ({values[int(row)].as_py()!r})')


# What each strptime directive matches, to find the day a date was written with (see parse_dates).
_DIRECTIVES = {'d': r'(?P<day>\d{1,2})', 'm': r'\d{1,2}', 'Y': r'\d{4}', 'y': r'\d{2}', 'H': r'\d{1,2}',
               'M': r'\d{1,2}', 'S': r'\d{1,2}', '%': '%'}


@functools.cache
def _day_pattern(fmt: str) -> str | None:
    """A regex capturing the day of a date written ``fmt``; None if ``fmt`` has no %d or has a
    directive not in ``_DIRECTIVES``."""
    if '%d' not in fmt:
        return None
    pieces = []
    for part in re.split(r'(%.)', fmt):
        if len(part) == 2 and part[0] == '%':
            if part[1] not in _DIRECTIVES:
                return None
            pieces.append(_DIRECTIVES[part[1]])
        else:
            pieces.append(re.escape(part))
    return '^' + ''.join(pieces) + '$'


def parse_dates(text: pa.Array, fmt: str) -> pa.Array:
    """Timestamps (seconds) of ``text`` written ``fmt``; null where a value is not such a date.

    Arrow's strptime rolls impossible dates over (31/02/1987 becomes 3 March): where the parsed
    day differs from the written one (or, for formats without a plain day, where the value does not
    format back to itself), Python's strict ``strptime`` decides, once per distinct value.
    """
    text = pc.utf8_trim_whitespace(text)
    parsed = pc.strptime(text, format=fmt, unit='s', error_is_null=True)
    pattern = _day_pattern(fmt)
    if pattern is not None:
        written = pc.struct_field(pc.extract_regex(text, pattern), 'day').cast(pa.int64())
        suspect = pc.fill_null(pc.not_equal(written, pc.day(parsed)), False)
    else:
        suspect = pc.fill_null(pc.not_equal(pc.strftime(parsed, format=fmt), text), False)
    if not pc.any(suspect).as_py():
        return parsed
    values = pc.unique(text.filter(suspect))

    def strict(value):
        try:
            return datetime.datetime.strptime(value, fmt)
        except ValueError:
            return None

    checked = pa.array([strict(v) for v in values.to_pylist()], pa.timestamp('s'))
    return pc.replace_with_mask(parsed, suspect, checked.take(pc.index_in(text.filter(suspect), value_set=values)))


def _typed(text: pa.Array, field: schemas.Field, mapping: Mapping, fmt: str | None,
           reasons: Reasons) -> pa.Array:
    """``text`` (strings, nulls for empty cells) as ``field``'s type; bad cells become nulls + reasons."""
    kind = field.type
    if field.is_list:  # every canonical list holds strings (skills, contract types, languages)
        lists = pc.split_pattern(text, mapping.list_separator)
        trimmed = pa.ListArray.from_arrays(lists.offsets, pc.utf8_trim_whitespace(pc.list_flatten(lists)),
                                           mask=pc.is_null(lists))
        return pc.fill_null(trimmed.cast(field.type), pa.scalar([], field.type))
    present = pc.is_valid(text).to_numpy(zero_copy_only=False)
    if pa.types.is_string(kind):
        return text
    if pa.types.is_floating(kind) or pa.types.is_integer(kind):
        compact = pc.replace_substring_regex(text, '[\\s\u00a0\u202f]', '')  # 1 234,56 with (non-breaking) spaces
        if mapping.decimal != '.':
            compact = pc.replace_substring(compact, mapping.decimal, '.')
        pattern = r'^[+-]?\d+$' if pa.types.is_integer(kind) else r'^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$'
        ok = pc.fill_null(pc.match_substring_regex(compact, pattern), False)
        bad = present & ~ok.to_numpy(zero_copy_only=False)
        _blame(reasons, bad, text, field.name, f'not a number (decimal separator {mapping.decimal!r})')
        return pc.if_else(ok, compact, pa.scalar(None, pa.string())).cast(kind)
    if pa.types.is_date32(kind) or pa.types.is_timestamp(kind):
        parsed = parse_dates(text, fmt or mapping.date_format)
        bad = present & pc.is_null(parsed).to_numpy(zero_copy_only=False)
        _blame(reasons, bad, text, field.name, f'not a date written {fmt or mapping.date_format}')
        return parsed.cast(kind) if pa.types.is_date32(kind) else parsed
    if pa.types.is_boolean(kind):
        lowered = pc.utf8_lower(pc.utf8_trim_whitespace(text))
        true = pc.is_in(lowered, pa.array(mapping.true_values)).to_numpy(zero_copy_only=False)
        false = pc.is_in(lowered, pa.array(mapping.false_values)).to_numpy(zero_copy_only=False)
        bad = present & ~true & ~false
        _blame(reasons, bad, text, field.name, f'not a yes/no value ({list(mapping.true_values)} or '
                                               f'{list(mapping.false_values)})')
        return pa.array(true, mask=~(true | false))
    raise ConfigError(f'{mapping.path}: field {field.name} of type {kind} cannot be read from text')


def convert(batch: pa.RecordBatch, mapping: Mapping) -> tuple[pa.RecordBatch, Reasons]:
    """The canonical columns of a batch of source strings (source column names), and the reasons
    each bad row fails (row index -> reasons). The batch keeps ``_source`` and ``_row``; with
    ``updated_at``, ``_updated_at`` (a timestamp) is added."""
    schema, n = mapping.schema, batch.num_rows
    reasons: Reasons = collections.defaultdict(list)
    by_name = {f.name: f for f in mapping.fields}
    columns, names = [], []
    for field in schema.fields:
        spec = by_name.get(field.name)
        if spec is None:
            columns.append(pa.nulls(n, field.type))
            names.append(field.name)
            continue
        text = batch.column(spec.column) if spec.column is not None else pa.nulls(n, pa.string())
        text = pc.if_else(pc.equal(pc.utf8_trim_whitespace(text), ''), pa.scalar(None, pa.string()), text)
        if spec.values is not None:
            codes = pa.array([code for code, _ in spec.values], pa.string())
            index = pc.index_in(pc.utf8_trim_whitespace(text), value_set=codes)
            unknown = pc.is_valid(text).to_numpy(zero_copy_only=False) & pc.is_null(index).to_numpy(zero_copy_only=False)
            _blame(reasons, unknown, text, field.name, f'not one of the mapped codes {[c for c, _ in spec.values]}')
            canonical = pa.array([value for _, value in spec.values])
            typed = canonical.take(index).cast(field.type)
        else:
            if spec.normalize is not None:
                text, invalid = normalize.NORMALIZERS[spec.normalize](text)
                _blame(reasons, invalid, batch.column(spec.column), field.name, f'not a valid {spec.normalize}')
            typed = _typed(text, field, mapping, spec.format, reasons)
        if spec.default is not None:
            typed = pc.fill_null(typed, pa.scalar(spec.default).cast(typed.type))
        columns.append(typed)
        names.append(field.name)
    columns += [batch.column(schemas.SOURCE_COLUMN), batch.column(schemas.ROW_COLUMN)]
    names += [schemas.SOURCE_COLUMN, schemas.ROW_COLUMN]
    if mapping.updated_at:
        text = batch.column(mapping.updated_at)
        stamp = parse_dates(text, mapping.updated_at_format or mapping.date_format)
        bad = pc.is_valid(text).to_numpy(zero_copy_only=False) & pc.is_null(stamp).to_numpy(zero_copy_only=False)
        _blame(reasons, bad, text, mapping.updated_at,
               f'not a date written {mapping.updated_at_format or mapping.date_format}')
        columns.append(stamp)
        names.append(UPDATED_AT)
    return pa.RecordBatch.from_arrays(columns, names=names), reasons

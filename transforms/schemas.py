"""Declared record schemas: the contract between files on disk and the pipelines.

A ``RecordSchema`` names its fields with their Arrow types, whether they may be null, and the checks
each value must pass (ranges, allowed values, identifier checks). ``transforms.validation`` applies
them to whole Arrow batches at once; a row that fails any check goes to the dead-letter output with
a reason that names the field, the value and what is allowed.

List fields (``list<string>``) are checked element by element. In CSV files a list is written as its
elements joined by ``|`` (``LIST_SEPARATOR``).

Columns whose name starts with ``_`` are record metadata added by the readers, not data: ``_source``
(the file a row came from) and ``_row`` (its 0-based row number in that file). They locate a record
for dead letters and for deterministic de-duplication.
"""
import dataclasses
import datetime
import json
import typing

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from stdnum.fr import siret

from transforms import taxonomy

LIST_SEPARATOR = '|'
SOURCE_COLUMN = '_source'
ROW_COLUMN = '_row'
METADATA_FIELDS = (
    pa.field(SOURCE_COLUMN, pa.string(), nullable=False),
    pa.field(ROW_COLUMN, pa.int64(), nullable=False),
)

CONTRACT_TYPES = ('CDI', 'CDD', 'INTERIM', 'ALTERNANCE', 'STAGE', 'FREELANCE')

# A vectorised value check: takes the (non-null) values of a column, returns a boolean numpy mask
# of the valid ones. Module-level functions only, so schemas pickle for remote workers.
ValueCheck = typing.Callable[[pa.Array], np.ndarray]


def is_valid_siret(values: pa.Array) -> np.ndarray:
    """SIRET: 14 digits with a valid Luhn key (python-stdnum, La Poste exception included)."""
    return np.fromiter((siret.is_valid(v) for v in values.to_pylist()), dtype=bool, count=len(values))


def is_language_code(values: pa.Array) -> np.ndarray:
    """ISO 639-1 language code: two lower-case ASCII letters."""
    return pc.match_substring_regex(values, r'^[a-z]{2}$').to_numpy(zero_copy_only=False)


def is_email(values: pa.Array) -> np.ndarray:
    """A plausible e-mail address: one ``@``, a non-empty local part and a dotted domain."""
    return pc.match_substring_regex(values, r'^[^@\s]+@[^@\s]+\.[^@\s]+$').to_numpy(zero_copy_only=False)


@dataclasses.dataclass(frozen=True)
class Check:
    """A named value check, with the words used in a dead-letter reason ("must be <allowed>")."""
    function: ValueCheck
    allowed: str


ESCO_SKILL = Check(taxonomy.is_esco_skill, 'an ESCO skill id (UUID of http://data.europa.eu/esco/skill/...)')
SIRET = Check(is_valid_siret, 'a SIRET: 14 digits with a valid Luhn key')
LANGUAGE = Check(is_language_code, 'an ISO 639-1 code (two lower-case letters)')
EMAIL = Check(is_email, 'an e-mail address')


@dataclasses.dataclass(frozen=True)
class Field:
    """One declared field. For list fields, bounds, ``allowed`` and ``check`` apply to each element."""
    name: str
    type: pa.DataType
    nullable: bool = False
    min_value: float | None = None
    max_value: float | None = None
    allowed: tuple[str, ...] | None = None
    check: Check | None = None
    doc: str = ''

    @property
    def is_list(self) -> bool:
        return pa.types.is_list(self.type) or pa.types.is_large_list(self.type)

    @property
    def value_type(self) -> pa.DataType:
        return self.type.value_type if self.is_list else self.type


@dataclasses.dataclass(frozen=True)
class RowCheck:
    """A check across fields of one row: ``function(batch)`` returns the boolean mask of valid rows."""
    function: typing.Callable[[pa.RecordBatch], np.ndarray]
    description: str


@dataclasses.dataclass(frozen=True)
class RecordSchema:
    name: str
    fields: tuple[Field, ...]
    key: tuple[str, ...]
    row_checks: tuple[RowCheck, ...] = ()

    def __post_init__(self):
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f'schema {self.name!r} declares a field twice: {names}')
        unknown = [k for k in self.key if k not in names]
        if unknown:
            raise ValueError(f'schema {self.name!r}: key fields {unknown} are not declared fields')

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f'schema {self.name!r} has no field {name!r}')

    def project(self, names: tuple[str, ...], *, name: str) -> 'RecordSchema':
        """The schema of just these fields (row checks dropped), under another ``name``."""
        return RecordSchema(name=name, fields=tuple(self.field(n) for n in names),
                            key=tuple(k for k in self.key if k in names))

    def arrow_schema(self, with_metadata: bool = False) -> pa.Schema:
        """The Arrow schema of valid data; with ``_source`` and ``_row`` when ``with_metadata``."""
        fields = [pa.field(f.name, f.type, nullable=f.nullable) for f in self.fields]
        return pa.schema(fields + (list(METADATA_FIELDS) if with_metadata else []))


def salary_band_is_ordered(batch: pa.RecordBatch) -> np.ndarray:
    return pc.less_equal(batch.column('salary_min'), batch.column('salary_max')).to_numpy(zero_copy_only=False)


_LAT = dict(min_value=-90.0, max_value=90.0)
_LON = dict(min_value=-180.0, max_value=180.0)

CANDIDATES = RecordSchema(
    name='candidates',
    key=('candidate_id',),
    fields=(
        Field('candidate_id', pa.string(), doc='Stable candidate identifier.'),
        Field('first_name', pa.string()),
        Field('last_name', pa.string()),
        Field('email', pa.string(), check=EMAIL),
        Field('city', pa.string()),
        Field('latitude', pa.float64(), **_LAT, doc='WGS84 degrees; NaN is rejected.'),
        Field('longitude', pa.float64(), **_LON, doc='WGS84 degrees; NaN is rejected.'),
        Field('skills', pa.list_(pa.string()), check=ESCO_SKILL, doc='ESCO skill ids.'),
        Field('years_experience', pa.float64(), min_value=0.0, max_value=60.0),
        Field('expected_salary', pa.float64(), min_value=1.0, max_value=1_000_000.0,
              doc='Expected gross annual salary, EUR.'),
        Field('contract_types', pa.list_(pa.string()), allowed=CONTRACT_TYPES),
        Field('languages', pa.list_(pa.string()), check=LANGUAGE),
        Field('last_contact_date', pa.date32(), doc='Drives the 2-year GDPR retention.'),
    ),
)

OFFERS = RecordSchema(
    name='offers',
    key=('offer_id',),
    fields=(
        Field('offer_id', pa.string(), doc='Stable job offer identifier.'),
        Field('employer_siret', pa.string(), check=SIRET),
        Field('title', pa.string()),
        Field('required_skills', pa.list_(pa.string()), check=ESCO_SKILL),
        Field('nice_to_have_skills', pa.list_(pa.string()), check=ESCO_SKILL),
        Field('city', pa.string()),
        Field('latitude', pa.float64(), **_LAT),
        Field('longitude', pa.float64(), **_LON),
        Field('min_experience_years', pa.float64(), min_value=0.0, max_value=60.0),
        Field('salary_min', pa.float64(), min_value=1.0, max_value=1_000_000.0,
              doc='Gross annual salary band, EUR.'),
        Field('salary_max', pa.float64(), min_value=1.0, max_value=1_000_000.0),
        Field('contract_type', pa.string(), allowed=CONTRACT_TYPES),
        Field('minimum_match_score', pa.float64(), min_value=0.0, max_value=1.0,
              doc='Matches scoring below this are not kept.'),
    ),
    row_checks=(RowCheck(salary_band_is_ordered, 'salary_min must be <= salary_max'),),
)

SCORE_COMPONENTS = ('required_skills', 'nice_to_have_skills', 'experience', 'distance', 'salary', 'contract')

MATCHES = RecordSchema(
    name='matches',
    key=('offer_id', 'candidate_id'),
    fields=(
        Field('offer_id', pa.string()),
        Field('candidate_id', pa.string()),
        Field('score', pa.float32(), min_value=0.0, max_value=1.0, doc='Weighted mean of the components.'),
        Field('rank', pa.int32(), nullable=True,
              doc='With --top_k: 1 = best match of the offer (ties broken by candidate_id); else null.'),
        *(Field(f'score_{c}', pa.float32(), min_value=0.0, max_value=1.0) for c in SCORE_COMPONENTS),
        Field('distance_km', pa.float32()),
        Field('weights', pa.string(), doc='The weights used, as JSON: the score is explainable.'),
    ),
)


def to_jsonable(value):
    """A row value (from ``RecordBatch.to_pylist``) as something ``json.dumps`` accepts."""
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return 'NaN'
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode('utf-8', errors='replace')
    return value


def row_to_json(row: dict) -> str:
    return json.dumps({k: to_jsonable(v) for k, v in row.items()}, ensure_ascii=False, sort_keys=True)

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
from stdnum.fr import nir
from stdnum.fr import siren
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


def _per_distinct_value(values: pa.Array, is_valid) -> np.ndarray:
    """``is_valid`` (one Python call) per distinct value, mapped back to every row: identifiers such
    as an establishment's SIRET repeat on thousands of rows."""
    distinct = pc.unique(values)
    good = pa.array([v for v in distinct.to_pylist() if is_valid(v)], values.type)
    return pc.is_in(values, value_set=good).to_numpy(zero_copy_only=False)


def is_valid_siret(values: pa.Array) -> np.ndarray:
    """SIRET: 14 digits with a valid Luhn key (python-stdnum, La Poste exception included)."""
    return _per_distinct_value(values, siret.is_valid)


def is_valid_siren(values: pa.Array) -> np.ndarray:
    """SIREN: 9 digits with a valid Luhn key (python-stdnum)."""
    return _per_distinct_value(values, siren.is_valid)


_NIR_SIMPLE = r'^[0-9]{5}([0-9]{2}|2A|2B)[0-9]{8}$'


def is_valid_nir(values: pa.Array) -> np.ndarray:
    """NIR: 15 characters with a valid key, exactly as python-stdnum's ``nir.is_valid``.

    Every NIR is distinct, and stdnum takes ~20 us a value, so values already in compact form (15
    characters, digits, 2A/2B for Corsica) are checked here on whole arrays with stdnum's formula
    (key = 97 - first 13 digits mod 97, 2A -> 19, 2B -> 18); any other value (spaces, dots, lower
    case, wrong length) goes to stdnum itself. tests/transforms/test_validation.py checks that both
    agree.
    """
    values = pc.cast(values, pa.string())
    simple = pc.fill_null(pc.match_substring_regex(values, _NIR_SIMPLE), False).to_numpy(zero_copy_only=False)
    valid = np.zeros(len(values), dtype=bool)
    rows = np.flatnonzero(simple)
    if len(rows):
        text = pc.take(values, pa.array(rows))
        text = pc.replace_substring(pc.replace_substring(text, '2A', '19'), '2B', '18')  # only at 5-6: others are digits
        text = pa.concat_arrays([text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text])
        start = np.frombuffer(text.buffers()[1], dtype=np.int32, count=1)[0]  # every value is 15 ASCII bytes
        digits = np.frombuffer(text.buffers()[2], dtype=np.uint8, count=15 * len(rows), offset=start)
        digits = digits.reshape(-1, 15).astype(np.int64) - ord('0')
        remainder = np.zeros(len(rows), dtype=np.int64)
        for column in range(13):  # Horner's rule mod 97: no 13-digit integers needed
            remainder = (remainder * 10 + digits[:, column]) % 97
        valid[rows] = (97 - remainder) == digits[:, 13] * 10 + digits[:, 14]
    others = np.flatnonzero(~simple)
    if len(others):
        valid[others] = [v is not None and nir.is_valid(v) for v in pc.take(values, pa.array(others)).to_pylist()]
    return valid


def is_month(values: pa.Array) -> np.ndarray:
    """A month written YYYY-MM."""
    return pc.match_substring_regex(values, r'^[0-9]{4}-(0[1-9]|1[0-2])$').to_numpy(zero_copy_only=False)


def is_language_code(values: pa.Array) -> np.ndarray:
    """ISO 639-1 language code: two lower-case ASCII letters."""
    return pc.match_substring_regex(values, r'^[a-z]{2}$').to_numpy(zero_copy_only=False)


def is_email(values: pa.Array) -> np.ndarray:
    """A plausible e-mail address: one ``@``, a non-empty local part and a dotted domain."""
    return pc.match_substring_regex(values, r'^[^@\s]+@[^@\s]+\.[^@\s]+$').to_numpy(zero_copy_only=False)


def is_e164(values: pa.Array) -> np.ndarray:
    """A phone number in E.164: '+', the country code and the number, 8 to 15 digits in all
    (``transforms.normalize.phone`` writes them)."""
    return pc.match_substring_regex(values, r'^\+[1-9][0-9]{7,14}$').to_numpy(zero_copy_only=False)


def is_postcode(values: pa.Array) -> np.ndarray:
    """A French postcode: five digits (``transforms.normalize.postcode`` writes them)."""
    return pc.match_substring_regex(values, r'^[0-9]{5}$').to_numpy(zero_copy_only=False)


@dataclasses.dataclass(frozen=True)
class Check:
    """A named value check, with the words used in a dead-letter reason ("must be <allowed>")."""
    function: ValueCheck
    allowed: str


ESCO_SKILL = Check(taxonomy.is_esco_skill, 'an ESCO skill id (UUID of http://data.europa.eu/esco/skill/...)')
SIRET = Check(is_valid_siret, 'a SIRET: 14 digits with a valid Luhn key')
SIREN = Check(is_valid_siren, 'a SIREN: 9 digits with a valid Luhn key')
NIR = Check(is_valid_nir, 'a NIR: 15 characters with a valid key')
MONTH = Check(is_month, 'a month YYYY-MM')
LANGUAGE = Check(is_language_code, 'an ISO 639-1 code (two lower-case letters)')
EMAIL = Check(is_email, 'an e-mail address')
PHONE = Check(is_e164, 'a phone number in E.164 (+33612345678)')
POSTCODE = Check(is_postcode, 'a French postcode (5 digits)')


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
        Field('phone', pa.string(), nullable=True, check=PHONE),
        Field('postcode', pa.string(), nullable=True, check=POSTCODE),
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


def siret_in_company(batch: pa.RecordBatch) -> np.ndarray:
    sirets = batch.column('establishment_siret').to_pylist()
    sirens = batch.column('company_siren').to_pylist()
    return np.fromiter((a is not None and b is not None and a[:9] == b for a, b in zip(sirets, sirens)),
                       dtype=bool, count=len(sirets))


def contract_dates_are_ordered(batch: pa.RecordBatch) -> np.ndarray:
    ends = batch.column('end_date')
    ordered = pc.greater_equal(ends, batch.column('start_date'))
    return pc.or_kleene(ends.is_null(), ordered).fill_null(True).to_numpy(zero_copy_only=False)


EMPLOYEES = RecordSchema(
    name='employees',
    key=('employee_id',),
    fields=(
        Field('employee_id', pa.string(), doc='Stable employee identifier.'),
        Field('nir', pa.string(), check=NIR, doc='Social security number with its key (15 characters).'),
        Field('last_name', pa.string()),
        Field('first_name', pa.string()),
        Field('birth_date', pa.date32()),
        Field('email', pa.string(), nullable=True, check=EMAIL),
        Field('phone', pa.string(), nullable=True, check=PHONE),
        Field('postcode', pa.string(), nullable=True, check=POSTCODE),
        Field('cadre', pa.bool_(), doc='Executive status: APEC and prévoyance cadres.'),
        Field('alsace_moselle', pa.bool_(), doc='Local regime of Alsace-Moselle.'),
        Field('low_qualification', pa.bool_(), doc='Below level 3 (CPF: 800 EUR a year, cap 8,000).'),
    ),
)

ESTABLISHMENTS = RecordSchema(
    name='establishments',
    key=('establishment_siret',),
    fields=(
        Field('establishment_siret', pa.string(), check=SIRET),
        Field('company_siren', pa.string(), check=SIREN),
        Field('name', pa.string()),
        Field('company_headcount', pa.int64(), min_value=0, max_value=10_000_000,
              doc='Company headcount (effectif): thresholds 11 and 50.'),
        Field('at_mp_rate', pa.float64(), min_value=0.0, max_value=30.0, doc='AT/MP rate notified, percent.'),
        Field('mobility_rate', pa.float64(), min_value=0.0, max_value=5.0, doc='Versement mobilité, percent.'),
    ),
    row_checks=(RowCheck(siret_in_company, 'the SIRET must start with the SIREN of its company'),),
)

CONTRACTS = RecordSchema(
    name='contracts',
    key=('contract_id',),
    fields=(
        Field('contract_id', pa.string()),
        Field('employee_id', pa.string()),
        Field('establishment_siret', pa.string(), check=SIRET),
        Field('contract_type', pa.string(), allowed=CONTRACT_TYPES),
        Field('start_date', pa.date32()),
        Field('end_date', pa.date32(), nullable=True, doc='Last day of the contract; null while it runs.'),
        Field('weekly_hours', pa.float64(), min_value=0.01, max_value=48.0, doc='35 is full time.'),
        Field('monthly_salary', pa.float64(), min_value=0.0, max_value=1_000_000.0,
              doc='Gross base salary of a full month of this contract, EUR.'),
    ),
    row_checks=(RowCheck(contract_dates_are_ordered, 'end_date must not be before start_date'),),
)

VARIABLE_ELEMENTS = RecordSchema(
    name='variable_elements',
    key=('employee_id', 'period'),
    fields=(
        Field('employee_id', pa.string()),
        Field('period', pa.string(), check=MONTH),
        Field('overtime_hours', pa.float64(), min_value=0.0, max_value=300.0),
        Field('bonus', pa.float64(), min_value=0.0, max_value=10_000_000.0, doc='EUR, gross.'),
        Field('unpaid_absence_hours', pa.float64(), min_value=0.0, max_value=400.0),
    ),
)

WITHHOLDING_RATES = RecordSchema(
    name='withholding_rates',
    key=('employee_id', 'period'),
    fields=(
        Field('employee_id', pa.string()),
        Field('period', pa.string(), check=MONTH),
        Field('pas_rate', pa.float64(), min_value=0.0, max_value=100.0,
              doc='Personal withholding rate from the tax administration, percent.'),
    ),
)

PAYSLIP_LINES = RecordSchema(
    name='payslip_lines',
    key=('employee_id', 'period', 'rubric'),
    fields=(
        Field('employee_id', pa.string()),
        Field('period', pa.string()),
        Field('line', pa.int32(), doc='Order on the payslip.'),
        Field('rubric', pa.string()),
        Field('kind', pa.string(), allowed=('gross', 'contribution', 'reduction', 'tax')),
        Field('label', pa.string()),
        Field('base_cents', pa.int64(), nullable=True),
        Field('hours', pa.float64(), nullable=True),
        Field('employee_rate', pa.float64(), nullable=True, doc='Percent.'),
        Field('employer_rate', pa.float64(), nullable=True, doc='Percent.'),
        Field('employee_cents', pa.int64(), doc='Gross lines: added to gross. Others: withheld from the employee.'),
        Field('employer_cents', pa.int64(), doc='Paid by the employer; the RGDU line is negative.'),
    ),
)

PAYSLIPS = RecordSchema(
    name='payslips',
    key=('employee_id', 'period'),
    fields=(
        Field('employee_id', pa.string()),
        Field('period', pa.string()),
        Field('establishment_siret', pa.string()),
        *(Field(name, pa.int64()) for name in (
            'gross_cents', 'employee_contributions_cents', 'net_before_tax_cents', 'net_taxable_cents')),
        Field('pas_rate', pa.float64(), doc='Percent applied: personal rate, else the taux neutre grid.'),
        *(Field(name, pa.int64()) for name in (
            'pas_cents', 'net_pay_cents', 'employer_contributions_cents')),
        Field('rgdu_coefficient', pa.float64()),
        *(Field(name, pa.int64()) for name in ('rgdu_cents', 'employer_cost_cents', 'ceiling_cents')),
        Field('hours_paid', pa.float64()),
        Field('smic_reference_cents', pa.int64()),
        Field('ytd_gross_cents', pa.int64(), doc='Gross of the year to date, this month included.'),
        Field('ytd_smic_reference_cents', pa.int64(), doc='RGDU SMIC reference of the year to date.'),
        Field('ytd_rgdu_cents', pa.int64(), doc='RGDU of the year to date: the next month regularises against it.'),
    ),
)

PAYROLL_CONTROLS = RecordSchema(
    name='payroll_controls',
    key=('establishment_siret', 'period', 'item'),
    fields=(
        Field('establishment_siret', pa.string()),
        Field('period', pa.string()),
        Field('item', pa.string(), doc='headcount, a total (gross, net_pay, ...) or employee:/employer:RUBRIC.'),
        Field('value', pa.int64(), doc='Cents; a count for headcount.'),
    ),
)


CPF_COUNTED_ABSENCES = ('maternity', 'paternity', 'adoption', 'parental_presence', 'family_support',
                        'parental_leave', 'work_accident', 'occupational_disease')

ABSENCES = RecordSchema(
    name='absences',
    key=('employee_id', 'year', 'kind'),
    fields=(
        Field('employee_id', pa.string()),
        Field('year', pa.int64(), min_value=2000, max_value=2100),
        Field('kind', pa.string(), allowed=CPF_COUNTED_ABSENCES + ('sickness', 'unpaid_leave', 'other'),
              doc='The CPF counts the first eight kinds as worked time.'),
        Field('hours', pa.float64(), min_value=0.0, max_value=3000.0),
    ),
)

CPF_BALANCES = RecordSchema(
    name='cpf_balances',
    key=('employee_id',),
    fields=(
        Field('employee_id', pa.string()),
        Field('balance', pa.float64(), min_value=0.0, max_value=100_000.0, doc='EUR on the counter now.'),
        Field('last_credited_year', pa.int64(), nullable=True, min_value=2015, max_value=2100,
              doc='The last year already credited: a year up to it is never credited again.'),
    ),
)

CPF_CREDITS = RecordSchema(
    name='cpf_credits',
    key=('employee_id', 'year'),
    fields=(
        Field('employee_id', pa.string()),
        Field('year', pa.int64()),
        Field('hours_worked', pa.float64(), doc='Hours paid in the year (payslips).'),
        Field('hours_absences_counted', pa.float64(), doc='Absences the CPF counts as worked.'),
        Field('annual_credit_cents', pa.int64(), doc='500 EUR, or 800 EUR below qualification level 3.'),
        Field('cap_cents', pa.int64()),
        Field('credit_cents', pa.int64(), doc='What this year adds to the counter, after the cap.'),
        Field('balance_before_cents', pa.int64()),
        Field('balance_after_cents', pa.int64()),
        Field('status', pa.string(), allowed=('credited', 'capped', 'at_cap', 'already_credited', 'no_hours')),
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

"""Unit tests of transforms.validation: plain pytest on Arrow batches, no Beam."""
import json
import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pyarrow as pa
import pytest

from tests import sample_records as sr
from transforms import schemas, validation
from transforms.schemas import Field, RecordSchema


def make_batch(records: list[dict], schema: RecordSchema, arrow_schema: pa.Schema | None = None,
               source: str = 'in.parquet') -> pa.RecordBatch:
    """``records`` as a batch of the declared (nullable) types plus ``_source`` and ``_row``."""
    table = pa.Table.from_pylist(records, schema=arrow_schema or sr.nullable_arrow_schema(schema))
    batch = table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist(
        [], schema=table.schema)
    batch = batch.append_column(schemas.SOURCE_COLUMN, pa.array([source] * len(records), pa.string()))
    return batch.append_column(schemas.ROW_COLUMN, pa.array(range(len(records)), pa.int64()))


def errors_by_row(letters) -> dict[str, str]:
    return {letter.source: letter.error for letter in letters}


# --- validate_batch ---------------------------------------------------------------------------

def test_valid_rows_pass_unchanged_with_the_declared_schema():
    records = [sr.candidate(i) for i in range(4)]
    valid, letters = validation.validate_batch(make_batch(records, schemas.CANDIDATES), schemas.CANDIDATES,
                                               step='ReadCandidates')
    assert letters == []
    assert valid.schema == schemas.CANDIDATES.arrow_schema(with_metadata=True)
    assert valid.select(list(schemas.CANDIDATES.names)).to_pylist() == records
    assert valid.column('_row').to_pylist() == [0, 1, 2, 3]


@pytest.mark.parametrize('changes, expected', [
    ({'latitude': math.nan}, 'latitude=nan: must be a number in [-90.0, 90.0]'),
    ({'longitude': 181.0}, 'longitude=181.0: must be a number in [-180.0, 180.0]'),
    ({'years_experience': -1.0}, 'years_experience=-1.0: must be a number in [0.0, 60.0]'),
    ({'skills': [sr.SKILLS[0], sr.UNKNOWN_SKILL]},
     f"skills: unknown values ['{sr.UNKNOWN_SKILL}']: must be an ESCO skill id"),
    ({'contract_types': ['CDI', 'PERMANENT']},
     "contract_types: unknown values ['PERMANENT']: must be one of CDI, CDD, INTERIM"),
    ({'languages': ['FR']}, "languages: unknown values ['FR']: must be an ISO 639-1 code"),
    ({'email': 'nobody'}, "email='nobody': must be an e-mail address"),
    ({'city': None}, 'city=null: required, must not be empty'),
    ({'skills': None}, 'skills=null: required, must not be empty'),
    ({'skills': [None, sr.SKILLS[0]]}, 'skills: null values [None]: must be non-null values'),
])
def test_a_bad_candidate_becomes_a_dead_letter_naming_field_value_and_rule(changes, expected):
    records = [sr.candidate(0), sr.candidate(1, **changes), sr.candidate(2)]
    valid, letters = validation.validate_batch(make_batch(records, schemas.CANDIDATES), schemas.CANDIDATES,
                                               step='ReadCandidates')
    assert valid.column('candidate_id').to_pylist() == ['cand-000', 'cand-002']
    assert len(letters) == 1
    letter = letters[0]
    assert letter.error.startswith(expected), letter.error
    assert letter.step == 'ReadCandidates'
    assert letter.source == 'in.parquet#row=1'
    payload = json.loads(letter.payload)
    assert payload['candidate_id'] == 'cand-001'
    assert set(payload) == set(schemas.CANDIDATES.names)  # no metadata columns


@pytest.mark.parametrize('changes, expected', [
    ({'minimum_match_score': 1.5}, 'minimum_match_score=1.5: must be a number in [0.0, 1.0]'),
    ({'minimum_match_score': -0.1}, 'minimum_match_score=-0.1: must be a number in [0.0, 1.0]'),
    ({'employer_siret': '73282932000075'},
     "employer_siret='73282932000075': must be a SIRET: 14 digits with a valid Luhn key"),
    ({'contract_type': 'PERMANENT'},
     "contract_type='PERMANENT': must be one of CDI, CDD, INTERIM, ALTERNANCE, STAGE, FREELANCE"),
    ({'salary_min': 50000.0, 'salary_max': 40000.0},
     'salary_min must be <= salary_max (salary_min=50000.0, salary_max=40000.0)'),
    ({'nice_to_have_skills': ['xyz']},
     "nice_to_have_skills: unknown values ['xyz']: must be an ESCO skill id "
     '(UUID of http://data.europa.eu/esco/skill/...)'),
])
def test_a_bad_offer_becomes_a_dead_letter(changes, expected):
    records = [sr.offer(0), sr.offer(1, **changes)]
    valid, letters = validation.validate_batch(make_batch(records, schemas.OFFERS), schemas.OFFERS,
                                               step='ReadOffers')
    assert valid.column('offer_id').to_pylist() == ['offer-000']
    assert [letter.error for letter in letters] == [expected]


def test_every_failing_check_of_a_row_is_listed_in_field_order():
    bad = sr.candidate(1, latitude=math.nan, skills=['xyz'], contract_types=['PERM'], city=None)
    _, letters = validation.validate_batch(make_batch([bad], schemas.CANDIDATES), schemas.CANDIDATES, step='S')
    assert letters[0].error.split('; ') == [
        'city=null: required, must not be empty',
        'latitude=nan: must be a number in [-90.0, 90.0]',
        "skills: unknown values ['xyz']: must be an ESCO skill id "
        '(UUID of http://data.europa.eu/esco/skill/...)',
        "contract_types: unknown values ['PERM']: must be one of CDI, CDD, INTERIM, ALTERNANCE, STAGE, FREELANCE",
    ]


def test_row_checks_only_run_on_rows_whose_fields_are_valid():
    # A null salary_min fails its field check; "salary_min <= salary_max" would only repeat it.
    bad = sr.offer(1, salary_min=None, salary_max=1.0)
    _, letters = validation.validate_batch(make_batch([bad], schemas.OFFERS), schemas.OFFERS, step='S')
    assert letters[0].error == 'salary_min=null: required, must not be empty'


def test_list_elements_are_blamed_on_their_own_row_in_a_sliced_batch():
    records = [sr.candidate(i, skills=['bad-a'] if i == 1 else sr.candidate(i)['skills']) for i in range(3)]
    records.append(sr.candidate(3, skills=[sr.SKILLS[0], 'bad-b', 'bad-c']))
    batch = make_batch(records, schemas.CANDIDATES).slice(1)  # non-zero offset into the list arrays
    valid, letters = validation.validate_batch(batch, schemas.CANDIDATES, step='S')
    assert valid.column('candidate_id').to_pylist() == ['cand-002']
    assert errors_by_row(letters) == {
        'in.parquet#row=1': "skills: unknown values ['bad-a']: must be an ESCO skill id "
                            '(UUID of http://data.europa.eu/esco/skill/...)',
        'in.parquet#row=3': "skills: unknown values ['bad-b', 'bad-c']: must be an ESCO skill id "
                            '(UUID of http://data.europa.eu/esco/skill/...)',
    }


def test_a_null_list_slot_hiding_elements_does_not_shift_the_blame():
    # Arrow lets a null list slot cover child values; they belong to no row and must not be checked.
    skills = pa.ListArray.from_arrays(pa.array([0, 1, 2, 3], pa.int32()),
                                      pa.array([sr.SKILLS[0], 'hidden', 'xyz']),
                                      mask=pa.array([False, True, False]))
    schema = RecordSchema(name='t', key=('id',), fields=(
        Field('id', pa.string()), Field('skills', pa.list_(pa.string()), nullable=True, check=schemas.ESCO_SKILL)))
    batch = pa.RecordBatch.from_arrays(
        [pa.array(['a', 'b', 'c']), skills, pa.array(['f'] * 3), pa.array([0, 1, 2], pa.int64())],
        names=['id', 'skills', '_source', '_row'])
    valid, letters = validation.validate_batch(batch, schema, step='S')
    assert valid.column('id').to_pylist() == ['a', 'b']
    assert [(letter.source, letter.error.split(':')[0]) for letter in letters] == [('f#row=2', 'skills')]


def test_nullable_fields_accept_null_but_still_check_values():
    schema = RecordSchema(name='contacts', key=('id',), fields=(
        Field('id', pa.string()),
        Field('email', pa.string(), nullable=True, check=schemas.EMAIL),
        Field('score', pa.float64(), nullable=True, min_value=0.0)))
    records = [{'id': 'a', 'email': None, 'score': None}, {'id': 'b', 'email': 'x', 'score': -1.0}]
    valid, letters = validation.validate_batch(make_batch(records, schema), schema, step='S')
    assert valid.column('id').to_pylist() == ['a']
    assert valid.schema.field('email').nullable
    assert letters[0].error == "email='x': must be an e-mail address; score=-1.0: must be a number >= 0.0"


def test_an_empty_batch_gives_an_empty_valid_batch():
    valid, letters = validation.validate_batch(make_batch([], schemas.OFFERS), schemas.OFFERS, step='S')
    assert (valid.num_rows, letters) == (0, [])
    assert valid.schema == schemas.OFFERS.arrow_schema(with_metadata=True)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
                           min_size=1, max_size=40))
def test_every_row_is_either_valid_in_range_or_a_dead_letter(latitudes):
    records = [sr.candidate(i, latitude=lat) for i, lat in enumerate(latitudes)]
    valid, letters = validation.validate_batch(make_batch(records, schemas.CANDIDATES), schemas.CANDIDATES, step='S')
    assert valid.num_rows + len(letters) == len(records)
    kept = np.asarray(valid.column('latitude').to_pylist(), dtype=float)
    assert np.all((kept >= -90.0) & (kept <= 90.0))
    expected_valid = [lat is not None and -90.0 <= lat <= 90.0 for lat in latitudes]
    assert valid.column('_row').to_pylist() == [i for i, ok in enumerate(expected_valid) if ok]
    assert all(letter.error.startswith('latitude=') for letter in letters)


# --- cast_columns -----------------------------------------------------------------------------

def test_cast_columns_casts_strings_and_rejects_uncastable_values():
    strings = pa.schema([pa.field(f.name, pa.string() if not f.is_list else f.type)
                         for f in schemas.CANDIDATES.fields])
    records = [sr.candidate(i) for i in range(3)]
    raw = [{k: (sr.csv_cell(v) if not isinstance(v, list) else v) for k, v in r.items()} for r in records]
    raw[1]['latitude'] = 'abc'
    raw[1]['expected_salary'] = '40k'
    raw[2]['last_contact_date'] = '2024-02-30'
    batch, letters = validation.cast_columns(make_batch(raw, schemas.CANDIDATES, strings), schemas.CANDIDATES,
                                             step='ReadCandidates')
    assert batch.schema == validation.castable_schema(schemas.CANDIDATES)
    assert batch.select(list(schemas.CANDIDATES.names)).to_pylist() == records[:1]
    assert errors_by_row(letters) == {
        'in.parquet#row=1': "latitude='abc': cannot be read as double; "
                            "expected_salary='40k': cannot be read as double",
        'in.parquet#row=2': "last_contact_date='2024-02-30': cannot be read as date32[day]",
    }
    assert json.loads(letters[0].payload)['latitude'] == 'abc'  # the raw value, as read


def test_cast_columns_widens_parquet_integers_without_dead_letters():
    arrow = sr.nullable_arrow_schema(schemas.OFFERS).set(9, pa.field('salary_min', pa.int64()))
    records = [sr.offer(0, salary_min=35000), sr.offer(1, salary_min=None)]
    batch, letters = validation.cast_columns(make_batch(records, schemas.OFFERS, arrow), schemas.OFFERS, step='S')
    assert letters == []
    assert batch.column('salary_min').type == pa.float64()
    assert batch.column('salary_min').to_pylist() == [35000.0, None]


def test_uncastable_rows_finds_only_the_bad_values():
    assert validation.uncastable_rows(pa.array(['1', '2.5', None]), pa.float64()).tolist() == []
    assert validation.uncastable_rows(pa.array(['1', 'x', None, 'nan', '']), pa.float64()).tolist() == [1, 4]
    assert validation.uncastable_rows(pa.array([1, 2**40]), pa.int32()).tolist() == [1]


def test_can_cast_tells_missing_cast_kernels():
    assert validation.can_cast(pa.int64(), pa.float64())
    assert validation.can_cast(pa.string(), pa.date32())
    assert validation.can_cast(pa.null(), pa.list_(pa.string()))
    assert not validation.can_cast(pa.list_(pa.string()), pa.float64())
    assert not validation.can_cast(pa.string(), pa.list_(pa.string()))


def test_vectorised_nir_check_agrees_with_python_stdnum():
    import random
    from stdnum.fr import nir
    rng = random.Random(7)
    values = []
    for _ in range(3000):
        body = ''.join(rng.choice('0123456789') for _ in range(13))
        if rng.random() < 0.1:
            body = body[:5] + rng.choice(['2A', '2B']) + body[7:]
        key = 97 - int(body.replace('2A', '19', 1) if body[5:7] == '2A' else
                       body[:5] + '18' + body[7:] if body[5:7] == '2B' else body) % 97
        value = body + f'{key:02d}'
        roll = rng.random()
        if roll < 0.3:                       # a wrong key
            value = value[:13] + f'{(key + rng.randint(1, 96)) % 100:02d}'
        elif roll < 0.35:                    # separators and lower case: stdnum's compact() accepts them
            value = value[:1] + ' ' + value[1:5] + '.' + value[5:].lower()
        elif roll < 0.4:                     # a wrong length
            value = value[:rng.randint(0, 16)]
        elif roll < 0.42:
            value = value[:6] + 'X' + value[7:]
        values.append(value)
    values += ['2A', '', '123456789012345678', '185057800608436', '1850578006084 36']
    expected = [nir.is_valid(v) for v in values]
    assert 0 < sum(expected) < len(values)
    got = schemas.is_valid_nir(pa.array(values + [None])[:-1])
    assert got.tolist() == expected
    chunked = pa.chunked_array([pa.array(values[:100]), pa.array(values[100:])])
    assert schemas.is_valid_nir(chunked.combine_chunks()).tolist() == expected

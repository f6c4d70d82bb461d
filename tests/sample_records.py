"""Small valid records and writers for every input format, shared by the reader and validation tests.

``candidate(i)`` and ``offer(i)`` build a valid record whose values depend on ``i``; pass keyword
arguments to break one field. The writers put a list of such records in a file of each format, the
way an upstream system would (lists joined by ``|`` in CSV, ISO dates in CSV and JSON lines). A CSV
or JSON-lines "record" may also be a raw ``str`` line, written as is, to test unparsable rows.
"""
import csv
import datetime
import json
import math

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq

from transforms import schemas, taxonomy

SKILLS = tuple(skill_id for skill_id, _ in taxonomy.esco_skills()[:6])
VALID_SIRETS = ('73282932000074', '35600000000048')  # Luhn-valid (python-stdnum)
UNKNOWN_SKILL = 'not-an-esco-skill'


def candidate(i: int, **changes) -> dict:
    record = {
        'candidate_id': f'cand-{i:03d}',
        'first_name': f'First{i}',
        'last_name': f'Last{i}',
        'email': f'person{i}@example.fr',
        'phone': None if i % 5 == 4 else f'+3361234{i:04d}',
        'postcode': None if i % 5 == 4 else f'{69001 + i % 9}',
        'city': 'Lyon',
        'latitude': 45.0 + i / 100,
        'longitude': 4.0 + i / 100,
        'skills': [SKILLS[i % len(SKILLS)], SKILLS[(i + 1) % len(SKILLS)]],
        'years_experience': float(i % 20),
        'expected_salary': 30000.0 + 1000 * i,
        'contract_types': ['CDI', 'CDD'] if i % 2 else ['CDI'],
        'languages': ['fr', 'en'] if i % 3 else ['fr'],
        'last_contact_date': datetime.date(2024, 1, 1) + datetime.timedelta(days=i),
    }
    record.update(changes)
    return record


def offer(i: int, **changes) -> dict:
    record = {
        'offer_id': f'offer-{i:03d}',
        'employer_siret': VALID_SIRETS[i % len(VALID_SIRETS)],
        'title': f'Job {i}',
        'required_skills': [SKILLS[i % len(SKILLS)]],
        'nice_to_have_skills': [],
        'city': 'Paris',
        'latitude': 48.85,
        'longitude': 2.35,
        'min_experience_years': 2.0,
        'salary_min': 35000.0,
        'salary_max': 45000.0,
        'contract_type': 'CDI',
        'minimum_match_score': 0.5,
    }
    record.update(changes)
    return record


def nullable_arrow_schema(schema: schemas.RecordSchema) -> pa.Schema:
    """The declared types, every field nullable: what a writer may put in a file."""
    return pa.schema([pa.field(f.name, f.type) for f in schema.fields])


def write_parquet(path, records: list[dict], schema: schemas.RecordSchema, row_group_size: int | None = None,
                  arrow_schema: pa.Schema | None = None) -> str:
    table = pa.Table.from_pylist(records, schema=arrow_schema or nullable_arrow_schema(schema))
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def csv_cell(value) -> str:
    if value is None:
        return ''
    if isinstance(value, list):
        return schemas.LIST_SEPARATOR.join(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, float):
        return 'nan' if math.isnan(value) else repr(value)
    return str(value)


def write_csv(path, records: list, schema: schemas.RecordSchema, columns: list[str] | None = None) -> str:
    columns = columns or list(schema.names)
    with open(path, 'w', newline='', encoding='utf-8') as handle:
        writer = csv.writer(handle, lineterminator='\n')
        writer.writerow(columns)
        for record in records:
            if isinstance(record, str):
                handle.write(record + '\n')
            else:
                writer.writerow([csv_cell(record.get(c)) for c in columns])
    return str(path)


def json_value(value):
    if isinstance(value, datetime.date):
        return value.isoformat()
    return value


def write_jsonl(path, records: list) -> str:
    with open(path, 'w', encoding='utf-8') as handle:
        for record in records:
            line = record if isinstance(record, str) else json.dumps({k: json_value(v) for k, v in record.items()})
            handle.write(line + '\n')
    return str(path)


_AVRO_TYPES = {pa.string(): 'string', pa.float64(): 'double', pa.int64(): 'long', pa.int32(): 'int',
               pa.date32(): {'type': 'int', 'logicalType': 'date'}}


def avro_schema(schema: schemas.RecordSchema, overrides: dict | None = None) -> dict:
    """An Avro record schema for ``schema``, every field nullable; ``overrides`` replaces field types."""
    overrides = overrides or {}

    def avro_type(field):
        if field.name in overrides:
            return overrides[field.name]
        if field.is_list:
            return ['null', {'type': 'array', 'items': _AVRO_TYPES[field.value_type]}]
        return ['null', _AVRO_TYPES[field.type]]

    return {'type': 'record', 'name': schema.name, 'namespace': 'hrbatch.test',
            'fields': [{'name': f.name, 'type': avro_type(f)} for f in schema.fields
                       if overrides.get(f.name, True) is not None]}


def write_avro(path, records: list[dict], schema: schemas.RecordSchema, overrides: dict | None = None,
               sync_interval: int = 16000) -> str:
    parsed = fastavro.parse_schema(avro_schema(schema, overrides))
    with open(path, 'wb') as handle:
        fastavro.writer(handle, parsed, records, sync_interval=sync_interval)
    return str(path)

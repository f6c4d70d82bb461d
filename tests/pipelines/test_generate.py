"""Tests of the sample data generator: files conform to the declared schemas, in every format,
deterministically, and the data is realistic enough for matching to find something."""
import collections
import csv
import datetime
import inspect
import json
import os
import time

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from stdnum.fr import siret

from pipelines import generate
from transforms import schemas, taxonomy
from transforms.errors import ConfigError

CANDIDATES = 120
OFFERS = 40
SCHEMAS = {'candidates': schemas.CANDIDATES, 'offers': schemas.OFFERS}


def _candidates(count: int, **kwargs) -> pa.Table:
    return pa.Table.from_batches(list(generate.candidate_chunks(count, **kwargs)),
                                 schema=schemas.CANDIDATES.arrow_schema())


def _offers(count: int, **kwargs) -> pa.Table:
    return pa.Table.from_batches(list(generate.offer_chunks(count, **kwargs)), schema=schemas.OFFERS.arrow_schema())


@pytest.fixture(scope='module')
def candidates() -> pa.Table:
    return _candidates(CANDIDATES)


@pytest.fixture(scope='module')
def offers() -> pa.Table:
    return _offers(OFFERS)


@pytest.fixture(scope='module')
def written(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Every format of both datasets, written once for the module."""
    output = tmp_path_factory.mktemp('generated')
    return generate.generate(str(output), candidates=CANDIDATES, offers=OFFERS, formats=generate.FORMATS,
                             chunk_rows=50)


# --- Reading each format back into an Arrow table of the declared schema ----------------------

def _read_parquet(path: str, schema: schemas.RecordSchema) -> pa.Table:
    return pq.read_table(path)


def _read_avro(path: str, schema: schemas.RecordSchema) -> pa.Table:
    with open(path, 'rb') as handle:
        reader = fastavro.reader(handle)
        declared = generate.avro_schema(schema)['fields']
        assert [(f['name'], f['type']) for f in reader.writer_schema['fields']] == [
            (f['name'], f['type']) for f in declared]
        rows = list(reader)
    assert all(list(row) == list(schema.names) for row in rows)
    return pa.Table.from_pylist(rows, schema=schema.arrow_schema())


def _from_text(value: str, field: schemas.Field):
    """A CSV cell as the declared type: lists split on ``|`` ('' is the empty list), '' is null in a
    nullable field, ISO dates."""
    if field.is_list:
        return value.split(schemas.LIST_SEPARATOR) if value else []
    if value == '' and field.nullable:
        return None
    if pa.types.is_date32(field.type):
        return datetime.date.fromisoformat(value)
    if pa.types.is_floating(field.type):
        return float(value)
    return value


def _read_csv(path: str, schema: schemas.RecordSchema) -> pa.Table:
    with open(path, newline='', encoding='utf-8') as handle:
        reader = csv.reader(handle, delimiter=',')
        header = next(reader)
        assert header == list(schema.names)
        rows = [{f.name: _from_text(cell, f) for f, cell in zip(schema.fields, row, strict=True)} for row in reader]
    return pa.Table.from_pylist(rows, schema=schema.arrow_schema())


def _read_jsonl(path: str, schema: schemas.RecordSchema) -> pa.Table:
    rows = []
    with open(path, encoding='utf-8') as handle:
        for line in handle:
            row = json.loads(line)
            assert sorted(row) == sorted(schema.names)
            for field in schema.fields:
                assert isinstance(row[field.name], list) == field.is_list, field.name
                if pa.types.is_date32(field.type):
                    row[field.name] = datetime.date.fromisoformat(row[field.name])
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema.arrow_schema())


READERS = {'parquet': _read_parquet, 'avro': _read_avro, 'csv': _read_csv, 'jsonl': _read_jsonl}


def _declared_violations(schema: schemas.RecordSchema, table: pa.Table) -> list[str]:
    """Every way ``table`` breaks the declared schema: types, nulls, ranges, allowed values, checks."""
    problems = []
    if table.schema.names != list(schema.names):
        problems.append(f'columns {table.schema.names}')
    for field in schema.fields:
        column = table.column(field.name).combine_chunks()
        if column.type != field.type:
            problems.append(f'{field.name}: type {column.type}')
        if column.null_count and not field.nullable:
            problems.append(f'{field.name}: {column.null_count} nulls')
        values = pc.list_flatten(column) if field.is_list else column.drop_null()
        if values.null_count:
            problems.append(f'{field.name}: null list items')
        if field.min_value is not None and pc.any(pc.less(values, field.min_value)).as_py():
            problems.append(f'{field.name}: below {field.min_value}')
        if field.max_value is not None and pc.any(pc.greater(values, field.max_value)).as_py():
            problems.append(f'{field.name}: above {field.max_value}')
        if field.allowed is not None and not pc.all(pc.is_in(values, pa.array(field.allowed))).as_py():
            problems.append(f'{field.name}: not in {field.allowed}')
        if field.check is not None and len(values) and not field.check.function(values).all():
            problems.append(f'{field.name}: not {field.check.allowed}')
    batch = table.combine_chunks().to_batches()[0]
    problems += [check.description for check in schema.row_checks if not check.function(batch).all()]
    return problems


# --- Files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('file_format', generate.FORMATS)
@pytest.mark.parametrize('dataset', generate.DATASETS)
def test_each_format_reads_back_as_the_generated_rows(written, candidates, offers, dataset, file_format):
    """Every format carries exactly the generated rows, typed as declared, with no metadata columns."""
    path = written[dataset][file_format]
    assert path.endswith(f'/{dataset}.{file_format}')
    table = READERS[file_format](path, SCHEMAS[dataset])
    assert _declared_violations(SCHEMAS[dataset], table) == []
    expected = candidates if dataset == 'candidates' else offers
    assert table.num_rows == expected.num_rows
    assert table.to_pylist() == expected.to_pylist()


def test_parquet_row_groups_follow_the_chunk_size(written):
    metadata = pq.ParquetFile(written['candidates']['parquet']).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [50, 50, 20]


def test_no_partial_file_is_left_behind(written):
    directory = os.path.dirname(written['candidates']['parquet'])
    assert sorted(os.listdir(directory)) == sorted(f'{d}.{f}' for d in generate.DATASETS for f in generate.FORMATS)


def test_avro_schema_maps_arrow_types():
    fields = {f['name']: f['type'] for f in generate.avro_schema(schemas.CANDIDATES)['fields']}
    assert fields['candidate_id'] == 'string'
    assert fields['latitude'] == 'double'
    assert fields['skills'] == {'type': 'array', 'items': 'string'}
    assert fields['last_contact_date'] == {'type': 'int', 'logicalType': 'date'}
    assert list(fields) == list(schemas.CANDIDATES.names)


def test_zero_rows_give_files_with_only_a_header(tmp_path):
    paths = generate.generate(str(tmp_path), candidates=0, offers=0, formats=generate.FORMATS)
    for dataset, by_format in paths.items():
        for file_format, path in by_format.items():
            assert READERS[file_format](path, SCHEMAS[dataset]).num_rows == 0


# --- Values --------------------------------------------------------------------------------------

def test_values_pass_the_declared_checks_on_a_larger_sample():
    assert _declared_violations(schemas.CANDIDATES, _candidates(3000)) == []
    assert _declared_violations(schemas.OFFERS, _offers(3000)) == []


def test_every_siret_is_valid_and_employers_are_shared():
    sirets = _offers(400).column('employer_siret').to_pylist()
    assert all(siret.is_valid(s) for s in sirets)
    assert len(set(sirets)) < len(sirets) / 2


def test_every_skill_is_an_esco_skill(candidates, offers):
    known = {skill_id for skill_id, _ in taxonomy.esco_skills()}
    for table, column in ((candidates, 'skills'), (offers, 'required_skills'), (offers, 'nice_to_have_skills')):
        assert set(pc.list_flatten(table.column(column)).to_pylist()) <= known


def test_ids_and_emails_are_unique_and_valid():
    table = _candidates(2000)
    ids, emails = table.column('candidate_id').to_pylist(), table.column('email').to_pylist()
    assert ids[:2] == ['C00000001', 'C00000002']
    assert len(set(ids)) == len(ids) and len(set(emails)) == len(emails)
    assert schemas.is_email(table.column('email').combine_chunks()).all()
    assert all(e.isascii() and e == e.lower() for e in emails)
    assert _offers(3).column('offer_id').to_pylist() == ['O000001', 'O000002', 'O000003']


def test_candidate_values_are_realistic(candidates):
    rows = candidates.to_pylist()
    assert all(5 <= len(r['skills']) <= 15 and len(set(r['skills'])) == len(r['skills']) for r in rows)
    assert all(r['contract_types'] and len(set(r['contract_types'])) == len(r['contract_types']) for r in rows)
    assert all(22_000 <= r['expected_salary'] <= 90_000 and 0 <= r['years_experience'] <= 40 for r in rows)
    assert sum('fr' in r['languages'] for r in rows) > 0.9 * len(rows)
    assert collections.Counter(c for r in rows for c in r['contract_types']).most_common(1)[0][0] == 'CDI'
    years = np.array([r['years_experience'] for r in rows])
    salaries = np.array([r['expected_salary'] for r in rows])
    assert np.corrcoef(years, salaries)[0, 1] > 0.5


def test_contact_dates_span_the_gdpr_retention_limit(candidates):
    reference = generate.DEFAULT_REFERENCE_DATE
    dates = candidates.column('last_contact_date').to_pylist()
    assert all(reference - datetime.timedelta(days=3 * 365) <= d <= reference for d in dates)
    past_retention = sum(d < reference.replace(year=reference.year - 2) for d in dates)
    assert 0 < past_retention < len(dates)
    shifted = _candidates(5, reference_date=datetime.date(2030, 1, 1)).column('last_contact_date').to_pylist()
    assert all(d.year >= 2027 for d in shifted)


def test_offer_values_are_realistic(offers):
    for row in offers.to_pylist():
        required, nice = row['required_skills'], row['nice_to_have_skills']
        assert 3 <= len(required) <= 6 and 0 <= len(nice) <= 4
        assert not set(required) & set(nice) and len(set(required)) == len(required)
        assert 0.45 <= row['minimum_match_score'] <= 0.8
        assert row['minimum_match_score'] == round(row['minimum_match_score'], 2)
        assert 0 <= row['min_experience_years'] <= 10
        assert 0.05 <= (row['salary_max'] - row['salary_min']) / row['salary_min'] <= 0.35
        assert row['title'].endswith('(H/F)')


def test_candidates_and_offers_concentrate_in_the_same_cities():
    candidate_cities = collections.Counter(_candidates(2000).column('city').to_pylist())
    offer_cities = collections.Counter(_offers(500).column('city').to_pylist())
    assert candidate_cities.most_common(1)[0][0] == 'Paris'
    assert offer_cities.most_common(1)[0][0] == 'Paris'
    assert set(offer_cities) <= set(candidate_cities) | set(generate._cities().names.to_pylist())


def test_a_realistic_share_of_pairs_covers_the_required_skills():
    """Job families make some, not all, candidates cover at least half of an offer's required skills."""
    candidate_skills = [set(s) for s in _candidates(300).column('skills').to_pylist()]
    coverage = np.array([[len(set(required) & skills) / len(required) for skills in candidate_skills]
                         for required in _offers(20).column('required_skills').to_pylist()])
    covering = coverage >= 0.5
    assert covering.any(axis=0).sum() >= 3  # candidates that could pass the skills part of some offer
    assert covering.mean() < 0.05


# --- Determinism ---------------------------------------------------------------------------------

def test_same_seed_gives_identical_bytes_and_another_seed_other_data(tmp_path):
    def files(directory, seed):
        paths = generate.generate(str(tmp_path / directory), candidates=60, offers=10, seed=seed,
                                  formats=('parquet', 'csv', 'avro'), chunk_rows=25)
        return {(d, f): open(p, 'rb').read() for d, by_format in paths.items() for f, p in by_format.items()}

    first, again, other = files('a', 7), files('b', 7), files('c', 8)
    assert first == again
    assert all(first[key] != other[key] for key in first)
    assert _candidates(60, seed=7).column('email').to_pylist() != _candidates(60, seed=8).column('email').to_pylist()


def test_rows_do_not_depend_on_the_chunk_size():
    assert _candidates(50, chunk_rows=7).equals(_candidates(50, chunk_rows=1000))
    assert _offers(30, chunk_rows=7).equals(_offers(30, chunk_rows=1000))


def test_rows_do_not_depend_on_the_chunk_size_across_random_blocks():
    count = generate.RNG_BLOCK_ROWS + 10
    assert _candidates(count, chunk_rows=1000).equals(_candidates(count, chunk_rows=3001))


def test_a_smaller_count_is_a_prefix_of_a_larger_one(candidates):
    assert _candidates(17).equals(candidates.slice(0, 17))


# --- Streaming -----------------------------------------------------------------------------------

def test_candidate_chunks_is_lazy_and_bounded():
    started = time.perf_counter()
    chunks = generate.candidate_chunks(generate.MAX_CANDIDATES, chunk_rows=10)
    assert inspect.isgenerator(chunks)
    first = next(chunks)
    assert time.perf_counter() - started < 5  # one random block, not 99,999,999 rows
    assert first.num_rows == 10 and first.schema == schemas.CANDIDATES.arrow_schema()
    sizes = [batch.num_rows for batch in generate.candidate_chunks(95, chunk_rows=20)]
    assert sizes == [20, 20, 20, 20, 15]
    assert inspect.isgenerator(generate.offer_chunks(5))


# --- Arguments and command line -----------------------------------------------------------------

@pytest.mark.parametrize('overrides, named', [
    (dict(candidates=-1), 'candidates=-1'),
    (dict(candidates=1.5), 'candidates=1.5'),
    (dict(candidates=True), 'candidates=True'),
    (dict(offers=generate.MAX_OFFERS + 1), 'offers=1000000'),
    (dict(seed=-3), 'seed=-3'),
    (dict(formats=('parquet', 'xlsx')), 'xlsx'),
    (dict(formats=()), 'formats=[]'),
    (dict(chunk_rows=0), 'chunk_rows=0'),
    (dict(reference_date='2026-12-01'), "reference_date='2026-12-01'"),
    (dict(output_dir='s3://bucket/dir'), 's3://bucket/dir'),
])
def test_bad_arguments_raise_config_error_naming_them(tmp_path, overrides, named):
    arguments = dict(output_dir=str(tmp_path / 'out'), candidates=5, offers=5) | overrides
    with pytest.raises(ConfigError, match='not allowed') as error:
        generate.generate(**arguments)
    assert named in str(error.value)
    assert not (tmp_path / 'out').exists()


def test_chunk_generators_check_arguments_when_called():
    with pytest.raises(ConfigError, match='chunk_rows=0'):
        generate.candidate_chunks(10, chunk_rows=0)
    with pytest.raises(ConfigError, match='offers=-1'):
        generate.offer_chunks(-1)


def test_cli_writes_all_formats_and_prints_no_personal_data(tmp_path, capsys):
    code = generate.main(['--output', str(tmp_path), '--candidates', '12', '--offers', '3', '--seed', '5',
                          '--format', 'all', '--reference-date', '2026-06-30', '--chunk-rows', '5'])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 8
    assert all('12 rows' in line for line in lines[:4]) and all('3 rows' in line for line in lines[4:])
    names = _candidates(12, seed=5).column('last_name').to_pylist()
    assert not any(name in out for name in names)
    table = pq.read_table(tmp_path / 'candidates.parquet')
    assert table.equals(_candidates(12, seed=5, reference_date=datetime.date(2026, 6, 30)))


def test_cli_reports_bad_values(tmp_path, capsys):
    assert generate.main(['--output', str(tmp_path), '--candidates', '-5', '--offers', '1']) == 2
    assert 'candidates=-5' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(['--output', str(tmp_path), '--candidates', '5', '--offers', '1', '--format', 'xml'])


# --- gs:// ----------------------------------------------------------------------------------------

def test_writes_every_format_to_gcs_byte_identical_to_a_local_directory(tmp_path, gcs_emulator, capsys):
    bucket = gcs_emulator.create_bucket('hrbatch-generate')
    arguments = ['--candidates', '40', '--offers', '6', '--seed', '3', '--chunk-rows', '16', '--format', 'all']
    assert generate.main(['--output', str(tmp_path), *arguments]) == 0
    assert generate.main(['--output', f'gs://{bucket}/sample', *arguments]) == 0
    printed = capsys.readouterr().out
    objects = {blob.name: blob.download_as_bytes() for blob in gcs_emulator.client.list_blobs(bucket)}
    assert sorted(objects) == sorted(f'sample/{d}.{f}' for d in generate.DATASETS for f in generate.FORMATS)
    for name, content in objects.items():
        local = (tmp_path / name.split('/', 1)[1]).read_bytes()
        assert content == local, name
        assert f'gs://{bucket}/{name}\t' in printed and f'\t{len(local)} bytes' in printed

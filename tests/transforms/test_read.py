"""Tests of ReadRecords: every format, bad rows to dead letters, launch-time checks, GCS emulator."""
import gzip
import logging
import math
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from tests import sample_records as sr
from transforms import read, schemas
from transforms.errors import ConfigError
from transforms.read import ReadRecords, infer_file_format

CANDIDATE_SCHEMA = schemas.CANDIDATES.arrow_schema(with_metadata=True)


def candidate_records() -> list[dict]:
    """Eleven candidates; rows 2, 4, 5 and 7 break one rule each."""
    records = [sr.candidate(i) for i in range(11)]
    records[2] = sr.candidate(2, latitude=math.nan)
    records[4] = sr.candidate(4, skills=[sr.SKILLS[0], sr.UNKNOWN_SKILL])
    records[5] = sr.candidate(5, contract_types=['CDI', 'PERMANENT'])
    records[7] = sr.candidate(7, city=None)
    return records


VALID_ROWS = (0, 1, 3, 6, 8, 9, 10)
CANDIDATE_ERRORS = {
    2: 'latitude=nan: must be a number in [-90.0, 90.0]',
    4: f"skills: unknown values ['{sr.UNKNOWN_SKILL}']: must be an ESCO skill id",
    5: "contract_types: unknown values ['PERMANENT']: must be one of CDI, CDD",
    7: 'city=null: required, must not be empty',
}


def expected_rows(records: list[dict], rows, file_rows=None) -> list[dict]:
    """The records at ``rows`` with their ``_row`` (their index, unless ``file_rows`` maps it)."""
    file_rows = file_rows or {}
    return [dict(records[i], _row=file_rows.get(i, i)) for i in rows]


def rows_of(records, label: str):
    """The rows of a PCollection of batches, without ``_source`` (it differs between inputs)."""
    return (records
            | f'{label}Rows' >> beam.FlatMap(lambda batch: batch.to_pylist())
            | f'{label}DropSource' >> beam.Map(lambda row: {k: v for k, v in row.items() if k != '_source'}))


def dead_letters_are(path: str, expected: dict[int | None, str]):
    """Matcher: one dead letter per expected row of ``path``, its error starting with the given text."""
    def check(letters):
        actual = {letter.source: letter.error for letter in letters}
        wanted = {f'{path}#row={row}' if row is not None else path: text for row, text in expected.items()}
        problems = [f'{source}: expected {text!r}, got {actual.get(source)!r}'
                    for source, text in wanted.items() if not (actual.get(source) or '').startswith(text)]
        extra = sorted(set(actual) - set(wanted))
        if problems or extra or len(letters) != len(actual):
            raise BeamAssertException(f'dead letters differ: {problems}; unexpected: {extra}; all: {letters}')
    return check


def batches_are_capped(cap: int, schema: pa.Schema):
    def check(batches):
        bad = [(b.num_rows, b.schema) for b in batches if not 0 < b.num_rows <= cap or b.schema != schema]
        if bad or not batches:
            raise BeamAssertException(f'batches over {cap} rows, empty or of the wrong schema: {bad}')
    return check


def write_all_formats(directory, records: list[dict]) -> dict[str, str]:
    return {
        # Row groups of 4 rows: three read tasks whose _row numbers must line up.
        'parquet': sr.write_parquet(directory / 'candidates.parquet', records, schemas.CANDIDATES, row_group_size=4),
        'csv': sr.write_csv(directory / 'candidates.csv', records, schemas.CANDIDATES),
        'jsonl': sr.write_jsonl(directory / 'candidates.jsonl', records),
        'avro': sr.write_avro(directory / 'candidates.avro', records, schemas.CANDIDATES, sync_interval=100),
    }


# --- Reading every format ---------------------------------------------------------------------

def test_every_format_reads_back_exactly_the_valid_rows_with_stable_row_numbers(tmp_path, test_pipeline):
    records = candidate_records()
    paths = write_all_formats(tmp_path, records)
    with gzip.open(tmp_path / 'candidates.csv.gz', 'wb') as handle:
        handle.write((tmp_path / 'candidates.csv').read_bytes())
    paths['csv.gz'] = str(tmp_path / 'candidates.csv.gz')
    with test_pipeline() as p:
        for name, path in paths.items():
            result = p | f'Read {name}' >> ReadRecords(file_pattern=path, schema=schemas.CANDIDATES, batch_rows=3)
            assert_that(rows_of(result.records, name), equal_to(expected_rows(records, VALID_ROWS)),
                        label=f'{name}: valid rows')
            assert_that(result.records, batches_are_capped(3, CANDIDATE_SCHEMA), label=f'{name}: batches')
            assert_that(result.dead_letters, dead_letters_are(path, CANDIDATE_ERRORS), label=f'{name}: dead letters')


def test_a_pattern_reads_all_matching_files_and_drops_undeclared_columns(tmp_path, test_pipeline):
    records = [sr.candidate(i) for i in range(6)]
    arrow = sr.nullable_arrow_schema(schemas.CANDIDATES).append(pa.field('internal_note', pa.string()))
    for part, chunk in enumerate((records[:3], records[3:])):
        sr.write_parquet(tmp_path / f'part-{part}.parquet', [dict(r, internal_note='x') for r in chunk],
                         schemas.CANDIDATES, arrow_schema=arrow)
    with test_pipeline() as p:
        result = p | ReadRecords(file_pattern=str(tmp_path / 'part-*.parquet'), schema=schemas.CANDIDATES)
        assert_that(rows_of(result.records, 'parts'),
                    equal_to(expected_rows(records, range(6), file_rows={3: 0, 4: 1, 5: 2})), label='rows')
        assert_that(result.records, batches_are_capped(8192, CANDIDATE_SCHEMA), label='schema')


# --- Bad rows ---------------------------------------------------------------------------------

def test_unparsable_rows_become_dead_letters_and_the_valid_rows_still_come_out(tmp_path, test_pipeline, caplog):
    records = [sr.candidate(i) for i in range(5)]
    header_cells = len(schemas.CANDIDATES.names)
    csv_path = sr.write_csv(tmp_path / 'bad.csv', [
        records[0],
        {**records[1], 'latitude': 'abc'},
        ','.join(['too', 'many'] * header_cells),
        records[2],
        'short,row',
        records[3],
    ], schemas.CANDIDATES)
    jsonl_path = sr.write_jsonl(tmp_path / 'bad.jsonl', [
        records[0],
        '{"candidate_id": "cand-001", "first_name": ',
        '',
        '["a", "JSON", "array"]',
        {**sr.candidate(1), 'latitude': 'abc', 'skills': 'not-a-list'},
        records[2],
    ])
    avro_path = sr.write_avro(tmp_path / 'bad.avro', [records[0], {**records[1], 'latitude': 'abc'}, records[2]],
                              schemas.CANDIDATES, overrides={'latitude': ['null', 'double', 'string']})
    offers = [sr.offer(0), sr.offer(1, minimum_match_score=1.5), sr.offer(2, employer_siret='73282932000075'),
              sr.offer(3, salary_min=50000.0, salary_max=40000.0), sr.offer(4)]
    offers_path = sr.write_csv(tmp_path / 'offers.csv', offers, schemas.OFFERS)
    # Everything hrbatch logs, and what anything logs at INFO and above (Beam's own DEBUG logs of
    # the runner print elements; they are off in production).
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger='transforms')
    with test_pipeline() as p:
        csv_read = p | 'CSV' >> ReadRecords(file_pattern=csv_path, schema=schemas.CANDIDATES, batch_rows=2)
        assert_that(rows_of(csv_read.records, 'csv'),
                    equal_to(expected_rows(records, [0, 2, 3], file_rows={2: 3, 3: 5})), label='csv rows')
        assert_that(csv_read.dead_letters, dead_letters_are(csv_path, {
            1: "latitude='abc': cannot be read as double",
            2: f'CSV row has {2 * header_cells} fields, expected {header_cells} (as in the header)',
            4: f'CSV row has 2 fields, expected {header_cells}',
        }), label='csv dead letters')

        jsonl_read = p | 'JSONL' >> ReadRecords(file_pattern=jsonl_path, schema=schemas.CANDIDATES)
        assert_that(rows_of(jsonl_read.records, 'jsonl'),
                    equal_to(expected_rows(records, [0, 2], file_rows={2: 5})), label='jsonl rows')
        assert_that(jsonl_read.dead_letters, dead_letters_are(jsonl_path, {
            1: 'line is not valid JSON: Expecting value',
            3: 'line is a JSON list, expected an object',
            4: "latitude='abc': cannot be read as double; skills='not-a-list': cannot be read as list<item: string>",
        }), label='jsonl dead letters')

        avro_read = p | 'Avro' >> ReadRecords(file_pattern=avro_path, schema=schemas.CANDIDATES)
        assert_that(rows_of(avro_read.records, 'avro'), equal_to(expected_rows(records, [0, 2], {2: 2})),
                    label='avro rows')
        assert_that(avro_read.dead_letters,
                    dead_letters_are(avro_path, {1: "latitude='abc': cannot be read as double"}),
                    label='avro dead letters')

        offers_read = p | 'Offers' >> ReadRecords(file_pattern=offers_path, schema=schemas.OFFERS, step='ReadOffers')
        assert_that(offers_read.records | beam.FlatMap(lambda b: b.column('offer_id').to_pylist()),
                    equal_to(['offer-000', 'offer-004']), label='offer rows')
        assert_that(offers_read.dead_letters, dead_letters_are(offers_path, {
            1: 'minimum_match_score=1.5: must be a number in [0.0, 1.0]',
            2: "employer_siret='73282932000075': must be a SIRET",
            3: 'salary_min must be <= salary_max (salary_min=50000.0, salary_max=40000.0)',
        }), label='offer dead letters')
        assert_that(offers_read.dead_letters | beam.Map(lambda letter: letter.step), equal_to(['ReadOffers'] * 3),
                    label='offer dead letter step')
    # Values go to dead letters only, never to the logs.
    for value in ('person1@example.fr', 'abc', '73282932000075', 'First1'):
        assert value not in caplog.text


def corrupt_row_group(path: str, row_group: int) -> None:
    """Overwrites the first column chunk of a row group, leaving the footer intact."""
    column = pq.ParquetFile(path).metadata.row_group(row_group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    with open(path, 'r+b') as handle:
        handle.seek(start)
        handle.write(b'\xff' * column.total_compressed_size)


def test_an_unreadable_part_of_a_file_is_one_dead_letter_and_the_rest_is_read(tmp_path, test_pipeline):
    records = [sr.candidate(i) for i in range(12)]
    parquet_path = sr.write_parquet(tmp_path / 'c.parquet', records, schemas.CANDIDATES, row_group_size=4)
    corrupt_row_group(parquet_path, 1)
    avro_path = sr.write_avro(tmp_path / 'c.avro', records, schemas.CANDIDATES, sync_interval=1)
    data = (tmp_path / 'c.avro').read_bytes()
    sync_marker = data[-16:]  # every block (here: one record each) ends with the file's sync marker
    last_block = data.rfind(sync_marker, 0, len(data) - 16) + 16
    (tmp_path / 'c.avro').write_bytes(data[:last_block + 5])  # truncated inside the last record's block
    with test_pipeline() as p:
        parquet_read = p | 'Parquet' >> ReadRecords(file_pattern=parquet_path, schema=schemas.CANDIDATES)
        assert_that(rows_of(parquet_read.records, 'parquet'),
                    equal_to(expected_rows(records, [0, 1, 2, 3, 8, 9, 10, 11])), label='parquet rows')
        assert_that(parquet_read.dead_letters, dead_letters_are(parquet_path, {
            4: f'Parquet row group 1 of {parquet_path} could not be read from row 4 on'}), label='parquet letter')
        avro_read = p | 'Avro' >> ReadRecords(file_pattern=avro_path, schema=schemas.CANDIDATES)
        assert_that(avro_read.dead_letters
                    | beam.Map(lambda letter: (letter.payload, letter.error.split(' on ')[0])),
                    equal_to([('', f'Avro file {avro_path} could not be read from row 11')]), label='avro letter')
        assert_that(rows_of(avro_read.records, 'avro'), equal_to(expected_rows(records, range(11))),
                    label='avro rows')


def test_csv_row_numbers_stay_exact_across_reader_blocks(tmp_path):
    # pyarrow parses CSV in blocks of 1 MiB (cut at a line end). Bad lines that straddle the first
    # block boundary are skipped at the end of one block and at the start of the next: the valid rows
    # after them must keep their exact line numbers. read_records is a plain function: no Beam here.
    good = [','.join(sr.csv_cell(v) for v in sr.candidate(0, candidate_id=f'row-{i:05d}').values())
            for i in range(9000)]
    header_bytes = len(','.join(schemas.CANDIDATES.names)) + 1
    line_ends = header_bytes + np.cumsum([len(line) + 1 for line in good])
    boundary = int(np.searchsorted(line_ends, 1 << 20))  # the line that crosses 1 MiB
    bad_rows = set(range(boundary - 30, boundary + 30)) | set(range(5, 9000, 97))
    lines = [line + ',extra' if i in bad_rows else line for i, line in enumerate(good)]  # 14 fields
    path = sr.write_csv(tmp_path / 'big.csv', lines, schemas.CANDIDATES)
    assert os.path.getsize(path) > (1 << 20) + 100_000  # two blocks at least
    items = list(read.read_records(read.ReadTask(path, None, 0), schema=schemas.CANDIDATES, file_format='csv',
                                   batch_rows=1000, step='S'))
    batches = [item for item in items if isinstance(item, pa.RecordBatch)]
    letters = [item for item in items if not isinstance(item, pa.RecordBatch)]
    assert max(b.num_rows for b in batches) <= 1000
    rows = pa.Table.from_batches(batches)
    assert rows.column('_row').to_pylist() == [int(c.split('-')[1]) for c in rows.column('candidate_id').to_pylist()]
    assert rows.num_rows == len(lines) - len(bad_rows)
    assert sorted(letter.source for letter in letters) == sorted(f'{path}#row={i}' for i in bad_rows)


def test_the_dofn_routes_batches_and_dead_letters(tmp_path):
    records = [sr.candidate(0), sr.candidate(1, latitude=math.nan)]
    path = sr.write_csv(tmp_path / 'c.csv', records, schemas.CANDIDATES)
    fn = read._ReadTaskFn(schema=schemas.CANDIDATES, file_format='csv', batch_rows=10, step='ReadCandidates')
    outputs = list(fn.process(read.ReadTask(path, None, 0)))
    batches = [o for o in outputs if isinstance(o, pa.RecordBatch)]
    tagged = [o for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]
    assert [b.column('candidate_id').to_pylist() for b in batches] == [['cand-000']]
    assert [(t.tag, t.value.source) for t in tagged] == [('dead_letters', f'{path}#row=1')]


def test_only_data_errors_become_read_failures():
    def failing(error):
        def items():
            yield 1
            raise error
        return items

    data_error = pa.ArrowInvalid('corrupt page')
    assert list(read._until_data_error(failing(data_error), read._ARROW_READ_ERRORS)) == [
        1, read._ReadFailure(data_error)]
    # A network failure is an OSError too, but must fail the bundle so that Beam retries it.
    with pytest.raises(requests.exceptions.ConnectionError):
        list(read._until_data_error(failing(requests.exceptions.ConnectionError('reset')), read._ARROW_READ_ERRORS))
    with pytest.raises(KeyError):  # a bug
        list(read._until_data_error(failing(KeyError('x')), read._ARROW_READ_ERRORS))


def test_metrics_count_read_and_rejected_rows(tmp_path, test_pipeline):
    path = sr.write_parquet(tmp_path / 'c.parquet', candidate_records(), schemas.CANDIDATES)
    p = test_pipeline()
    _ = p | ReadRecords(file_pattern=path, schema=schemas.CANDIDATES)
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace('hrbatch'))['counters']}
    assert counters == {'candidates_read': len(VALID_ROWS), 'candidates_rejected': len(CANDIDATE_ERRORS)}


# --- Launch-time checks -----------------------------------------------------------------------

def build_read(test_pipeline, **kwargs):
    """Applies ReadRecords to a fresh pipeline (not run): launch-time checks happen here."""
    return test_pipeline() | ReadRecords(**{'schema': schemas.CANDIDATES, **kwargs})


def test_launch_fails_when_the_pattern_matches_nothing(tmp_path, test_pipeline):
    pattern = str(tmp_path / 'missing-*.parquet')
    with pytest.raises(ConfigError, match='matches no file') as raised:
        build_read(test_pipeline, file_pattern=pattern)
    assert pattern in str(raised.value)


def test_launch_fails_on_an_empty_file(tmp_path, test_pipeline):
    sr.write_parquet(tmp_path / 'a.parquet', [sr.candidate(0)], schemas.CANDIDATES)
    (tmp_path / 'b.parquet').write_bytes(b'')
    with pytest.raises(ConfigError, match=r'b\.parquet is empty \(0 bytes\)'):
        build_read(test_pipeline, file_pattern=str(tmp_path / '*.parquet'))


def test_launch_fails_on_a_corrupt_parquet_file(tmp_path, test_pipeline):
    path = tmp_path / 'random.parquet'
    path.write_bytes(os.urandom(2048))
    with pytest.raises(ConfigError, match='is not a readable Parquet file') as raised:
        build_read(test_pipeline, file_pattern=str(path))
    assert str(path) in str(raised.value)


@pytest.mark.parametrize('file_format', ['parquet', 'csv', 'jsonl', 'avro'])
def test_launch_fails_when_a_declared_field_is_missing(tmp_path, test_pipeline, file_format):
    records = [{k: v for k, v in sr.candidate(0).items() if k not in ('skills', 'email')}]
    path = tmp_path / f'c.{file_format}'
    if file_format == 'parquet':
        arrow = pa.schema([f for f in sr.nullable_arrow_schema(schemas.CANDIDATES) if f.name in records[0]])
        sr.write_parquet(path, records, schemas.CANDIDATES, arrow_schema=arrow)
    elif file_format == 'csv':
        sr.write_csv(path, records, schemas.CANDIDATES, columns=list(records[0]))
    elif file_format == 'jsonl':
        sr.write_jsonl(path, records)
    else:
        sr.write_avro(path, records, schemas.CANDIDATES, overrides={'skills': None, 'email': None})
    with pytest.raises(ConfigError) as raised:
        build_read(test_pipeline, file_pattern=str(path))
    message = str(raised.value)
    assert str(path) in message
    assert "lacks declared fields ['email', 'skills']" in message
    assert 'Expected fields: [' in message and "'last_contact_date'" in message


def test_launch_fails_when_a_field_cannot_be_cast_to_its_declared_type(tmp_path, test_pipeline):
    arrow = sr.nullable_arrow_schema(schemas.CANDIDATES).set(schemas.CANDIDATES.names.index('latitude'), pa.field('latitude', pa.list_(pa.float64())))
    path = sr.write_parquet(tmp_path / 'c.parquet', [sr.candidate(0, latitude=[1.0])], schemas.CANDIDATES,
                            arrow_schema=arrow)
    with pytest.raises(ConfigError,
                       match=r'wrong type in its Parquet schema: latitude is list<\w+: double>, expected double'):
        build_read(test_pipeline, file_pattern=path)


@pytest.mark.parametrize('file_format', ['jsonl', 'avro'])
def test_launch_fails_when_a_record_field_has_an_uncastable_type(tmp_path, test_pipeline, file_format):
    record = sr.candidate(0, latitude=[45.0])
    path = tmp_path / f'c.{file_format}'
    if file_format == 'jsonl':
        sr.write_jsonl(path, [record])
    else:
        sr.write_avro(path, [record], schemas.CANDIDATES,
                      overrides={'latitude': {'type': 'array', 'items': 'double'}})
    with pytest.raises(ConfigError, match=r'has fields of the wrong type .*latitude is list<item: double>, '
                                          r'expected double') as raised:
        build_read(test_pipeline, file_pattern=str(path))
    assert str(path) in str(raised.value)


def test_launch_fails_when_the_format_cannot_be_inferred(tmp_path, test_pipeline):
    (tmp_path / 'candidates.txt').write_text('candidate_id\n')
    with pytest.raises(ConfigError, match='cannot infer the file format') as raised:
        build_read(test_pipeline, file_pattern=str(tmp_path / '*'))
    assert 'file_format=' in str(raised.value)


def test_launch_fails_on_a_jsonl_file_whose_first_line_is_not_an_object(tmp_path, test_pipeline):
    path = sr.write_jsonl(tmp_path / 'c.jsonl', ['', 'not json'])
    with pytest.raises(ConfigError, match='has a first line that is not JSON'):
        build_read(test_pipeline, file_pattern=path)


@pytest.mark.parametrize('kwargs, message', [
    ({'file_pattern': ''}, 'file_pattern must be a non-empty'),
    ({'file_pattern': 'x.csv', 'file_format': 'xlsx'}, "file_format must be one of"),
    ({'file_pattern': 'x.csv', 'batch_rows': 0}, 'batch_rows=0 is not allowed: batch_rows must be an integer >= 1'),
    ({'file_pattern': 'x.csv', 'batch_rows': True}, 'batch_rows must be an integer >= 1'),
    ({'file_pattern': 'x.csv', 'step': ''}, 'step must be a non-empty label'),
    ({'file_pattern': 'x.csv', 'schema': 'candidates'}, 'schema must be a transforms.schemas.RecordSchema'),
])
def test_parameters_are_checked_when_the_transform_is_created(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReadRecords(**{'schema': schemas.CANDIDATES, **kwargs})


@pytest.mark.parametrize('path, expected', [
    ('gs://b/in/part-*.parquet', 'parquet'), ('a.PQ', 'parquet'), ('x.avro', 'avro'), ('x.csv.gz', 'csv'),
    ('x.jsonl', 'jsonl'), ('x.ndjson.bz2', 'jsonl'), ('x.json', None), ('dir/*', None),
])
def test_infer_file_format(path, expected):
    assert infer_file_format(path) == expected


# --- GCS emulator -----------------------------------------------------------------------------

def test_reads_every_format_from_gcs_like_local_files(tmp_path, test_pipeline, gcs_emulator):
    records = candidate_records()
    local = {
        'parquet': sr.write_parquet(tmp_path / 'c.parquet', records, schemas.CANDIDATES, row_group_size=4),
        'csv': sr.write_csv(tmp_path / 'c.csv', records, schemas.CANDIDATES),
        'jsonl': sr.write_jsonl(tmp_path / 'c.jsonl', records),
        'avro': sr.write_avro(tmp_path / 'c.avro', records, schemas.CANDIDATES),
    }
    bucket = gcs_emulator.create_bucket('hrbatch-read')
    remote = {name: gcs_emulator.upload_file(path, f'gs://{bucket}/in/candidates.{name}')
              for name, path in local.items()}
    with pytest.raises(ConfigError, match='matches no file'):
        build_read(test_pipeline, file_pattern=f'gs://{bucket}/missing/*.parquet')
    with test_pipeline() as p:
        for name in local:
            for where, path in (('local', local[name]), ('gcs', remote[name])):
                result = p | f'{where} {name}' >> ReadRecords(file_pattern=path, schema=schemas.CANDIDATES)
                assert_that(rows_of(result.records, f'{where} {name}'), equal_to(expected_rows(records, VALID_ROWS)),
                            label=f'{where} {name}: rows')
                assert_that(result.records | f'{where} {name} sources' >> beam.FlatMap(
                    lambda batch: batch.column('_source').to_pylist()), equal_to([path] * len(VALID_ROWS)),
                    label=f'{where} {name}: source')
                assert_that(result.dead_letters, dead_letters_are(path, CANDIDATE_ERRORS),
                            label=f'{where} {name}: dead letters')

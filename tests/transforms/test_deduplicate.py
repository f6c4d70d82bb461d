import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from transforms import schemas
from transforms.deduplicate import DropDuplicateKeys
from transforms.deduplicate import FindDuplicateKeys
from transforms.deduplicate import find_duplicates
from transforms.deduplicate import key_strings
from transforms.deduplicate import stable_buckets

_SCHEMA = schemas.RecordSchema(name='people', key=('person_id',),
                               fields=(schemas.Field('person_id', pa.string()), schemas.Field('age', pa.int64())))


def _batch(rows):
    return pa.RecordBatch.from_pylist(rows, schema=_SCHEMA.arrow_schema(with_metadata=True))


def _row(pid, age, source, row):
    return {'person_id': pid, 'age': age, schemas.SOURCE_COLUMN: source, schemas.ROW_COLUMN: row}


def test_stable_buckets_are_fixed_values_and_ignore_slicing():
    keys = pa.array(['C0000001', 'C0000002', '', 'élève', 'C0000001'])
    buckets = stable_buckets(keys, 1000)
    assert buckets[0] == buckets[4] and len(set(buckets.tolist())) >= 3
    assert stable_buckets(keys.slice(1, 3), 1000).tolist() == buckets[1:4].tolist()
    spread = np.bincount(stable_buckets(pa.array([f'C{i:07d}' for i in range(6400)]), 64), minlength=64)
    assert spread.min() > 50  # sequential ids spread over every bucket


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from('abcdef'), st.sampled_from(['f1', 'f2']), st.integers(0, 50)),
                     max_size=40, unique_by=lambda r: (r[1], r[2])))
def test_find_duplicates_keeps_the_smallest_location_of_each_key(rows):
    table = pa.table({'_key': [r[0] for r in rows], schemas.SOURCE_COLUMN: [r[1] for r in rows],
                      schemas.ROW_COLUMN: pa.array([r[2] for r in rows], pa.int64())})
    losers = find_duplicates(table).to_pylist()
    first = {}
    for key, source, row in sorted(rows):
        first.setdefault(key, (source, row))
    expected = sorted((k, s, r, *first[k]) for k, s, r in rows if (s, r) != first[k])
    assert sorted((x['_key'], x['_source'], x['_row'], x['winner_source'], x['winner_row']) for x in losers) == expected


def test_composite_keys_are_joined_unambiguously():
    batch = pa.RecordBatch.from_pylist([{'a': 'x', 'b': 'yz'}, {'a': 'xy', 'b': 'z'}])
    assert key_strings(batch, ('a', 'b')).to_pylist() == ['x\x1fyz', 'xy\x1fz']


@pytest.mark.parametrize('use_reference', [False, True])
def test_drop_duplicate_keys_in_a_pipeline(test_pipeline, use_reference):
    first = _batch([_row('p1', 30, 'a.csv', 0), _row('p2', 40, 'a.csv', 1), _row('p1', 31, 'a.csv', 2)])
    second = _batch([_row('p3', 50, 'b.csv', 0), _row('p2', 41, 'b.csv', 1), _row('p1', 32, 'b.csv', 2)])
    with test_pipeline() as p:
        records = p | 'Records' >> beam.Create([second, first])
        reference = p | 'Reference' >> beam.Create([first, second]) if use_reference else None
        result = records | DropDuplicateKeys(schema=_SCHEMA, reference=reference, buckets=4, step='Dedup')
        kept = result.records | beam.FlatMap(lambda b: [(r['person_id'], r['age']) for r in b.to_pylist()])
        letters = result.dead_letters | beam.Map(lambda d: (d.step, d.source, d.error, json.loads(d.payload)['age']))
        assert_that(kept, equal_to([('p1', 30), ('p2', 40), ('p3', 50)]), label='first_occurrences')
        assert_that(letters, equal_to([
            ('Dedup', 'a.csv#row=2', "duplicate key person_id='p1': the first occurrence, at a.csv#row=0, is kept", 31),
            ('Dedup', 'b.csv#row=1', "duplicate key person_id='p2': the first occurrence, at a.csv#row=1, is kept", 41),
            ('Dedup', 'b.csv#row=2', "duplicate key person_id='p1': the first occurrence, at a.csv#row=0, is kept", 32),
        ]), label='duplicates')


def test_find_duplicate_keys_through_spilled_files_finds_the_same_and_removes_them(test_pipeline, tmp_path):
    first = _batch([_row('p1', 30, 'a.csv', 0), _row('p2', 40, 'a.csv', 1), _row('p1', 31, 'a.csv', 2)])
    second = _batch([_row('p3', 50, 'b.csv', 0), _row('p2', 41, 'b.csv', 1), _row('p1', 32, 'b.csv', 2)])
    spill = tmp_path / 'spill'
    found = {}
    for name, spill_dir in (('shuffled', None), ('spilled', str(spill))):
        result = tmp_path / f'{name}.json'
        with test_pipeline() as p:
            losers = (p | beam.Create([second, first])
                      | FindDuplicateKeys(key=_SCHEMA.key, buckets=4, spill_dir=spill_dir))
            (losers | beam.FlatMap(lambda b: b.to_pylist()) | beam.combiners.ToList()
             | beam.Map(lambda rows, path=result: path.write_text(json.dumps(sorted(
                 (r['_key'], r[schemas.SOURCE_COLUMN], r[schemas.ROW_COLUMN], r['winner_source'], r['winner_row'])
                 for r in rows)))))
        found[name] = json.loads(result.read_text())
    assert found['spilled'] == found['shuffled'] == [
        ['p1', 'a.csv', 2, 'a.csv', 0], ['p1', 'b.csv', 2, 'a.csv', 0], ['p2', 'b.csv', 1, 'a.csv', 1]]
    assert not spill.exists()

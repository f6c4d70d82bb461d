import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from transforms import schemas
from transforms.batching import BatchBySize
from transforms.batching import rebatch
from transforms.batching import row_nbytes

_ROW = st.fixed_dictionaries({
    'id': st.integers(min_value=0, max_value=2**40),
    'name': st.one_of(st.none(), st.text(max_size=30)),
    'skills': st.lists(st.text(max_size=12), max_size=6),
    'score': st.floats(allow_nan=False, width=32),
})
_SCHEMA = pa.schema([('id', pa.int64()), ('name', pa.string()), ('skills', pa.list_(pa.string())),
                     ('score', pa.float32())])


def _batches(rows, cuts):
    """Split ``rows`` into RecordBatches at the (sorted, deduplicated) cut points."""
    bounds = [0, *sorted({c % (len(rows) + 1) for c in cuts}), len(rows)]
    return [pa.RecordBatch.from_pylist(rows[a:b], schema=_SCHEMA) for a, b in zip(bounds, bounds[1:]) if b > a]


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(_ROW, max_size=60), cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8),
       max_rows=st.integers(min_value=1, max_value=20), max_bytes=st.integers(min_value=1, max_value=400))
def test_batches_never_exceed_either_bound_and_concatenate_back(rows, cuts, max_rows, max_bytes):
    out = list(rebatch(_batches(rows, cuts), max_rows=max_rows, max_bytes=max_bytes))
    for kind, batch in out:
        if kind == 'batch':
            assert 1 <= batch.num_rows <= max_rows
            assert int(row_nbytes(batch).sum()) <= max_bytes
        else:
            assert kind == 'oversize'
            assert batch.num_rows == 1 and int(row_nbytes(batch)[0]) > max_bytes
    # Every row comes out exactly once, in order: batches and oversize rows together are the input.
    assert [r for _, b in out for r in b.to_pylist()] == rows


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(_ROW, min_size=1, max_size=60), cuts=st.lists(st.integers(0, 60), max_size=8))
def test_row_size_does_not_depend_on_slicing(rows, cuts):
    whole = pa.RecordBatch.from_pylist(rows, schema=_SCHEMA)
    sliced = [int(x) for b in _batches(rows, cuts) for x in row_nbytes(b)]
    assert sliced == [int(x) for x in row_nbytes(whole)]


def test_row_size_counts_values_and_offsets():
    batch = pa.RecordBatch.from_pylist([{'id': 1, 'name': 'abc', 'skills': ['xy', 'z'], 'score': 1.0}],
                                       schema=_SCHEMA)
    # id 8 + name (4 offset + 3) + skills (4 offset + (4 + 2) + (4 + 1)) + score 4
    assert int(row_nbytes(batch)[0]) == 8 + 7 + 15 + 4


def test_batch_by_size_in_a_pipeline_bounds_batches_and_dead_letters_oversize_rows(test_pipeline):
    rows = [{'id': i, 'name': 'x' * (500 if i == 7 else 3), 'skills': [], 'score': 0.5} for i in range(50)]
    rows = [{**r, schemas.SOURCE_COLUMN: 'in.parquet', schemas.ROW_COLUMN: r['id']} for r in rows]
    schema = _SCHEMA.append(pa.field(schemas.SOURCE_COLUMN, pa.string())).append(
        pa.field(schemas.ROW_COLUMN, pa.int64()))
    inputs = [pa.RecordBatch.from_pylist(rows[a:a + 13], schema=schema) for a in range(0, 50, 13)]
    with test_pipeline() as p:
        result = p | beam.Create(inputs) | BatchBySize(max_rows=8, max_bytes=400, step='Batch')
        sizes = result.batches | 'Sizes' >> beam.Map(lambda b: (b.num_rows <= 8, int(row_nbytes(b).sum()) <= 400))
        ids = result.batches | 'Ids' >> beam.FlatMap(lambda b: b.column('id').to_pylist())
        letters = result.dead_letters | 'Letters' >> beam.Map(lambda d: (d.step, d.source, d.error))
        assert_that(sizes | beam.Distinct(), equal_to([(True, True)]), label='bounded')
        assert_that(ids, equal_to([i for i in range(50) if i != 7]), label='all_other_rows')
        assert_that(letters, equal_to([('Batch', 'in.parquet#row=7', f'row of {8 + 504 + 4 + 4 + 14 + 8} bytes exceeds max_bytes=400')]),
                    label='oversize')


@pytest.mark.parametrize('kwargs', [{'max_rows': 0}, {'max_rows': 10, 'max_bytes': 0}, {'max_rows': 2.5}])
def test_batch_by_size_rejects_bad_bounds(kwargs):
    with pytest.raises(ValueError, match='must be an integer >= 1'):
        BatchBySize(**kwargs)

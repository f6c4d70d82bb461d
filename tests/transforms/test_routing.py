"""Grouping every record of a key into its bucket, through the shuffle or through spilled Arrow files."""
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import make_test_pipeline
from transforms import routing
from transforms.schemas import Field
from transforms.schemas import RecordSchema

PEOPLE = RecordSchema(name='people', key=('employee_id',), fields=(
    Field('employee_id', pa.string()), Field('hours', pa.float64(), min_value=0)))
PAY = RecordSchema(name='pay', key=('employee_id', 'item'), fields=(
    Field('employee_id', pa.string()), Field('item', pa.string()), Field('amount', pa.int64())))


def _inputs(tmp_path):
    people = [{'employee_id': f'E{i}', 'hours': -1.0 if i == 7 else float(i)} for i in range(40)]
    pay = [{'employee_id': f'E{i}', 'item': item, 'amount': i * 10 + n}
           for i in range(0, 40, 2) for n, item in enumerate(('base', 'bonus'))]
    pq.write_table(pa.Table.from_pylist(people, schema=PEOPLE.arrow_schema()), tmp_path / 'people.parquet')
    pq.write_table(pa.Table.from_pylist(pay, schema=PAY.arrow_schema()), tmp_path / 'pay.parquet')
    return {'people': (str(tmp_path / 'people.parquet'), PEOPLE), 'pay': (str(tmp_path / 'pay.parquet'), PAY)}


def _bucket_contents(element):
    """(bucket, {input: sorted rows}, blocked, how many pieces came through files) of one group."""
    bucket, items = element
    records, blocked = routing.split_blocked(items)
    tables = routing.tagged_tables(records, {'people': PEOPLE, 'pay': PAY})
    spilled = sum(isinstance(piece, routing.SpilledPiece) for _, piece in records)
    return (bucket, {name: sorted(map(json.dumps, table.to_pylist())) for name, table in tables.items()}, blocked,
            [spilled, len(records)])


def _grouped(tmp_path, spill_dir):
    result = tmp_path / 'groups.json'
    with make_test_pipeline() as pipeline:
        read = pipeline | routing.ReadGroupedByKey(inputs=_inputs(tmp_path), key='employee_id', buckets=4,
                                                   batch_rows=7, spill_dir=spill_dir)
        contents = read['grouped'] | beam.Map(_bucket_contents)
        if spill_dir:
            contents | routing.RemoveWhenDone(spill_dir)
        contents | beam.combiners.ToList() | beam.Map(lambda groups: result.write_text(json.dumps(groups)))
    return sorted(json.loads(result.read_text()), key=lambda group: group[0])


def test_spilled_groups_equal_shuffled_groups_and_the_spill_is_removed(tmp_path):
    spill = tmp_path / 'spill'
    shuffled, spilled = _grouped(tmp_path, None), _grouped(tmp_path, str(spill))
    assert [group[:3] for group in spilled] == [group[:3] for group in shuffled]
    assert all(through_files == 0 for _, _, _, (through_files, _) in shuffled)
    assert all(through_files == pieces > 0 for _, _, _, (through_files, pieces) in spilled)
    assert not spill.exists()
    # Every record is in the bucket of its key, once; the rejected one (negative hours) blocks its key.
    people = [json.loads(row) for _, tables, _, _ in shuffled for row in tables['people']]
    assert sorted(p['employee_id'] for p in people) == sorted(f'E{i}' for i in range(40) if i != 7)
    for bucket, tables, blocked, _ in shuffled:
        keys = {json.loads(row)['employee_id'] for rows in tables.values() for row in rows} | set(blocked)
        assert {routing.bucket_of(key, 4) for key in keys} == {bucket}
    assert [key for _, _, blocked, _ in shuffled for key in blocked] == ['E7']


def test_a_spilled_piece_reads_only_its_own_bucket(tmp_path):
    fn = routing.SplitByKeyBucket('people', 'employee_id', 3, spill_dir=str(tmp_path))
    batch = pa.RecordBatch.from_pylist([{'employee_id': f'E{i}', 'hours': float(i)} for i in range(30)])
    pieces = list(fn.process(batch))
    assert len(list(tmp_path.iterdir())) == 1, 'one file per input batch, one record batch per bucket in it'
    for bucket, (name, piece) in pieces:
        rows = piece.load().to_pylist()
        assert name == 'people' and rows and {routing.bucket_of(r['employee_id'], 3) for r in rows} == {bucket}
    assert sum(piece.load().num_rows for _, (_, piece) in pieces) == 30

"""Duplicate business keys: keep the first occurrence, dead-letter the others.

"First" is by record location: the smallest ``(_source, _row)`` (file path, then row number), so the
choice does not depend on the runner, the bundle split or the order of workers. The search is columnar
and distributed: each batch's keys are split into ``buckets`` by a stable hash of their bytes, each
bucket is grouped and sorted once, and only the losing locations (normally none or few) travel to
the step that drops them, as a side input.

For data too big to hold twice, pass the keys from a second read of the same files as ``reference``
(the matching pipeline does): the records themselves then stream through without being buffered.
"""

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from transforms import arrow_coder  # noqa: F401  (registers the RecordBatch coder)
from transforms import schemas
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.dead_letters import DeadLetter
from transforms.dead_letters import locator
from transforms.params import check_positive_int

_KEY = '_key'
# Fixed odd multipliers, one per byte position modulo their count: a stable, vectorised hash.
_HASH_MULTIPLIERS = np.random.default_rng(20261203).integers(1, 2**31, size=61, dtype=np.uint64) | np.uint64(1)


def key_strings(batch: pa.RecordBatch, key: tuple[str, ...]) -> pa.Array:
    """The business key of each row as one string (composite keys joined by U+001F)."""
    if len(key) == 1:
        return batch.column(key[0]).cast(pa.string())
    parts = [batch.column(k).cast(pa.string()) for k in key]
    return pc.binary_join_element_wise(*parts, '\x1f')


def stable_buckets(keys: pa.Array, buckets: int) -> np.ndarray:
    """Bucket of each key from a hash of its UTF-8 bytes: the same on every machine and run."""
    keys = pc.fill_null(keys, '')
    if keys.offset:
        keys = pa.concat_arrays([keys])  # re-base a slice so its buffers start at row 0
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int32, count=len(keys) + 1)
    data = np.frombuffer(keys.buffers()[2], dtype=np.uint8, count=int(offsets[-1])) if offsets[-1] else \
        np.zeros(0, dtype=np.uint8)
    lengths = np.diff(offsets)
    owners = np.repeat(np.arange(len(keys)), lengths)
    positions = np.arange(len(data)) - offsets[:-1][owners]
    weighted = (data.astype(np.uint64) + np.uint64(1)) * _HASH_MULTIPLIERS[positions % len(_HASH_MULTIPLIERS)]
    hashes = np.bincount(owners, weights=(weighted % np.uint64(2**31)).astype(np.float64), minlength=len(keys))
    return (hashes.astype(np.int64) % buckets).astype(np.int64)


def _key_locations(batch: pa.RecordBatch, key: tuple[str, ...]) -> pa.RecordBatch:
    # Every key crosses a shuffle and waits there until all are in: the file path, the same for
    # thousands of rows, travels dictionary-encoded (4 bytes a row) and is decoded per bucket.
    return pa.RecordBatch.from_arrays(
        [key_strings(batch, key), pc.dictionary_encode(batch.column(schemas.SOURCE_COLUMN)),
         batch.column(schemas.ROW_COLUMN)],
        names=[_KEY, schemas.SOURCE_COLUMN, schemas.ROW_COLUMN])


def find_duplicates(locations: pa.Table) -> pa.RecordBatch:
    """Rows of ``locations`` (key, _source, _row) that are not the first of their key.

    Returns the losers with the winner's location in ``winner_source`` / ``winner_row``.
    """
    source = locations.schema.get_field_index(schemas.SOURCE_COLUMN)
    if pa.types.is_dictionary(locations.schema.field(source).type):  # multi-key sorts need plain strings
        locations = locations.set_column(source, schemas.SOURCE_COLUMN,
                                         pc.cast(locations.column(source), pa.string()))
    ordered = locations.sort_by([(_KEY, 'ascending'), (schemas.SOURCE_COLUMN, 'ascending'),
                                 (schemas.ROW_COLUMN, 'ascending')]).combine_chunks()
    keys = ordered.column(_KEY).to_numpy(zero_copy_only=False)
    n = len(keys)
    is_first = np.r_[True, keys[1:] != keys[:-1]] if n else np.zeros(0, dtype=bool)
    winner = np.maximum.accumulate(np.where(is_first, np.arange(n), 0)) if n else np.zeros(0, dtype=np.int64)
    losers = np.flatnonzero(~is_first)
    out = ordered.take(pa.array(losers))
    return pa.RecordBatch.from_arrays(
        [out.column(_KEY).combine_chunks(), out.column(schemas.SOURCE_COLUMN).combine_chunks(),
         out.column(schemas.ROW_COLUMN).combine_chunks(),
         ordered.column(schemas.SOURCE_COLUMN).take(pa.array(winner[losers])).combine_chunks(),
         ordered.column(schemas.ROW_COLUMN).take(pa.array(winner[losers])).combine_chunks()],
        names=[_KEY, schemas.SOURCE_COLUMN, schemas.ROW_COLUMN, 'winner_source', 'winner_row'])


def _losers_of_bucket(element) -> pa.RecordBatch:
    from transforms import routing  # routing builds on this module's stable_buckets
    _, parts = element
    return find_duplicates(pa.Table.from_batches(routing.load_pieces(parts)))


class Losers:
    """The locations to drop (not the first of their key), by source file, with each one's winner.

    Built from the output of ``find_duplicates``; ``drop`` applies it to a batch.
    """

    def __init__(self, losers: list[pa.RecordBatch]):
        by_source: dict[str, tuple[list[int], dict[int, tuple[str, int]]]] = {}
        rows = [r for batch in losers for r in batch.to_pylist()]
        for row in rows:
            entry = by_source.setdefault(row[schemas.SOURCE_COLUMN], ([], {}))
            entry[0].append(row[schemas.ROW_COLUMN])
            entry[1][row[schemas.ROW_COLUMN]] = (row['winner_source'], row['winner_row'])
        self.by_source = {s: (np.array(sorted(r), dtype=np.int64), w) for s, (r, w) in by_source.items()}
        self.size = len(rows)

    def drop(self, batch: pa.RecordBatch, schema: schemas.RecordSchema, step: str
             ) -> tuple[pa.RecordBatch, list[DeadLetter]]:
        """``batch`` without the losing rows, and a dead letter for each of them."""
        if not self.size:
            return batch, []
        sources = batch.column(schemas.SOURCE_COLUMN)
        rows = batch.column(schemas.ROW_COLUMN).to_numpy()
        drop = np.zeros(batch.num_rows, dtype=bool)
        for source in pc.unique(sources).to_pylist():
            if source in self.by_source:
                in_source = pc.equal(sources, source).to_numpy(zero_copy_only=False)
                drop |= in_source & np.isin(rows, self.by_source[source][0])
        if not drop.any():
            return batch, []
        letters = [self._letter(batch.slice(int(i), 1), schema, step) for i in np.flatnonzero(drop)]
        return batch.filter(pa.array(~drop)), letters

    def _letter(self, row_batch: pa.RecordBatch, schema: schemas.RecordSchema, step: str) -> DeadLetter:
        row = row_batch.to_pylist()[0]
        source, number = row.pop(schemas.SOURCE_COLUMN), row.pop(schemas.ROW_COLUMN)
        winner = locator(*self.by_source[source][1][number])
        key = ', '.join(f'{k}={row[k]!r}' for k in schema.key)
        return DeadLetter(step=step, error=f'duplicate key {key}: the first occurrence, at {winner}, is kept',
                          payload=schemas.row_to_json(row), source=locator(source, number))


class _DropLosersFn(beam.DoFn):

    def __init__(self, schema: schemas.RecordSchema, step: str):
        self._schema = schema
        self._step = step
        self._dropped = Metrics.counter(METRICS_NAMESPACE, f'{schema.name}_duplicates')
        self._losers = None
        self._losers_of = None

    def process(self, batch: pa.RecordBatch, losers):
        if self._losers_of is not losers:
            self._losers, self._losers_of = Losers(losers), losers
        kept, letters = self._losers.drop(batch, self._schema, self._step)
        for letter in letters:
            yield beam.pvalue.TaggedOutput(DropDuplicateKeys.DEAD_LETTERS, letter)
        self._dropped.inc(len(letters))
        yield kept


class FindDuplicateKeys(beam.PTransform):
    """RecordBatches (with ``_source``/``_row``) -> the locations that are not the first of their key.

    Output: RecordBatches as returned by ``find_duplicates``, none when there is no duplicate; pass
    them as a list side input to ``Losers``.

    ``spill_dir``: if given, the key locations go through Arrow files there and only references to
    them are grouped (``transforms.routing``): the shuffle no longer holds every key of the input.
    The directory is removed once the duplicates are found.
    """

    def __init__(self, *, key: tuple[str, ...], buckets: int = 64, spill_dir: str | None = None):
        super().__init__()
        check_positive_int('buckets', buckets)
        self._key = key
        self._buckets = buckets
        self._spill_dir = spill_dir

    def expand(self, records):
        from transforms import routing  # routing builds on this module's stable_buckets
        losers = (
            records
            | 'KeyLocations' >> beam.Map(_key_locations, self._key)
            | 'SplitByBucket' >> beam.ParDo(routing.SplitByKeyBucket(
                'locations', _KEY, self._buckets, spill_dir=self._spill_dir))
            | 'GroupBuckets' >> beam.GroupByKey()
            | 'FindDuplicates' >> beam.Map(_losers_of_bucket).with_output_types(pa.RecordBatch))
        if self._spill_dir is not None:
            losers | 'RemoveSpill' >> routing.RemoveWhenDone(self._spill_dir)
        return losers | 'KeepNonEmpty' >> beam.Filter(lambda batch: batch.num_rows > 0)


class DropDuplicateKeys(beam.PTransform):
    """Keeps the first record of each business key; the others go to ``.dead_letters``.

    Input: RecordBatches with the schema's key columns and ``_source``/``_row``. Returns an object with
    ``.records`` (the batches without duplicates) and ``.dead_letters``. ``reference``, when given, is
    the same records read a second time, used to find the duplicates so ``records`` is not buffered.
    """
    DEAD_LETTERS = 'dead_letters'

    def __init__(self, *, schema: schemas.RecordSchema, reference=None, buckets: int = 64,
                 step: str = 'DropDuplicateKeys'):
        super().__init__()
        check_positive_int('buckets', buckets)
        self._schema = schema
        self._reference = reference
        self._buckets = buckets
        self._step = step

    def expand(self, records):
        reference = records if self._reference is None else self._reference
        losers = reference | 'FindDuplicateKeys' >> FindDuplicateKeys(key=self._schema.key, buckets=self._buckets)
        return records | 'DropLosers' >> beam.ParDo(
            _DropLosersFn(self._schema, self._step), losers=beam.pvalue.AsList(losers)
        ).with_output_types(pa.RecordBatch).with_outputs(self.DEAD_LETTERS, main='records')

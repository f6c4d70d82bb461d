"""Bounded-size batching of columnar data.

``BatchBySize`` regroups a PCollection of Arrow RecordBatches of any sizes into batches that never hold
more than ``max_rows`` rows nor more than ``max_bytes`` bytes, so every later step (a scoring matrix, a
database transaction, a file) has a bounded cost. Rows keep their order within a bundle; the
concatenation of the output batches is the input.

"Bytes" is the Arrow data size of the rows: for each row, the value bytes of fixed-width columns plus,
for strings and lists, the 4-byte offset and the value bytes (recursively). It is a property of the
rows alone, so it is the same whatever the slicing of the parent buffers. A single row larger than
``max_bytes`` cannot be placed in any batch: it goes to the dead-letter output, never silently dropped.
"""
from collections.abc import Iterable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.transforms import window

from transforms import arrow_coder  # noqa: F401  (registers the RecordBatch coder)
from transforms import schemas
from transforms.dead_letters import DeadLetter
from transforms.dead_letters import locator
from transforms.params import check_positive_int

_OFFSET_BYTES = 4


def _array_row_bytes(array: pa.Array) -> np.ndarray:
    """Per-row data size of one column, as int64 (see the module docstring)."""
    n = len(array)
    kind = array.type
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(kind):
        return np.full(n, kind.index_type.bit_width // 8, dtype=np.int64)
    if pa.types.is_boolean(kind) or pa.types.is_null(kind):
        return np.zeros(n, dtype=np.int64)  # one bit a row: below a byte, not worth counting
    if pa.types.is_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_string(kind) \
            or pa.types.is_large_binary(kind):
        lengths = pc.fill_null(pc.binary_length(array), 0).to_numpy(zero_copy_only=False)
        return lengths.astype(np.int64) + _OFFSET_BYTES
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        # Sum the children's sizes per parent row; list_parent_indices is relative to the slice.
        flat = pc.list_flatten(array)
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        child = _array_row_bytes(flat)
        return np.bincount(parents, weights=child, minlength=n).astype(np.int64) + _OFFSET_BYTES
    if pa.types.is_struct(kind):
        total = np.zeros(n, dtype=np.int64)
        for i in range(kind.num_fields):
            total += _array_row_bytes(array.field(i))
        return total
    return np.full(n, kind.bit_width // 8, dtype=np.int64)


def row_nbytes(batch: pa.RecordBatch) -> np.ndarray:
    """Per-row data size of a batch: int64 array of ``batch.num_rows`` values."""
    total = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        total += _array_row_bytes(column)
    return total


def _fitting_rows(costs: np.ndarray, start: int, room_rows: int, room_bytes: int) -> int:
    """How many rows from ``start`` fit in the room left (0 if the first one does not)."""
    window_costs = costs[start:start + room_rows]
    return int(np.searchsorted(np.cumsum(window_costs), room_bytes, side='right'))


class Rebatcher:
    """Streaming core of ``BatchBySize``: feed batches in, get bounded batches out.

    ``add`` yields ``('batch', RecordBatch)`` for each full batch and ``('oversize', RecordBatch)`` for
    a single row bigger than ``max_bytes``; ``flush`` yields what is pending.
    """

    def __init__(self, *, max_rows: int, max_bytes: int):
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0
        self._bytes = 0

    def add(self, batch: pa.RecordBatch) -> Iterator[tuple[str, pa.RecordBatch]]:
        costs = row_nbytes(batch)
        start = 0
        while start < batch.num_rows:
            take = _fitting_rows(costs, start, self.max_rows - self._rows, self.max_bytes - self._bytes)
            if take == 0:
                if self._rows == 0:
                    yield 'oversize', batch.slice(start, 1)
                    start += 1
                else:
                    yield from self.flush()
                continue
            self._pending.append(batch.slice(start, take))
            self._rows += take
            self._bytes += int(costs[start:start + take].sum())
            start += take
            if self._rows == self.max_rows:
                yield from self.flush()

    def flush(self) -> Iterator[tuple[str, pa.RecordBatch]]:
        if self._rows:
            pending = self._pending
            batch = pending[0] if len(pending) == 1 else pa.concat_batches(pending)
            self._pending, self._rows, self._bytes = [], 0, 0
            yield 'batch', batch


def rebatch(batches: Iterable[pa.RecordBatch], *, max_rows: int, max_bytes: int
            ) -> Iterator[tuple[str, pa.RecordBatch]]:
    """Pure-Python form of ``BatchBySize`` over an iterable (same outputs, same order)."""
    rebatcher = Rebatcher(max_rows=max_rows, max_bytes=max_bytes)
    for batch in batches:
        yield from rebatcher.add(batch)
    yield from rebatcher.flush()


def oversize_letter(row: pa.RecordBatch, step: str, max_bytes: int) -> DeadLetter:
    values = row.to_pylist()[0]
    source = ''
    if schemas.SOURCE_COLUMN in values and schemas.ROW_COLUMN in values:
        source = locator(values.pop(schemas.SOURCE_COLUMN), values.pop(schemas.ROW_COLUMN))
    size = int(row_nbytes(row)[0])
    return DeadLetter(step=step, error=f'row of {size} bytes exceeds max_bytes={max_bytes}',
                      payload=schemas.row_to_json(values), source=source)


class _BatchBySizeFn(beam.DoFn):

    def __init__(self, max_rows: int, max_bytes: int, step: str):
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._step = step
        self._rebatcher = None

    def start_bundle(self):
        self._rebatcher = Rebatcher(max_rows=self._max_rows, max_bytes=self._max_bytes)

    def _emit(self, outputs, wrap):
        for kind, batch in outputs:
            if kind == 'batch':
                yield wrap(batch)
            else:
                yield beam.pvalue.TaggedOutput(
                    BatchBySize.DEAD_LETTERS, wrap(oversize_letter(batch, self._step, self._max_bytes)))

    def process(self, batch: pa.RecordBatch):
        yield from self._emit(self._rebatcher.add(batch), lambda value: value)

    def finish_bundle(self):
        # Rows pending at the end of a bundle are emitted in the global window, like BatchElements.
        yield from self._emit(self._rebatcher.flush(), window.GlobalWindows.windowed_value_at_end_of_window)
        self._rebatcher = None


class BatchBySize(beam.PTransform):
    """Regroups RecordBatches into batches of at most ``max_rows`` rows and ``max_bytes`` bytes.

    Returns the batches as the main output and rows too big for any batch as ``.dead_letters``.
    Works in the global window (batch pipelines).
    """
    DEAD_LETTERS = 'dead_letters'

    def __init__(self, *, max_rows: int, max_bytes: int = 64 << 20, step: str = 'BatchBySize'):
        super().__init__()
        check_positive_int('max_rows', max_rows)
        check_positive_int('max_bytes', max_bytes)
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._step = step

    def expand(self, batches):
        return batches | 'Rebatch' >> beam.ParDo(
            _BatchBySizeFn(self._max_rows, self._max_bytes, self._step)
        ).with_output_types(pa.RecordBatch).with_outputs(self.DEAD_LETTERS, main='batches')

"""Route every record of one key (an employee) to one hash bucket, so a bucket can be joined whole.

``SplitByKeyBucket`` splits each Arrow batch of one input by the bucket of its key and tags the
pieces with the input's name: after a ``GroupByKey`` on the bucket, one call sees every record of
its keys from every input. The bucket is ``deduplicate.stable_buckets`` of the key (vectorised,
the same on every machine and run), so the step that computes bucket ``b`` can write it as Parquet
partition ``keyed_write.bucket_dir(key, b)`` directly (``keyed_write.WritePartitions``), with no
second shuffle.
"""
import dataclasses
import json
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.dead_letters import METRICS_NAMESPACE
from transforms.deduplicate import stable_buckets
from transforms.keyed_write import remove_temp_dir
from transforms.read import ReadRecords


class SplitByKeyBucket(beam.DoFn):
    """(bucket, (name, the batch's rows of that bucket)) for each bucket present in the batch.

    ``columns``: the columns to keep (default: all). Dropping what the join does not use, such as
    the readers' per-row ``_source`` path, keeps the shuffle small: on the DirectRunner it is held
    in memory whole.

    With ``spill_dir``, the pieces go to one Arrow IPC file per batch in that directory (one record
    batch per bucket) and only their references (``SpilledPiece``) are grouped: the shuffle then
    holds a few bytes per piece instead of the rows, so memory no longer grows with the input.
    """

    def __init__(self, name: str, key: str, buckets: int, columns: tuple[str, ...] | None = None,
                 spill_dir: str | None = None):
        self._name, self._key, self._buckets, self._columns = name, key, buckets, columns
        self._spill_dir = spill_dir

    def process(self, batch: pa.RecordBatch):
        if not batch.num_rows:
            return
        if self._columns is not None:
            batch = batch.select(list(self._columns))
        buckets = stable_buckets(batch.column(self._key), self._buckets)
        order = np.argsort(buckets, kind='stable')
        bounds = np.searchsorted(buckets[order], np.arange(self._buckets + 1))
        present = np.flatnonzero(np.diff(bounds))
        ordered = batch.take(pa.array(order))
        if self._spill_dir is None:
            for bucket in present:
                yield int(bucket), (self._name, ordered.slice(bounds[bucket], bounds[bucket + 1] - bounds[bucket]))
            return
        # A retried bundle writes a new file: only the references it emits are ever read.
        path = FileSystems.join(self._spill_dir, f'{self._name}-{uuid.uuid4().hex}.arrow')
        with FileSystems.create(path) as stream, pa.ipc.new_file(stream, ordered.schema) as writer:
            for index, bucket in enumerate(present):
                writer.write_batch(ordered.slice(bounds[bucket], bounds[bucket + 1] - bounds[bucket]))
                yield int(bucket), (self._name, SpilledPiece(path, index))


@dataclasses.dataclass(frozen=True)
class SpilledPiece:
    """Record batch ``index`` of the Arrow IPC file at ``path``, written by ``SplitByKeyBucket``."""
    path: str
    index: int

    def load(self) -> pa.RecordBatch:
        # Random access: only the footer and this batch are read, not the other buckets' batches.
        with FileSystems.open(self.path, compression_type='uncompressed') as stream:
            return pa.ipc.open_file(pa.PythonFile(stream, mode='r')).get_batch(self.index)


def bucket_of(key: str, buckets: int) -> int:
    """The bucket ``SplitByKeyBucket`` routes ``key`` to."""
    return int(stable_buckets(pa.array([key], pa.string()), buckets)[0])


def load_pieces(items) -> list[pa.RecordBatch]:
    """The batches of grouped ``(name, piece)`` items, read back from their files when spilled."""
    return [piece.load() if isinstance(piece, SpilledPiece) else piece for _, piece in items]


def tagged_tables(items, schemas_by_name: dict) -> dict:
    """The grouped ``(name, batch)`` pieces of one bucket as one table per input name (empty tables
    for inputs with no piece), each in its schema's columns."""
    parts = {name: [] for name in schemas_by_name}
    for name, batch in zip((name for name, _ in items), load_pieces(items)):
        parts[name].append(batch)
    tables = {}
    for name, schema in schemas_by_name.items():
        target = schema.arrow_schema()
        tables[name] = pa.Table.from_batches([b.select(target.names).cast(target) for b in parts[name]],
                                             schema=target)
    return tables


BLOCKED = 'blocked'


def route_rejection(letter, buckets: int) -> list:
    """A record rejected when read, routed to its employee's bucket as ``(BLOCKED, (employee_id,
    reason))``: the step that joins the bucket must not act on that employee without the record.
    The reason names the step only: the read error quotes the rejected value, which may be a NIR."""
    try:
        employee_id = json.loads(letter.payload).get('employee_id')
    except (ValueError, AttributeError):
        employee_id = None
    if not isinstance(employee_id, str) or not employee_id:
        Metrics.counter(METRICS_NAMESPACE, 'rejected_records_without_employee').inc()
        return []
    reason = f'one of its records was rejected at {letter.step} (see that dead letter)'
    return [(bucket_of(employee_id, buckets), (BLOCKED, (employee_id, reason)))]


def split_blocked(items) -> tuple[list, dict]:
    """The grouped items of one bucket without the rejections, and employee id -> reason."""
    blocked, rest = {}, []
    for name, value in items:
        if name == BLOCKED:
            blocked.setdefault(*value)
        else:
            rest.append((name, value))
    return rest, blocked


class ReadGroupedByKey(beam.PTransform):
    """Reads several inputs and groups every record of each key (employee) into its bucket.

    ``inputs``: name -> (file pattern, ``RecordSchema``); ``None`` patterns are skipped.
    ``keep(name, batch)``, if given, keeps the rows of a read batch that matter (e.g. one month's).
    ``batch_rows``: rows per read batch; large batches make fewer, larger pieces to group.
    ``spill_dir``: if given, the rows go through Arrow files there and only references to them are
    grouped (see ``SplitByKeyBucket``), so memory stays flat in the input size; remove the directory
    with ``RemoveWhenDone`` applied to an output of the step that reads the groups.
    Returns ``{'grouped': (bucket, [(name, batch) or (BLOCKED, (key, reason)), ...]),
    'rejected': the readers' dead letters}``: a record rejected when read blocks its key (see
    ``route_rejection``; ``split_blocked`` separates them again).
    """

    def __init__(self, *, inputs: dict, key: str, buckets: int, keep=None, batch_rows: int = 65_536,
                 spill_dir: str | None = None):
        super().__init__()
        self._inputs, self._key, self._buckets, self._keep = inputs, key, buckets, keep
        self._batch_rows, self._spill_dir = batch_rows, spill_dir

    def expand(self, pbegin):
        routed, rejected, keep = [], [], self._keep
        for name, (pattern, schema) in self._inputs.items():
            if pattern is None:
                continue
            label = ''.join(part.title() for part in name.split('_'))
            read = pbegin | f'Read{label}' >> ReadRecords(file_pattern=pattern, schema=schema, step=f'Read{label}',
                                                          batch_rows=self._batch_rows)
            records = read.records
            if keep is not None:
                records = records | f'Keep{label}' >> beam.Map(lambda batch, n: keep(n, batch), name)
            routed.append(records | f'Route{label}' >> beam.ParDo(
                SplitByKeyBucket(name, self._key, self._buckets, columns=schema.names, spill_dir=self._spill_dir)))
            rejected.append(read.dead_letters)
        letters = rejected | 'ReadRejections' >> beam.Flatten()
        blocked = letters | 'RouteRejections' >> beam.FlatMap(route_rejection, self._buckets)
        grouped = (*routed, blocked) | 'AllByKey' >> beam.Flatten() | 'GroupByBucket' >> beam.GroupByKey()
        return {'grouped': grouped, 'rejected': letters}


class RemoveWhenDone(beam.PTransform):
    """Removes ``directory`` (and what it holds) once the input PCollection is complete: applied to
    an output of the step that read the spilled groups, it runs after that step's last retry."""

    def __init__(self, directory: str):
        super().__init__()
        self._directory = directory

    def expand(self, done):
        finished = done | 'Finished' >> beam.combiners.Count.Globally()
        return (done.pipeline
                | 'Directory' >> beam.Create([self._directory])
                | 'Remove' >> beam.Map(lambda path, _: remove_temp_dir(path), beam.pvalue.AsSingleton(finished)))

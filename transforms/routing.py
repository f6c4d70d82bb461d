"""Route every record of one key (an employee) to one hash bucket, so a bucket can be joined whole.

``SplitByKeyBucket`` splits each Arrow batch of one input by the bucket of its key and tags the
pieces with the input's name: after a ``GroupByKey`` on the bucket, one call sees every record of
its keys from every input. The bucket is ``deduplicate.stable_buckets`` of the key (vectorised,
the same on every machine and run), so the step that computes bucket ``b`` can write it as Parquet
partition ``keyed_write.bucket_dir(key, b)`` directly (``keyed_write.WritePartitions``), with no
second shuffle.
"""
import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics

from transforms.dead_letters import METRICS_NAMESPACE
from transforms.deduplicate import stable_buckets
from transforms.read import ReadRecords


class SplitByKeyBucket(beam.DoFn):
    """(bucket, (name, the batch's rows of that bucket)) for each bucket present in the batch.

    ``columns``: the columns to keep (default: all). Dropping what the join does not use, such as
    the readers' per-row ``_source`` path, keeps the shuffle small: on the DirectRunner it is held
    in memory whole.
    """

    def __init__(self, name: str, key: str, buckets: int, columns: tuple[str, ...] | None = None):
        self._name, self._key, self._buckets, self._columns = name, key, buckets, columns

    def process(self, batch: pa.RecordBatch):
        if not batch.num_rows:
            return
        if self._columns is not None:
            batch = batch.select(list(self._columns))
        buckets = stable_buckets(batch.column(self._key), self._buckets)
        order = np.argsort(buckets, kind='stable')
        bounds = np.searchsorted(buckets[order], np.arange(self._buckets + 1))
        for bucket in np.flatnonzero(np.diff(bounds)):
            rows = pa.array(order[bounds[bucket]:bounds[bucket + 1]])
            yield int(bucket), (self._name, batch.take(rows))


def bucket_of(key: str, buckets: int) -> int:
    """The bucket ``SplitByKeyBucket`` routes ``key`` to."""
    return int(stable_buckets(pa.array([key], pa.string()), buckets)[0])


def tagged_tables(items, schemas_by_name: dict) -> dict:
    """The grouped ``(name, batch)`` pieces of one bucket as one table per input name (empty tables
    for inputs with no piece), each in its schema's columns."""
    parts = {name: [] for name in schemas_by_name}
    for name, batch in items:
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
    Returns ``{'grouped': (bucket, [(name, batch) or (BLOCKED, (key, reason)), ...]),
    'rejected': the readers' dead letters}``: a record rejected when read blocks its key (see
    ``route_rejection``; ``split_blocked`` separates them again).
    """

    def __init__(self, *, inputs: dict, key: str, buckets: int, keep=None, batch_rows: int = 65_536):
        super().__init__()
        self._inputs, self._key, self._buckets, self._keep = inputs, key, buckets, keep
        self._batch_rows = batch_rows

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
                SplitByKeyBucket(name, self._key, self._buckets, columns=schema.names)))
            rejected.append(read.dead_letters)
        letters = rejected | 'ReadRejections' >> beam.Flatten()
        blocked = letters | 'RouteRejections' >> beam.FlatMap(route_rejection, self._buckets)
        grouped = (*routed, blocked) | 'AllByKey' >> beam.Flatten() | 'GroupByBucket' >> beam.GroupByKey()
        return {'grouped': grouped, 'rejected': letters}

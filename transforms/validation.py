"""Vectorised casting and validation of Arrow batches against a ``RecordSchema``.

Two pure functions, no Beam:

- ``cast_columns`` turns the raw columns a reader produced (CSV strings, Parquet ``int64`` for a
  ``float64`` field...) into the declared types. A value that cannot be cast makes its row a dead letter.
- ``validate_batch`` applies every declared check (required fields, NaN, bounds, allowed values, check
  functions, row checks) and splits the batch into valid rows and dead letters.

Both work on whole columns with ``pyarrow.compute`` and numpy. Python loops only run over the rows
that are rejected, to write their dead letters, and over the values of a column whose whole-column
cast failed, to find the values to blame. A rejected row's ``error`` lists every failing check,
each naming the field, the bad value and what is allowed. Values go into dead letters only, never
into logs.
"""
import collections
import datetime
import re
import typing

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.dead_letters import DeadLetter, locator
from transforms.schemas import METADATA_FIELDS, ROW_COLUMN, SOURCE_COLUMN, Field, RecordSchema, row_to_json

# Row index -> reasons it fails, in the order the checks ran (fields in schema order, then row checks).
Reasons = dict[int, list[str]]

# What pyarrow raises when a value cannot be converted: a data error, not a bug.
CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


class _ValueFailure(typing.NamedTuple):
    """The values of one column (or the elements of a list column) failing one check."""
    mask: np.ndarray  # bool, one per value: True = fails
    problem: str      # for list fields: 'unknown values', 'values out of range', ...
    allowed: str      # completes "must be ..."


def format_value(value) -> str:
    """A value as written in an error message: strings quoted, dates ISO, NaN as ``nan``."""
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if value is None:
        return 'null'
    return repr(value)


# ---------------------------------------------------------------------------------------------
# Casting
# ---------------------------------------------------------------------------------------------

def cast_columns(batch: pa.RecordBatch, schema: RecordSchema, *,
                 step: str) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """Casts the declared columns of ``batch`` to their declared types.

    ``batch`` holds the schema's columns (any order, any castable types) plus ``_source`` and
    ``_row``. Returns the rows whose every value could be cast, with the declared types in schema
    order followed by the metadata columns (nulls still allowed: ``validate_batch`` rejects them),
    and one dead letter per row holding a value that cannot be cast, naming the field and the value.
    """
    reasons: Reasons = collections.defaultdict(list)
    cast = {}
    for field in schema.fields:
        column = batch.column(field.name)
        try:
            cast[field.name] = _cast(column, field.type)
            continue
        except CAST_ERRORS:
            pass
        for row in uncastable_rows(column, field.type):
            reasons[int(row)].append(
                f'{field.name}={format_value(column[int(row)].as_py())}: cannot be read as {field.type}')
    letters = _dead_letters(batch, schema, reasons, step=step)
    if reasons:
        keep = pa.array(_keep_mask(batch.num_rows, reasons))
        batch = batch.filter(keep)
        cast = {name: array.filter(keep) for name, array in cast.items()}
    columns = [cast[f.name] if f.name in cast else _cast(batch.column(f.name), f.type) for f in schema.fields]
    return pa.RecordBatch.from_arrays(columns + _metadata_columns(batch), schema=castable_schema(schema)), letters


def castable_schema(schema: RecordSchema) -> pa.Schema:
    """The declared types with every data field nullable: what ``cast_columns`` returns."""
    return pa.schema([pa.field(f.name, f.type) for f in schema.fields] + list(METADATA_FIELDS))


def uncastable_rows(column: pa.Array, to_type: pa.DataType) -> np.ndarray:
    """Indices of the values of ``column`` that cannot be cast (safely) to ``to_type``.

    Fast path: cast the whole column at once. Only when that fails is each value cast on its own, to
    find which rows are to blame.
    """
    if column.type == to_type:
        return np.empty(0, dtype=np.int64)
    try:
        pc.cast(column, to_type)
        return np.empty(0, dtype=np.int64)
    except CAST_ERRORS:
        pass
    bad = []
    for row in range(len(column)):
        try:
            pc.cast(column.slice(row, 1), to_type)
        except CAST_ERRORS:
            bad.append(row)
    return np.asarray(bad, dtype=np.int64)


def can_cast(from_type: pa.DataType, to_type: pa.DataType) -> bool:
    """Whether pyarrow has a cast from ``from_type`` to ``to_type`` (values may still fail it)."""
    if from_type == to_type or pa.types.is_null(from_type):
        return True
    try:
        pa.array([], type=from_type).cast(to_type)
        return True
    except CAST_ERRORS:
        return False


def _cast(column: pa.Array, to_type: pa.DataType) -> pa.Array:
    return column if column.type == to_type else pc.cast(column, to_type)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def validate_batch(batch: pa.RecordBatch, schema: RecordSchema, *,
                   step: str) -> tuple[pa.RecordBatch, list[DeadLetter]]:
    """Splits ``batch`` into its valid rows and one dead letter per invalid row.

    ``batch`` has the schema's columns cast to the declared types (nulls allowed) plus ``_source`` and
    ``_row``. The valid rows come back as ``schema.arrow_schema(with_metadata=True)``: declared
    column order, non-nullable fields really non-null.
    """
    reasons: Reasons = collections.defaultdict(list)
    for field in schema.fields:
        _merge(reasons, field_reasons(batch.column(field.name), field))
    _merge(reasons, row_check_reasons(batch, schema, _keep_mask(batch.num_rows, reasons)))
    letters = _dead_letters(batch, schema, reasons, step=step)
    valid = batch.filter(pa.array(_keep_mask(batch.num_rows, reasons))) if reasons else batch
    columns = [valid.column(f.name) for f in schema.fields] + _metadata_columns(valid)
    # The cast only changes nullability; it raises if a non-nullable column still held a null,
    # which would be a bug in the checks above.
    target = schema.arrow_schema(with_metadata=True)
    return pa.RecordBatch.from_arrays(columns, names=target.names).cast(target), letters


def field_reasons(column: pa.Array, field: Field) -> Reasons:
    """Why each failing row of ``column`` breaks the declaration of ``field``."""
    reasons: Reasons = collections.defaultdict(list)
    nulls = _as_mask(column.is_null())
    if not field.nullable:
        for row in np.flatnonzero(nulls):
            reasons[int(row)].append(f'{field.name}=null: required, must not be empty')
    if field.is_list:
        _merge(reasons, _list_reasons(column, field))
    else:
        for failure in value_failures(column, field):
            for row in np.flatnonzero(failure.mask):
                reasons[int(row)].append(
                    f'{field.name}={format_value(column[int(row)].as_py())}: must be {failure.allowed}')
    return reasons


def value_failures(values: pa.Array, field: Field) -> list[_ValueFailure]:
    """Which non-null ``values`` (of the field, or elements of a list field) fail which check."""
    failures = []
    present = ~_as_mask(values.is_null())
    value_type = values.type
    if pa.types.is_floating(value_type) or field.min_value is not None or field.max_value is not None:
        out = _out_of_range(values, field)
        if out.any():
            failures.append(_ValueFailure(out, 'values out of range', _range_text(field, value_type)))
    if field.allowed is not None:
        unknown = present & ~_as_mask(pc.is_in(values, value_set=pa.array(field.allowed, value_type)))
        if unknown.any():
            failures.append(_ValueFailure(unknown, 'unknown values', 'one of ' + ', '.join(field.allowed)))
    if field.check is not None and present.any():
        failing = np.zeros(len(values), dtype=bool)
        positions = np.flatnonzero(present)
        ok = np.asarray(field.check.function(values.filter(pa.array(present))), dtype=bool)
        failing[positions[~ok]] = True
        if failing.any():
            failures.append(_ValueFailure(failing, 'unknown values', field.check.allowed))
    return failures


def _out_of_range(values: pa.Array, field: Field) -> np.ndarray:
    # NaN compares false with everything, so it is flagged on its own.
    out = np.zeros(len(values), dtype=bool)
    if pa.types.is_floating(values.type):
        out |= _as_mask(pc.is_nan(values))
    if field.min_value is not None:
        out |= _as_mask(pc.less(values, pa.scalar(field.min_value, values.type)))
    if field.max_value is not None:
        out |= _as_mask(pc.greater(values, pa.scalar(field.max_value, values.type)))
    return out


def _range_text(field: Field, value_type: pa.DataType) -> str:
    if field.min_value is not None and field.max_value is not None:
        return f'a number in [{field.min_value}, {field.max_value}]'
    if field.min_value is not None:
        return f'a number >= {field.min_value}'
    if field.max_value is not None:
        return f'a number <= {field.max_value}'
    return 'a number (not NaN)' if pa.types.is_floating(value_type) else 'a number'


def _list_reasons(column: pa.Array, field: Field) -> Reasons:
    """Checks each element of a list column and names, per row, the elements that fail."""
    elements = pc.list_flatten(column)
    # Parent row of each element. pc.list_parent_indices counts the hidden elements behind a null
    # list slot while list_flatten skips them; repeating by value length (0 for null) never does.
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    parents = np.repeat(np.arange(len(column)), lengths)
    failures = value_failures(elements, field)
    null_elements = _as_mask(elements.is_null())
    if null_elements.any():
        failures.insert(0, _ValueFailure(null_elements, 'null values', 'non-null values'))
    reasons: Reasons = collections.defaultdict(list)
    for failure in failures:
        positions = np.flatnonzero(failure.mask)
        bad_values = elements.take(pa.array(positions)).to_pylist()
        by_row = collections.defaultdict(list)
        for row, value in zip(parents[positions].tolist(), bad_values):
            by_row[row].append(value)
        for row, values in by_row.items():
            reasons[row].append(f'{field.name}: {failure.problem} {values!r}: must be {failure.allowed}')
    return reasons


def row_check_reasons(batch: pa.RecordBatch, schema: RecordSchema, candidates: np.ndarray) -> Reasons:
    """Runs the schema's row checks on the ``candidates`` rows (those whose fields are all valid).

    Rows already failing a field check are left out: a row check on a null or NaN value would only
    repeat that failure in vaguer words.
    """
    reasons: Reasons = collections.defaultdict(list)
    if not schema.row_checks or not candidates.any():
        return reasons
    positions = np.flatnonzero(candidates)
    subset = batch.filter(pa.array(candidates))
    for check in schema.row_checks:
        failing = ~_as_mask(check.function(subset), null_is=False)
        for position in np.flatnonzero(failing):
            row = int(positions[position])
            reasons[row].append(f'{check.description} ({_mentioned_values(batch, schema, check.description, row)})')
    return reasons


def _mentioned_values(batch: pa.RecordBatch, schema: RecordSchema, description: str, row: int) -> str:
    # A row check declares no field list; the fields its description names are the ones to show.
    names = [n for n in schema.names if re.search(rf'\b{re.escape(n)}\b', description)]
    return ', '.join(f'{n}={format_value(batch.column(n)[row].as_py())}' for n in names) or 'see payload'


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _as_mask(values, null_is: bool = False) -> np.ndarray:
    """A boolean Arrow array (or numpy array) as a numpy bool mask, nulls as ``null_is``."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pc.fill_null(values, null_is).to_numpy(zero_copy_only=False)
    values = np.asarray(values)
    if values.dtype == object:
        values = np.array([null_is if v is None else bool(v) for v in values], dtype=bool)
    return values.astype(bool, copy=False)


def _merge(into: Reasons, more: Reasons) -> None:
    for row, texts in more.items():
        into[row].extend(texts)


def _keep_mask(num_rows: int, reasons: Reasons) -> np.ndarray:
    keep = np.ones(num_rows, dtype=bool)
    if reasons:
        keep[np.fromiter(reasons.keys(), dtype=np.int64, count=len(reasons))] = False
    return keep


def _metadata_columns(batch: pa.RecordBatch) -> list[pa.Array]:
    return [batch.column(SOURCE_COLUMN), batch.column(ROW_COLUMN)]


def _dead_letters(batch: pa.RecordBatch, schema: RecordSchema, reasons: Reasons, *,
                  step: str) -> list[DeadLetter]:
    """One dead letter per row in ``reasons``: the row without metadata as JSON, and where it came from."""
    if not reasons:
        return []
    rows = sorted(reasons)
    taken = batch.take(pa.array(rows, pa.int64()))
    payloads = taken.select(list(schema.names)).to_pylist()
    sources = taken.column(SOURCE_COLUMN).to_pylist()
    numbers = taken.column(ROW_COLUMN).to_pylist()
    return [
        DeadLetter(step=step, error='; '.join(reasons[row]), payload=row_to_json(payload),
                   source=locator(source, number))
        for row, payload, source, number in zip(rows, payloads, sources, numbers)
    ]

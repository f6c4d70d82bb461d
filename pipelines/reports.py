"""Reports: the matching, payroll and data-quality reports, as CSV, Parquet and one HTML page each.

``--kind`` chooses the report; each reads the outputs of the other pipelines:

- **matching** (``--matches``: the matching pipeline's ``matches/`` Parquet files; optionally the
  ``--offers`` given to it, for titles and minimum scores): per offer, the candidates at or above the
  threshold, the score distribution (20 bins of 0.05) and the ``--top`` best candidates with each
  score component, its weight and its weighted contribution to the score (they add up to the score).
  Tables ``offers``, ``score_distribution``, ``top_candidates``.
- **payroll** (``--payroll``: payroll output directories of one or more months, a glob such as
  ``'out/payroll-2026-*'``; their ``payslips/`` and ``payslip_lines/`` are read): per establishment
  and month, the headcount, gross mass, contributions and employer cost, each compared with the
  establishment's previous calendar month when it is among the inputs; and the contributions by
  rubric and kind (contribution, reduction), employee and employer side. Tables
  ``establishment_months``, ``contributions``.
- **quality** (``--dead_letters``: dead-letter files, e.g. ``'out/*/dead_letters/*.jsonl'``): the
  dead letters by operation, step and reason. The operation is read from the record's run id
  (``OPERATION-TIME-HEX``, see ``transforms.ledger.new_run_id``), else the name of the output
  directory holding the file. The reason is the error with its values masked (quoted values,
  e-mails and anything with a digit become ``…``, ``#``): a reason is a kind of problem, and the
  report never shows a rejected value. Table ``dead_letters_by_reason``.

Every table is written as ``OUTPUT/<table>.csv`` and ``OUTPUT/<table>.parquet``, and the report as
``OUTPUT/<kind>_report.html``: one self-contained page (inline CSS, SVG charts, a small script; no
network needed to open it, see ``transforms.report_html``). The matching report shows candidate ids,
never names or e-mails; the payroll report shows establishments only; the quality report shows no
payload. Files are written to a temporary name and then renamed: a rerun replaces them whole, and the
CSV and Parquet files of a rerun on the same inputs are byte-identical.

Bad input: an unknown ``--kind``, an option of another kind, or an input pattern that matches nothing
fails at launch naming the option. A row that does not fit its schema, a key seen twice (the same
match, payslip or payslip line in two files: one is counted), or a payslip line without its payslip
is a dead letter under ``OUTPUT/dead_letters/``; every other row is counted.

Scaling: the aggregation is columnar. Each read batch is reduced with Arrow ``group_by`` to partial
aggregates (per offer; per establishment and month), which are combined (``CombineGlobally`` of
small Arrow tables); payslip lines are joined to their payslip's establishment inside hash buckets
of ``employee_id`` (``transforms.routing.ReadGroupedByKey``, spilled to ``OUTPUT/.spill/``). Only
the small aggregated tables reach the final step that writes the files.

    hrbatch run reports --kind matching --matches 'out/matches/*/part-*.parquet' \\
        --offers data/offers.parquet --output out/reports/matching
    hrbatch run reports --kind payroll --payroll 'out/payroll-2026-*' --output out/reports/payroll-2026
    hrbatch run reports --kind quality --dead_letters 'out/*/dead_letters/*.jsonl' --output out/reports/quality

On Dataflow (the HTML and tables are written to the gs:// output)::

    hrbatch run reports --kind payroll --payroll 'gs://BUCKET/payroll-2026-*' --output gs://BUCKET/reports/payroll \\
        --ledger postgresql://... --runner DataflowRunner --project PROJECT --region europe-west9 \\
        --temp_location gs://BUCKET/tmp
"""
import dataclasses
import datetime
import io
import json
import os
import sys
import typing
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from pipelines import lifecycle
from pipelines import options as opts
from transforms import report_html as rh
from transforms import schemas
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.dead_letters import DeadLetter
from transforms.dead_letters import WriteDeadLetters
from transforms.deduplicate import DropDuplicateKeys
from transforms.errors import ConfigError
from transforms.read import ReadRecords
from transforms.read import ReadTask
from transforms.read import check_jsonl_first_record
from transforms.read import match_files
from transforms.read import read_records
from transforms.routing import ReadGroupedByKey
from transforms.routing import RemoveWhenDone
from transforms.routing import split_blocked
from transforms.routing import tagged_tables

NAME = 'reports'
KINDS = ('matching', 'payroll', 'quality')
_KIND_INPUTS = {'matching': ('matches', 'offers', 'min_score'), 'payroll': ('payroll',), 'quality': ('dead_letters',)}
_REQUIRED = {'matching': 'matches', 'payroll': 'payroll', 'quality': 'dead_letters'}
_DATA_CATEGORIES = {'matching': ['match scores', 'candidate ids'], 'payroll': ['pay (aggregated per establishment)'],
                    'quality': ['dead letters (without payload)']}
_DEAD_LETTERS = 'dead_letters'
BINS = 20  # score distribution: bins of 1 / BINS over [0, 1]

OPTIONS = (
    opts.Option('kind', 'Which report: matching, payroll or quality.', required=True, choices=KINDS),
    opts.Option('output', 'Output directory (local or gs://): the report tables (CSV and Parquet), '
                'KIND_report.html, dead_letters/.', required=True),
    opts.Option('matches', "--kind matching: the matching pipeline's matches, a file or glob, e.g. "
                "'out/matches/*/part-*.parquet'."),
    opts.Option('offers', '--kind matching, optional: the offers given to matching (file or glob): adds each '
                "offer's title and minimum score, and lists offers without any match."),
    opts.Option('min_score', '--kind matching: count the candidates scoring at least this. Default: the offer\'s '
                'minimum_match_score with --offers, else every stored match (they all reached it).',
                type='float', min_value=0.0, max_value=1.0),
    opts.Option('top', '--kind matching: the best candidates explained per offer.', type='int', default=5,
                min_value=1, max_value=100),
    opts.Option('payroll', "--kind payroll: payroll output directories of one or more months, a glob, e.g. "
                "'out/payroll-2026-*'; each holds payslips/ and payslip_lines/."),
    opts.Option('dead_letters', "--kind quality: dead-letter files, a glob, e.g. 'out/*/dead_letters/*.jsonl'."),
    opts.Option('buckets', '--kind payroll: hash buckets of employee_id in which payslip lines are joined to '
                'their payslip.', type='int', default=16, min_value=1, max_value=100_000),
) + lifecycle.LIFECYCLE_OPTIONS


@dataclasses.dataclass(frozen=True)
class ReportsConfig:
    kind: str
    output: str
    run_id: str
    matches: str | None = None
    offers: str | None = None
    min_score: float | None = None
    top: int = 5
    payslips: str | None = None          # derived from --payroll
    payslip_lines: str | None = None
    dead_letter_files: tuple[str, ...] = ()  # the non-empty files --dead_letters matched
    buckets: int = 16

    def path(self, name: str) -> str:
        return FileSystems.join(self.output, name)

    @property
    def inputs(self) -> list[str]:
        return [p for p in (self.matches, self.offers, self.payslips, self.payslip_lines) if p] + list(
            self.dead_letter_files)

    @classmethod
    def from_values(cls, values: dict, *, run_id: str) -> 'ReportsConfig':
        kind = values['kind']
        for other, names in _KIND_INPUTS.items():
            for name in names:
                if other != kind and values.get(name) is not None:
                    raise ConfigError(f'--{name} is an option of --kind {other}, not of --kind {kind}: remove it '
                                      f'or run --kind {other}')
        required = _REQUIRED[kind]
        if not values.get(required):
            raise ConfigError(f'--kind {kind} needs --{required}: {_option(required).help}')
        common = dict(kind=kind, output=values['output'], run_id=run_id)
        # Beam's local file system does not expand a wildcard in a directory of a relative pattern.
        values = {**values, **{name: _absolute(values[name]) for name in ('matches', 'offers', 'payroll', 'dead_letters')}}
        if kind == 'matching':
            _check_matches('matches', values['matches'])
            if values['offers']:
                _check_matches('offers', values['offers'])
            return cls(**common, matches=values['matches'], offers=values['offers'], min_score=values['min_score'],
                       top=values['top'])
        if kind == 'payroll':
            pattern = values['payroll'].rstrip('/')
            found = {}
            for name in ('payslips', 'payslip_lines'):
                found[name] = FileSystems.join(pattern, name, '*', 'part-*.parquet')
                _check_matches('payroll', found[name], f'a payroll output directory holding {name}/')
            return cls(**common, payslips=found['payslips'], payslip_lines=found['payslip_lines'],
                       buckets=values['buckets'])
        files = match_files_allowing_empty('dead_letters', values['dead_letters'])
        for path in files:
            check_jsonl_first_record(path, DEAD_LETTER_RECORDS, values['dead_letters'])
        return cls(**common, dead_letter_files=tuple(files))


def _absolute(pattern: str | None) -> str | None:
    return pattern if pattern is None or '://' in pattern else os.path.abspath(pattern)


def _option(name: str) -> opts.Option:
    return next(o for o in OPTIONS if o.name == name)


def _check_matches(option: str, pattern: str, expected: str | None = None) -> None:
    try:
        match_files(pattern)
    except ConfigError as err:
        raise ConfigError(f'--{option}={pattern!r}: {err}{f" (expected {expected})" if expected else ""}') from None


def match_files_allowing_empty(option: str, pattern: str) -> list[str]:
    """The non-empty files ``pattern`` matches (a run without dead letters leaves an empty file);
    ConfigError naming the option if it matches no file at all."""
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception as err:  # BeamIOError and the file systems' own errors: a launch error either way
        raise ConfigError(f'--{option}={pattern!r} could not be matched: {err}') from None
    if not matched:
        raise ConfigError(f'--{option}={pattern!r} matches no file: check the path and the wildcard '
                          f'(* does not cross directories), e.g. \'out/*/dead_letters/*.jsonl\'')
    return sorted(m.path for m in matched if m.size_in_bytes > 0)


# ---------------------------------------------------------------------------------------------
# Shared: columnar aggregation and publishing
# ---------------------------------------------------------------------------------------------

def aggregate(table: pa.Table, keys: typing.Sequence[str], specs: typing.Sequence[tuple[str, str, str]]) -> pa.Table:
    """``table`` grouped by ``keys``; ``specs`` are (column, function, output name). Keys first, sorted."""
    grouped = table.group_by(list(keys)).aggregate([(column, function) for column, function, _ in specs])
    columns = {**{k: grouped.column(k) for k in keys},
               **{name: grouped.column(f'{column}_{function}') for column, function, name in specs}}
    return pa.table(columns).sort_by([(k, 'ascending') for k in keys])


class _CompactingTablesFn(beam.CombineFn):
    """Combines small Arrow tables into one with ``_compact`` (a reduction of a list of tables to a
    list of at most one): accumulators are lists of tables, compacted as they grow."""

    def _compact(self, tables: list) -> list:
        raise NotImplementedError

    def _empty(self) -> pa.Table:
        raise NotImplementedError

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, table):
        accumulator.append(table)
        return self._compact(accumulator) if len(accumulator) >= 32 else accumulator

    def merge_accumulators(self, accumulators):
        return self._compact([t for accumulator in accumulators for t in accumulator])

    def extract_output(self, accumulator):
        compacted = self._compact(accumulator)
        return compacted[0] if compacted else self._empty()


class _AggregateTablesFn(_CompactingTablesFn):
    """Combines partial aggregates (Arrow tables of ``schema``) into one: grouped by ``keys``, each
    other column combined with its function (``sum``, ``min`` or ``max``: associative, so partials
    of partials are fine)."""

    def __init__(self, schema: pa.Schema, keys: tuple[str, ...], functions: dict[str, str]):
        self._schema, self._keys, self._functions = schema, keys, functions

    def _compact(self, tables: list) -> list:
        if not tables:
            return []
        merged = pa.concat_tables([t.select(self._schema.names).cast(self._schema) for t in tables])
        specs = [(name, self._functions[name], name) for name in self._schema.names if name not in self._keys]
        return [aggregate(merged, self._keys, specs).cast(self._schema)]

    def _empty(self) -> pa.Table:
        return self._schema.empty_table()


def _sum_all(schema: pa.Schema, keys: tuple[str, ...]) -> _AggregateTablesFn:
    return _AggregateTablesFn(schema, keys, {name: 'sum' for name in schema.names if name not in keys})


def _publish(path: str, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then renames it over ``path``."""
    temp = f'{path}.tmp-{uuid.uuid4().hex}'
    with FileSystems.create(temp) as handle:
        handle.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temp], [path])


def _csv_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pa_csv.write_csv(table, sink)
    return sink.getvalue()


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression='zstd')
    return sink.getvalue()


def write_report(output: str, kind: str, tables: dict, html: str) -> list[str]:
    """Publishes every table as CSV and Parquet and the HTML page; returns the paths written."""
    written = []
    for name, table in tables.items():
        for suffix, data in (('csv', _csv_bytes(table)), ('parquet', _parquet_bytes(table))):
            path = FileSystems.join(output, f'{name}.{suffix}')
            _publish(path, data)
            written.append(path)
    path = FileSystems.join(output, f'{kind}_report.html')
    _publish(path, html.encode('utf-8'))
    written.append(path)
    rows = Metrics.counter(METRICS_NAMESPACE, 'report_rows')
    rows.inc(sum(t.num_rows for t in tables.values()))
    Metrics.counter(METRICS_NAMESPACE, 'report_files_written').inc(len(written))
    return written


def _first_per_key(table: pa.Table, key: typing.Sequence[str], tiebreak: typing.Sequence[str]) -> tuple[pa.Table, pa.Table]:
    """(the first row of each key after sorting by key then ``tiebreak``, the other rows)."""
    if not table.num_rows:
        return table, table
    ordered = table.sort_by([(c, 'ascending') for c in (*key, *tiebreak)])
    same = np.ones(ordered.num_rows - 1, dtype=bool)
    for column in key:
        values = ordered.column(column)
        same &= pc.equal(values.slice(1), values.slice(0, ordered.num_rows - 1)).to_numpy(zero_copy_only=False)
    repeat = np.concatenate([[False], same])
    return ordered.filter(pa.array(~repeat)), ordered.filter(pa.array(repeat))


# ---------------------------------------------------------------------------------------------
# Matching report
# ---------------------------------------------------------------------------------------------

_OFFER_STATS = pa.schema([('offer_id', pa.string()), ('matches', pa.int64()), ('above_threshold', pa.int64()),
                          ('score_sum', pa.float64()), ('score_min', pa.float64()), ('score_max', pa.float64())])
_HISTOGRAM = pa.schema([('offer_id', pa.string()), ('bin', pa.int64()), ('candidates', pa.int64())])
_TOP_COLUMNS = ('offer_id', 'candidate_id', 'score', 'rank', *(f'score_{c}' for c in schemas.SCORE_COMPONENTS),
                'distance_km', 'weights')
_TOP = pa.schema([schemas.MATCHES.arrow_schema().field(name) for name in _TOP_COLUMNS])
_OFFER_INFO = schemas.OFFERS.project(('offer_id', 'title', 'minimum_match_score'), name='offer_info')


def thresholds(offer_ids: pa.Array, offers: pa.Table | None, min_score: float | None) -> pa.Array:
    """The score each match must reach to count: ``min_score``, else its offer's minimum, else 0."""
    if min_score is not None:
        return pa.array(np.full(len(offer_ids), min_score, dtype=np.float64))
    if offers is None or not offers.num_rows:
        return pa.array(np.zeros(len(offer_ids), dtype=np.float64))
    index = pc.index_in(offer_ids, value_set=offers.column('offer_id'))
    return pc.fill_null(pc.take(offers.column('minimum_match_score'), index), 0.0)


def score_bins(scores: pa.Array) -> np.ndarray:
    """The histogram bin of each score: floor(score * BINS), 1.0 in the last bin."""
    values = scores.to_numpy(zero_copy_only=False).astype(np.float64)
    return np.clip(np.floor(values * BINS), 0, BINS - 1).astype(np.int64)


def match_partials(batch: pa.RecordBatch, offers: pa.Table | None, min_score: float | None) -> tuple[pa.Table, pa.Table]:
    """Per-offer partial statistics and histogram counts of one batch of matches."""
    offer_ids = batch.column('offer_id')
    scores = pc.cast(batch.column('score'), pa.float64())
    above = pc.cast(pc.greater_equal(scores, thresholds(offer_ids, offers, min_score)), pa.int64())
    rows = pa.table({'offer_id': offer_ids, 'score': scores, 'above': above, 'bin': score_bins(scores)})
    stats = aggregate(rows, ['offer_id'], [('score', 'count', 'matches'), ('above', 'sum', 'above_threshold'),
                                           ('score', 'sum', 'score_sum'), ('score', 'min', 'score_min'),
                                           ('score', 'max', 'score_max')])
    histogram = aggregate(rows, ['offer_id', 'bin'], [('score', 'count', 'candidates')])
    return stats.cast(_OFFER_STATS), histogram.cast(_HISTOGRAM)


def top_per_offer(table: pa.Table, n: int) -> pa.Table:
    """The ``n`` best rows of each offer: score descending, then candidate_id (as matching ranks)."""
    if not table.num_rows:
        return table
    ordered = table.sort_by([('offer_id', 'ascending'), ('score', 'descending'), ('candidate_id', 'ascending')])
    offers = ordered.column('offer_id')
    starts = np.concatenate([[True], pc.not_equal(offers.slice(1), offers.slice(0, len(offers) - 1))
                             .to_numpy(zero_copy_only=False)])
    positions = np.arange(ordered.num_rows)
    first = np.maximum.accumulate(np.where(starts, positions, 0))
    return ordered.filter(pa.array(positions - first < n))


class _TopPerOfferFn(_CompactingTablesFn):
    """The ``n`` best matches of each offer, from per-batch tops (small Arrow tables)."""

    def __init__(self, n: int):
        self._n = n

    def _compact(self, tables):
        return [top_per_offer(pa.concat_tables(tables), self._n)] if tables else []

    def _empty(self) -> pa.Table:
        return _TOP.empty_table()


class _MatchPartialsFn(beam.DoFn):
    """Per batch of matches: the per-offer statistics, histogram and top ``n`` (all columnar)."""

    def __init__(self, min_score: float | None, top: int, with_offers: bool):
        self._min_score, self._top, self._with_offers = min_score, top, with_offers
        self._offers_of = None

    def _offers_table(self, offers) -> pa.Table | None:
        if not self._with_offers:
            return None
        if self._offers_of is None or self._offers_of[0] is not offers:  # once per side input, not per batch
            table = pa.Table.from_batches(list(offers), schema=_OFFER_INFO.arrow_schema())
            self._offers_of = (offers, _first_per_key(table, ('offer_id',), ())[0])
        return self._offers_of[1]

    def process(self, batch: pa.RecordBatch, offers):
        if not batch.num_rows:
            return
        stats, histogram = match_partials(batch, self._offers_table(offers), self._min_score)
        yield stats
        yield beam.pvalue.TaggedOutput('histogram', histogram)
        yield beam.pvalue.TaggedOutput('top', top_per_offer(pa.Table.from_batches([batch]).select(list(_TOP.names))
                                                            .cast(_TOP), self._top))


def explain_top(top: pa.Table) -> pa.Table:
    """The top candidates with their position in the offer and, per component, its weight and its
    weighted contribution (weight x component score; they add up to the score)."""
    top = top.sort_by([('offer_id', 'ascending'), ('score', 'descending'), ('candidate_id', 'ascending')])
    offers = top.column('offer_id')
    n = top.num_rows
    starts = np.concatenate([[True], pc.not_equal(offers.slice(1), offers.slice(0, max(0, n - 1)))
                             .to_numpy(zero_copy_only=False)]) if n else np.zeros(0, dtype=bool)
    positions = np.arange(n)
    position = positions - np.maximum.accumulate(np.where(starts, positions, 0)) + 1 if n else positions
    weights_text = top.column('weights')
    distinct = pc.unique(weights_text).to_pylist()
    parsed = {text: json.loads(text) for text in distinct}  # one parse per distinct weights (normally one)
    index = pc.index_in(weights_text, value_set=pa.array(distinct, pa.string())).to_numpy(zero_copy_only=False)
    columns = {'offer_id': offers, 'position': pa.array(position.astype(np.int32)),
               'candidate_id': top.column('candidate_id'),
               'score': pc.round(pc.cast(top.column('score'), pa.float64()), 4), 'rank': top.column('rank')}
    for component in schemas.SCORE_COMPONENTS:
        weight = np.array([float(parsed[text].get(component, 0.0)) for text in distinct], dtype=np.float64)[index] \
            if n else np.zeros(0)
        value = top.column(f'score_{component}').to_numpy(zero_copy_only=False).astype(np.float64)
        columns[f'score_{component}'] = pa.array(np.round(value, 4))
        columns[f'weight_{component}'] = pa.array(np.round(weight, 6))
        columns[f'contribution_{component}'] = pa.array(np.round(weight * value, 4))
    columns['distance_km'] = pc.round(pc.cast(top.column('distance_km'), pa.float64()), 1)
    return pa.table(columns)


def matching_tables(stats: pa.Table, histogram: pa.Table, top: pa.Table, offers: pa.Table | None,
                    min_score: float | None) -> dict[str, pa.Table]:
    """The report's tables from the combined aggregates (small: offers x bins, offers x top)."""
    stats = stats.sort_by('offer_id')
    if offers is not None:  # every offer, with or without matches
        ids = pc.unique(pa.concat_arrays([offers.column('offer_id').combine_chunks(),
                                          stats.column('offer_id').combine_chunks()])).sort()
    else:
        ids = stats.column('offer_id').combine_chunks()
    at = pc.index_in(ids, value_set=stats.column('offer_id'))
    matches = pc.fill_null(pc.take(stats.column('matches'), at), 0)
    columns = {'offer_id': ids}
    if offers is not None:
        info = pc.index_in(ids, value_set=offers.column('offer_id'))
        columns['title'] = pc.take(offers.column('title'), info)
        columns['minimum_match_score'] = pc.take(offers.column('minimum_match_score'), info)
    columns['threshold'] = thresholds(ids, offers, min_score)
    columns['matches'] = matches
    columns['above_threshold'] = pc.fill_null(pc.take(stats.column('above_threshold'), at), 0)
    total = pc.take(stats.column('score_sum'), at)
    columns['mean_score'] = pc.round(pc.divide(total, pc.cast(matches, pa.float64())), 4)  # null: no match
    columns['min_score'] = pc.round(pc.take(stats.column('score_min'), at), 4)
    columns['max_score'] = pc.round(pc.take(stats.column('score_max'), at), 4)
    bins = histogram.column('bin').to_numpy(zero_copy_only=False)
    distribution = pa.table({
        'offer_id': histogram.column('offer_id'), 'bin_low': pa.array(np.round(bins / BINS, 4)),
        'bin_high': pa.array(np.round((bins + 1) / BINS, 4)), 'candidates': histogram.column('candidates')})
    return {'offers': pa.table(columns), 'score_distribution': distribution, 'top_candidates': explain_top(top)}


def _component_label(component: str) -> str:
    return component.replace('_', ' ')


def matching_html(tables: dict, config: 'ReportsConfig') -> str:
    offers, distribution, top = (tables[n].to_pylist() for n in ('offers', 'score_distribution', 'top_candidates'))
    total = sum(o['matches'] for o in offers)
    above = sum(o['above_threshold'] for o in offers)
    with_match = sum(1 for o in offers if o['above_threshold'])
    counts = [0] * BINS
    for row in distribution:
        counts[round(row['bin_low'] * BINS)] += row['candidates']
    weighted = sum((o['mean_score'] or 0) * o['matches'] for o in offers)
    threshold_text = (f'score ≥ {config.min_score:g}' if config.min_score is not None
                      else "score ≥ the offer's minimum" if config.offers else 'every stored match')
    body = [rh.kpis([
        ('Offers', rh.fmt_int(len(offers)), f'{with_match:,} with a candidate above threshold'),
        ('Matches read', rh.fmt_int(total), 'after de-duplication'),
        ('Above threshold', rh.fmt_int(above), threshold_text),
        ('Mean score', rh.fmt_float(weighted / total if total else None, 3), 'over every match'),
    ])]
    ranked = sorted(offers, key=lambda o: (-o['above_threshold'], o['offer_id']))[:30]

    def offer_label(o):
        return f"{o['offer_id']} · {o['title'][:28]}" if o.get('title') else o['offer_id']
    charts = [
        rh.figure(rh.histogram([k / BINS for k in range(BINS + 1)], counts, title='Score distribution',
                               x_label='score (weighted mean of the components)') if total else None,
                  'Score distribution, every offer'),
        rh.figure(rh.bar_chart([offer_label(o) for o in ranked], [o['above_threshold'] for o in ranked],
                               title='Candidates above threshold', value_text=rh.fmt_int)
                  if ranked and above else None,
                  f'Candidates above threshold per offer ({"top 30" if len(offers) > 30 else "every offer"})'),
    ]
    if top:
        means = []
        for component in schemas.SCORE_COMPONENTS:
            means.append(sum(r[f'contribution_{component}'] for r in top) / len(top))
        charts.append(rh.figure(rh.bar_chart([_component_label(c) for c in schemas.SCORE_COMPONENTS], means,
                                             title='Mean contribution per component',
                                             value_text=lambda v: rh.fmt_float(v, 3), color=rh.PALETTE[4]),
                                f'Mean weighted contribution of each component, top {config.top} candidates'))
        by_offer = {}
        for row in top:
            by_offer.setdefault(row['offer_id'], []).append(row)
        explained = sorted(by_offer)[:6]
        for offer_id in explained:
            rows = by_offer[offer_id]
            charts.append(rh.figure(rh.stacked_bar_chart(
                [f"#{r['position']} {r['candidate_id']}" for r in rows],
                [(_component_label(c), [r[f'contribution_{c}'] for r in rows]) for c in schemas.SCORE_COMPONENTS],
                title=f'Top candidates of {offer_id}', value_text=lambda v: rh.fmt_float(v, 3)),
                f'Offer {offer_id}: why the top candidates score what they do'))
    body.append(rh.section('Overview', rh.grid(charts),
                           'Each score is the weighted mean of six components; each bar segment is one component '
                           'times its weight, so the segments add up to the score.'))
    offer_columns = [rh.Column('offer', rh.esc)]
    if config.offers:
        offer_columns += [rh.Column('title', str), rh.Column('minimum', lambda v: rh.fmt_float(v, 2), True)]
    offer_columns += [rh.Column('threshold', lambda v: rh.fmt_float(v, 2), True),
                      rh.Column('matches', rh.fmt_int, True), rh.Column('above threshold', rh.fmt_int, True),
                      rh.Column('mean', lambda v: rh.fmt_float(v, 3), True),
                      rh.Column('min', lambda v: rh.fmt_float(v, 3), True),
                      rh.Column('max', lambda v: rh.fmt_float(v, 3), True)]
    keys = (['offer_id'] + (['title', 'minimum_match_score'] if config.offers else [])
            + ['threshold', 'matches', 'above_threshold', 'mean_score', 'min_score', 'max_score'])
    body.append(rh.section('Offers', rh.table(offer_columns, [[o[k] for k in keys] for o in offers])))
    top_columns = [rh.Column('offer', str), rh.Column('#', rh.fmt_int, True), rh.Column('candidate', str),
                   rh.Column('score', lambda v: rh.fmt_float(v, 3), True)]
    top_keys = ['offer_id', 'position', 'candidate_id', 'score']
    for component in schemas.SCORE_COMPONENTS:
        top_columns.append(rh.Column(f'{_component_label(component)} (× weight)', str, True))
        top_keys.append(component)
    rows = [[r[k] for k in top_keys[:4]] + [
        f"{r[f'score_{c}']:.2f} × {r[f'weight_{c}']:.2f} = {r[f'contribution_{c}']:.3f}"
        for c in schemas.SCORE_COMPONENTS] for r in top]
    body.append(rh.section(f'Top {config.top} candidates per offer', rh.table(top_columns, rows),
                           'Candidate ids only: names and contact details stay in the source data.'))
    return rh.page(title='Matching report', subtitle=f'{len(offers):,} offers, {total:,} matches',
                   meta=f'Run {config.run_id} · matches: {config.matches}',
                   body=''.join(body), footer='hrbatch reports · matching')


# ---------------------------------------------------------------------------------------------
# Payroll report
# ---------------------------------------------------------------------------------------------

_PAYROLL_INPUTS = {
    'payslips': schemas.PAYSLIPS.project(('employee_id', 'period', 'establishment_siret', 'gross_cents',
                                          'employee_contributions_cents', 'employer_contributions_cents',
                                          'rgdu_cents', 'employer_cost_cents', 'net_pay_cents', 'pas_cents'),
                                         name='payslips'),
    'payslip_lines': schemas.PAYSLIP_LINES.project(('employee_id', 'period', 'rubric', 'kind', 'label',
                                                    'employee_cents', 'employer_cents'), name='payslip_lines'),
}
_TOTALS = ('gross_cents', 'employee_contributions_cents', 'employer_contributions_cents', 'rgdu_cents',
           'employer_cost_cents', 'net_pay_cents', 'pas_cents')
_SITE_MONTH = pa.schema([('establishment_siret', pa.string()), ('period', pa.string()), ('headcount', pa.int64()),
                         *((name, pa.int64()) for name in _TOTALS)])
_CONTRIBUTIONS = pa.schema([('establishment_siret', pa.string()), ('period', pa.string()), ('kind', pa.string()),
                            ('rubric', pa.string()), ('label', pa.string()), ('employee_cents', pa.int64()),
                            ('employer_cents', pa.int64())])
_CONTRIBUTION_KINDS = ('contribution', 'reduction')
PAYROLL_STEP = 'PayrollReport'


def _key_text(table: pa.Table, key: typing.Sequence[str]) -> pa.Array:
    parts = [table.column(k).combine_chunks() for k in key]
    return parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, '\x1f')


def payroll_partials(slips: pa.Table, lines: pa.Table) -> tuple[pa.Table, pa.Table, list[DeadLetter]]:
    """One bucket's (site-month totals, contributions by site, month and rubric, dead letters)."""
    letters = []
    slips, extra = _first_per_key(slips, ('employee_id', 'period'), ('establishment_siret', *_TOTALS))
    for row in extra.select(['employee_id', 'period']).to_pylist():
        letters.append(DeadLetter(step=PAYROLL_STEP, error=f"payslip of employee {row['employee_id']}, period "
                                  f"{row['period']} appears more than once in the inputs: counted once",
                                  payload=json.dumps(row, sort_keys=True), source=''))
    lines, extra = _first_per_key(lines, ('employee_id', 'period', 'rubric'), ('employee_cents', 'employer_cents'))
    for row in extra.select(['employee_id', 'period', 'rubric']).to_pylist():
        letters.append(DeadLetter(step=PAYROLL_STEP, error=f"payslip line {row['rubric']} of employee "
                                  f"{row['employee_id']}, period {row['period']} appears more than once in the "
                                  'inputs: counted once', payload=json.dumps(row, sort_keys=True), source=''))
    totals = aggregate(slips, ['establishment_siret', 'period'],
                       [('employee_id', 'count', 'headcount'), *((n, 'sum', n) for n in _TOTALS)])
    slip = pc.index_in(_key_text(lines, ('employee_id', 'period')), value_set=_key_text(slips, ('employee_id', 'period')))
    orphan = pc.is_null(slip)
    if pc.any(orphan).as_py():
        orphans = lines.filter(orphan)
        counted = aggregate(orphans, ['employee_id', 'period'], [('rubric', 'count', 'lines')])
        for row in counted.to_pylist():
            letters.append(DeadLetter(step=PAYROLL_STEP, error=f"{row['lines']} payslip lines of employee "
                                      f"{row['employee_id']}, period {row['period']} have no payslip in the inputs: "
                                      'their establishment is unknown', payload=json.dumps(
                                          {'employee_id': row['employee_id'], 'period': row['period']}), source=''))
        lines, slip = lines.filter(pc.invert(orphan)), pc.drop_null(slip)
    lines = lines.append_column('establishment_siret', pc.take(slips.column('establishment_siret'), slip))
    lines = lines.filter(pc.is_in(lines.column('kind'), value_set=pa.array(_CONTRIBUTION_KINDS)))
    contributions = aggregate(lines, ['establishment_siret', 'period', 'kind', 'rubric', 'label'],
                              [('employee_cents', 'sum', 'employee_cents'), ('employer_cents', 'sum', 'employer_cents')])
    return totals.cast(_SITE_MONTH), contributions.cast(_CONTRIBUTIONS), letters


class _PayrollBucketFn(beam.DoFn):

    def process(self, element):
        _, items = element
        records, _blocked = split_blocked(items)  # a rejected row is its own dead letter; the others count
        tables = tagged_tables(records, _PAYROLL_INPUTS)
        totals, contributions, letters = payroll_partials(tables['payslips'], tables['payslip_lines'])
        for letter in letters:
            yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, letter)
        yield totals
        yield beam.pvalue.TaggedOutput('contributions', contributions)


def previous_month(period: str) -> str:
    year, month = int(period[:4]), int(period[5:7])
    return f'{year - 1}-12' if month == 1 else f'{year}-{month - 1:02d}'


def _change_pct(now, before):
    return None if not before else round(100.0 * (now - before) / before, 2)


def payroll_tables(totals: pa.Table, contributions: pa.Table) -> dict[str, pa.Table]:
    """Site-months with the comparison with each establishment's previous month (small tables)."""
    rows = totals.sort_by([('establishment_siret', 'ascending'), ('period', 'ascending')]).to_pylist()
    by_key = {(r['establishment_siret'], r['period']): r for r in rows}
    out = []
    for r in rows:
        previous = previous_month(r['period'])
        before = by_key.get((r['establishment_siret'], previous))
        row = dict(r, previous_period=previous if before else None)
        for name in ('headcount', 'gross_cents', 'employer_cost_cents'):
            base = name.removesuffix('_cents')
            row[f'previous_{name}'] = before[name] if before else None
            row[f'{base}_change' + ('_cents' if name.endswith('_cents') else '')] = r[name] - before[name] if before else None
            row[f'{base}_change_pct'] = _change_pct(r[name], before[name]) if before else None
        out.append(row)
    schema = pa.schema(list(_SITE_MONTH) + [
        ('previous_period', pa.string()), ('previous_headcount', pa.int64()), ('headcount_change', pa.int64()),
        ('headcount_change_pct', pa.float64()), ('previous_gross_cents', pa.int64()), ('gross_change_cents', pa.int64()),
        ('gross_change_pct', pa.float64()), ('previous_employer_cost_cents', pa.int64()),
        ('employer_cost_change_cents', pa.int64()), ('employer_cost_change_pct', pa.float64())])
    return {'establishment_months': pa.Table.from_pylist(out, schema=schema),
            'contributions': contributions.sort_by([(k, 'ascending') for k in (
                'establishment_siret', 'period', 'kind', 'rubric')])}


def payroll_html(tables: dict, config: 'ReportsConfig') -> str:
    months_rows = tables['establishment_months'].to_pylist()
    contributions = tables['contributions'].to_pylist()
    months = sorted({r['period'] for r in months_rows})
    sites = sorted({r['establishment_siret'] for r in months_rows})
    latest = months[-1] if months else None
    before = previous_month(latest) if latest else None

    def month_total(period, name):
        return sum(r[name] for r in months_rows if r['period'] == period)
    body = []
    if latest:
        tiles = []
        for label, name, text in (('Headcount', 'headcount', rh.fmt_int), ('Gross mass', 'gross_cents', rh.fmt_euros),
                                  ('Employer cost', 'employer_cost_cents', rh.fmt_euros),
                                  ('Employer contributions', 'employer_contributions_cents', rh.fmt_euros)):
            now = month_total(latest, name)
            note = (f'{rh.fmt_pct(_change_pct(now, month_total(before, name)))} vs {before}'
                    if before in months else 'no previous month in the inputs')
            tiles.append((f'{label}, {latest}', text(now), note))
        body.append(rh.kpis(tiles))
    shown_sites = sites[:20]
    compare = [m for m in (before, latest) if m in months]
    charts = [
        rh.figure(rh.column_chart(months, [('gross mass', [month_total(m, 'gross_cents') / 100 for m in months]),
                                           ('employer cost', [month_total(m, 'employer_cost_cents') / 100
                                                              for m in months])],
                                  title='Gross mass and employer cost by month', value_text=rh.fmt_float)
                  if months else None, 'Gross mass and employer cost by month, all establishments (EUR)'),
    ]

    def site_series(name, scale):
        return [(m, [by.get((s, m), {}).get(name) / scale if (s, m) in by else None for s in shown_sites])
                for m in compare]
    by = {(r['establishment_siret'], r['period']): r for r in months_rows}
    charts.append(rh.figure(rh.column_chart(shown_sites, site_series('employer_cost_cents', 100),
                                            title='Employer cost by establishment', value_text=rh.fmt_float)
                            if compare else None,
                            f'Employer cost by establishment, {" vs ".join(compare)} (EUR)'))
    charts.append(rh.figure(rh.column_chart(shown_sites, site_series('headcount', 1), title='Headcount by establishment',
                                            value_text=rh.fmt_int) if compare else None,
                            f'Headcount by establishment, {" vs ".join(compare)}'))
    rubrics = {}
    for row in contributions:
        if row['period'] == latest and row['kind'] == 'contribution':
            entry = rubrics.setdefault(row['rubric'], [0, 0])
            entry[0] += row['employer_cents']
            entry[1] += row['employee_cents']
    ordered = sorted(rubrics.items(), key=lambda item: -(abs(item[1][0]) + abs(item[1][1])))[:18]
    charts.append(rh.figure(rh.stacked_bar_chart(
        [name for name, _ in ordered],
        [('employer', [v[0] / 100 for _, v in ordered]), ('employee', [v[1] / 100 for _, v in ordered])],
        title='Contributions by rubric', value_text=rh.fmt_float) if ordered else None,
        f'Contributions by rubric, {latest}, all establishments (EUR; reductions not drawn)'))
    body.append(rh.section('Overview', rh.grid(charts), 'Amounts are exact sums of the payslips, in euros.'))
    columns = [rh.Column('establishment', str), rh.Column('month', str), rh.Column('headcount', rh.fmt_int, True),
               rh.Column('Δ headcount', lambda v: '–' if v is None else f'{v:+d}', True),
               rh.Column('gross mass', rh.fmt_euros, True), rh.Column('Δ gross', rh.fmt_pct, True),
               rh.Column('employee contrib.', rh.fmt_euros, True),
               rh.Column('employer contrib.', rh.fmt_euros, True), rh.Column('RGDU', rh.fmt_euros, True),
               rh.Column('employer cost', rh.fmt_euros, True), rh.Column('Δ cost', rh.fmt_pct, True),
               rh.Column('net pay', rh.fmt_euros, True)]
    keys = ('establishment_siret', 'period', 'headcount', 'headcount_change', 'gross_cents', 'gross_change_pct',
            'employee_contributions_cents', 'employer_contributions_cents', 'rgdu_cents', 'employer_cost_cents',
            'employer_cost_change_pct', 'net_pay_cents')
    body.append(rh.section('Establishments by month', rh.table(columns, [[r[k] for k in keys] for r in months_rows]),
                           'Δ: change from the same establishment\'s previous calendar month, when it is in the inputs.'))
    c_columns = [rh.Column('establishment', str), rh.Column('month', str), rh.Column('kind', str),
                 rh.Column('rubric', str), rh.Column('label', str), rh.Column('employee', rh.fmt_euros, True),
                 rh.Column('employer', rh.fmt_euros, True)]
    c_keys = ('establishment_siret', 'period', 'kind', 'rubric', 'label', 'employee_cents', 'employer_cents')
    body.append(rh.section('Contributions by establishment, month and rubric',
                           rh.table(c_columns, [[r[k] for k in c_keys] for r in contributions])))
    return rh.page(title='Payroll report', subtitle=f'{len(sites):,} establishments, months {", ".join(months) or "none"}',
                   meta=f'Run {config.run_id} · payslips: {config.payslips}', body=''.join(body),
                   footer='hrbatch reports · payroll')


# ---------------------------------------------------------------------------------------------
# Data-quality report
# ---------------------------------------------------------------------------------------------

DEAD_LETTER_RECORDS = schemas.RecordSchema(
    name='dead_letter_records', key=(),
    fields=(schemas.Field('run_id', pa.string()), schemas.Field('step', pa.string()),
            schemas.Field('error', pa.string()), schemas.Field('source', pa.string())))
_BY_REASON = pa.schema([('operation', pa.string()), ('step', pa.string()), ('reason', pa.string()),
                        ('dead_letters', pa.int64())])
_RUN_ID = r'^(?P<operation>.+)-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$'
_OUTPUT_DIR = r'(?P<operation>[^/\\]+)[/\\]dead_letters[/\\][^/\\]*$'
REASON_CHARS = 160


def mask_reasons(errors: pa.Array) -> pa.Array:
    """Errors as kinds of problem: quoted values, e-mails and any token with a digit masked."""
    masked = pc.replace_substring_regex(errors, r"'[^']*'", "'…'")
    masked = pc.replace_substring_regex(masked, r'"[^"]*"', '"…"')
    masked = pc.replace_substring_regex(masked, r'[^\s@]+@[^\s@]+', '…@…')
    masked = pc.replace_substring_regex(masked, r'[\w.+:/-]*[0-9][\w.+:/-]*', '#')
    return pc.utf8_slice_codeunits(masked, 0, REASON_CHARS)


def operations(run_ids: pa.Array, sources: pa.Array) -> pa.Array:
    """The operation of each dead letter: its run id's prefix, else its output directory's name."""
    from_run = pc.struct_field(pc.extract_regex(run_ids, _RUN_ID), 'operation')
    from_dir = pc.struct_field(pc.extract_regex(sources, _OUTPUT_DIR), 'operation')
    return pc.fill_null(pc.coalesce(from_run, from_dir), 'unknown')


def quality_partial(batch: pa.RecordBatch) -> pa.Table:
    rows = pa.table({'operation': operations(batch.column('run_id'), batch.column('_source')),
                     'step': batch.column('step'), 'reason': mask_reasons(batch.column('error'))})
    return aggregate(rows, ['operation', 'step', 'reason'], [('step', 'count', 'dead_letters')]).cast(_BY_REASON)


class _ReadDeadLetterFilesFn(beam.DoFn):
    """Reads one dead-letter file (JSON lines) into validated batches; its bad lines are dead letters."""

    def __init__(self):
        self._read = Metrics.counter(METRICS_NAMESPACE, 'dead_letter_records_read')

    def process(self, task: ReadTask):
        for item in read_records(task, schema=DEAD_LETTER_RECORDS, file_format='jsonl', batch_rows=65_536,
                                 step='ReadDeadLetters'):
            if isinstance(item, DeadLetter):
                yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, item)
            else:
                self._read.inc(item.num_rows)
                yield quality_partial(item)


def quality_tables(by_reason: pa.Table) -> dict[str, pa.Table]:
    by_step = aggregate(by_reason, ['operation', 'step'], [('dead_letters', 'sum', 'dead_letters')])
    return {'dead_letters_by_reason': by_reason.sort_by([('operation', 'ascending'), ('step', 'ascending'),
                                                         ('reason', 'ascending')]),
            'dead_letters_by_step': by_step}


def quality_html(tables: dict, config: 'ReportsConfig') -> str:
    reasons = tables['dead_letters_by_reason'].to_pylist()
    steps = tables['dead_letters_by_step'].to_pylist()
    total = sum(r['dead_letters'] for r in reasons)
    by_operation = {}
    for row in steps:
        by_operation[row['operation']] = by_operation.get(row['operation'], 0) + row['dead_letters']
    operations_sorted = sorted(by_operation.items(), key=lambda item: (-item[1], item[0]))
    steps_sorted = sorted(steps, key=lambda r: (-r['dead_letters'], r['operation'], r['step']))[:25]
    reasons_sorted = sorted(reasons, key=lambda r: (-r['dead_letters'], r['operation'], r['step'], r['reason']))
    body = [rh.kpis([
        ('Dead letters', rh.fmt_int(total), f'in {len(config.dead_letter_files):,} non-empty files'),
        ('Operations', rh.fmt_int(len(by_operation)), ', '.join(sorted(by_operation))[:60]),
        ('Steps', rh.fmt_int(len(steps)), 'that rejected records'),
        ('Kinds of problem', rh.fmt_int(len(reasons)), 'distinct masked reasons'),
    ])]
    top_reasons = reasons_sorted[:15]
    charts = [
        rh.figure(rh.bar_chart([name for name, _ in operations_sorted], [n for _, n in operations_sorted],
                               title='Dead letters by operation', value_text=rh.fmt_int, color=rh.PALETTE[6])
                  if total else None, 'Dead letters by operation'),
        rh.figure(rh.bar_chart([f"{r['operation']} / {r['step']}" for r in steps_sorted],
                               [r['dead_letters'] for r in steps_sorted], title='Dead letters by step',
                               value_text=rh.fmt_int, color=rh.PALETTE[1]) if total else None,
                  'Dead letters by operation and step'),
        rh.figure(rh.bar_chart([f"{r['step']}: {r['reason'][:38]}" for r in top_reasons],
                               [r['dead_letters'] for r in top_reasons], title='Most frequent reasons',
                               value_text=rh.fmt_int, color=rh.PALETTE[3], width=1200) if total else None,
                  'Most frequent reasons (values masked)', wide=True),
    ]
    body.append(rh.section('Overview', rh.grid(charts), 'A dead letter is a record a pipeline could not process; '
                           'it is kept, with its payload, in the dead-letter files. This report shows no payload.'))
    columns = [rh.Column('operation', str), rh.Column('step', str), rh.Column('reason', str),
               rh.Column('dead letters', rh.fmt_int, True)]
    body.append(rh.section('Dead letters by operation, step and reason', rh.table(
        columns, [[r['operation'], r['step'], r['reason'], r['dead_letters']] for r in reasons_sorted])))
    return rh.page(title='Data-quality report', subtitle=f'{total:,} dead letters, {len(by_operation):,} operations',
                   meta=f'Run {config.run_id} · dead letters: {len(config.dead_letter_files):,} files',
                   body=''.join(body), footer='hrbatch reports · quality')


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------

def _write_matching(output, stats, histogram, top, offers, config):
    offers_table = None
    if config.offers:
        offers_table = pa.Table.from_batches(list(offers), schema=_OFFER_INFO.arrow_schema())
        offers_table, _ = _first_per_key(offers_table, ('offer_id',), ())
    tables = matching_tables(stats, histogram, top, offers_table, config.min_score)
    return write_report(output, 'matching', tables, matching_html(tables, config))


def _write_payroll(output, totals, contributions, config):
    tables = payroll_tables(totals, contributions)
    return write_report(output, 'payroll', tables, payroll_html(tables, config))


def _write_quality(output, by_reason, config):
    tables = quality_tables(by_reason)
    return write_report(output, 'quality', tables, quality_html(tables, config))


def _build_matching(pipeline, config):
    matches = pipeline | 'ReadMatches' >> ReadRecords(file_pattern=config.matches, schema=schemas.MATCHES,
                                                      step='ReadMatches')
    unique = matches.records | 'DropDuplicateMatches' >> DropDuplicateKeys(schema=schemas.MATCHES,
                                                                           step='DropDuplicateMatches')
    letters = [matches.dead_letters, unique.dead_letters]
    if config.offers:
        offers_read = pipeline | 'ReadOffers' >> ReadRecords(file_pattern=config.offers, schema=schemas.OFFERS,
                                                             step='ReadOffers')
        offers = offers_read.records | 'OfferInfo' >> beam.Map(
            lambda b: b.select(list(_OFFER_INFO.names)).cast(_OFFER_INFO.arrow_schema()))
        letters.append(offers_read.dead_letters)
    else:
        offers = pipeline | 'NoOffers' >> beam.Create([]).with_output_types(pa.RecordBatch)
    partials = unique.records | 'Partials' >> beam.ParDo(
        _MatchPartialsFn(config.min_score, config.top, bool(config.offers)), offers=beam.pvalue.AsList(offers)
    ).with_outputs('histogram', 'top', main='stats')
    stats = partials.stats | 'CombineStats' >> beam.CombineGlobally(_AggregateTablesFn(
        _OFFER_STATS, ('offer_id',), {'matches': 'sum', 'above_threshold': 'sum', 'score_sum': 'sum',
                                      'score_min': 'min', 'score_max': 'max'}))
    histogram = partials.histogram | 'CombineHistogram' >> beam.CombineGlobally(_sum_all(_HISTOGRAM, ('offer_id', 'bin')))
    top = partials.top | 'CombineTop' >> beam.CombineGlobally(_TopPerOfferFn(config.top))
    written = (pipeline | 'Output' >> beam.Create([config.output])
               | 'WriteReport' >> beam.Map(_write_matching, beam.pvalue.AsSingleton(stats),
                                           beam.pvalue.AsSingleton(histogram), beam.pvalue.AsSingleton(top),
                                           beam.pvalue.AsList(offers), config))
    return written, letters


def _build_payroll(pipeline, config):
    spill = lifecycle.spill_dir(config.output, config.run_id)
    read = pipeline | 'ByEmployee' >> ReadGroupedByKey(
        inputs={'payslips': (config.payslips, _PAYROLL_INPUTS['payslips']),
                'payslip_lines': (config.payslip_lines, _PAYROLL_INPUTS['payslip_lines'])},
        key='employee_id', buckets=config.buckets, spill_dir=spill)
    partials = read['grouped'] | 'Buckets' >> beam.ParDo(_PayrollBucketFn()).with_outputs(
        'contributions', _DEAD_LETTERS, main='totals')
    partials.totals | 'RemoveSpill' >> RemoveWhenDone(spill)
    totals = partials.totals | 'CombineTotals' >> beam.CombineGlobally(
        _sum_all(_SITE_MONTH, ('establishment_siret', 'period')))
    contributions = partials.contributions | 'CombineContributions' >> beam.CombineGlobally(
        _sum_all(_CONTRIBUTIONS, ('establishment_siret', 'period', 'kind', 'rubric', 'label')))
    written = (pipeline | 'Output' >> beam.Create([config.output])
               | 'WriteReport' >> beam.Map(_write_payroll, beam.pvalue.AsSingleton(totals),
                                           beam.pvalue.AsSingleton(contributions), config))
    return written, [read['rejected'], partials[_DEAD_LETTERS]]


def _build_quality(pipeline, config):
    tasks = [ReadTask(path, None, 0) for path in config.dead_letter_files]
    read = (pipeline | 'ListDeadLetterFiles' >> beam.Create(tasks).with_output_types(ReadTask)
            | 'ReadDeadLetters' >> beam.ParDo(_ReadDeadLetterFilesFn()).with_outputs(_DEAD_LETTERS, main='partials'))
    by_reason = read.partials | 'CombineReasons' >> beam.CombineGlobally(
        _sum_all(_BY_REASON, ('operation', 'step', 'reason')))
    written = (pipeline | 'Output' >> beam.Create([config.output])
               | 'WriteReport' >> beam.Map(_write_quality, beam.pvalue.AsSingleton(by_reason), config))
    return written, [read[_DEAD_LETTERS]]


def build(pipeline: beam.Pipeline, config: ReportsConfig, store=None) -> dict:
    """Adds the report graph of ``config.kind`` to ``pipeline``; returns its PCollections by name."""
    del store  # a report is recomputed whole from its inputs; its files are replaced whole
    written, letters = {'matching': _build_matching, 'payroll': _build_payroll,
                        'quality': _build_quality}[config.kind](pipeline, config)
    dead_letters = letters | 'AllDeadLetters' >> beam.Flatten()
    dead_letters | 'WriteDeadLetters' >> WriteDeadLetters(
        output_prefix=FileSystems.join(config.output, 'dead_letters', 'dead_letters'), run_id=config.run_id)
    return {'written': written, 'dead_letters': dead_letters}


def summarize(result, config: ReportsConfig, built) -> tuple[dict, lifecycle.Outcome]:
    read_counter = {'matching': 'matches_read', 'payroll': 'payslips_read', 'quality': 'dead_letter_records_read'}
    summary = {
        'run_id': config.run_id, 'kind': config.kind,
        'records_read': lifecycle.counter(result, read_counter[config.kind]),
        'report_rows': lifecycle.counter(result, 'report_rows'),
        'files_written': lifecycle.counter(result, 'report_files_written'),
        'dead_letters': lifecycle.counter(result, 'dead_letters'),
        'output': config.output, 'html': config.path(f'{config.kind}_report.html'),
    }
    counts = {k: summary[k] for k in ('records_read', 'report_rows', 'files_written', 'dead_letters')}
    return summary, lifecycle.Outcome(counts=counts, outputs={'report': summary['html'], 'tables': config.output},
                                      record_refs={'kind': config.kind, 'report_rows': summary['report_rows']})


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, builds the report under the run ledger, returns the summary (or ``skipped``)."""
    values, beam_args = opts.parse(OPTIONS, list(sys.argv[1:] if argv is None else argv), prog=f'hrbatch run {NAME}')
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    values['run_key'] = values['run_key'] or f'{NAME}:{values["kind"]}:{today}'
    spec, summary = lifecycle.run_pipeline(
        NAME, values, beam_args, output=values['output'],
        make_config=lambda run_id: ReportsConfig.from_values(values, run_id=run_id), build=build, summarize=summarize,
        inputs=lambda config: config.inputs, data_categories=_DATA_CATEGORIES[values['kind']])
    if 'report_rows' not in summary:
        return summary
    print(f"Report {summary['kind']}, run {summary['run_id']}: {summary['records_read']:,} records read, "
          f"{summary['report_rows']:,} table rows, {summary['dead_letters']:,} dead letters.")
    print(f"Report (HTML):         {summary['html']}")
    print(f"Tables (CSV, Parquet): {summary['output']}/")
    print(f"Dead letters (JSONL):  {FileSystems.join(summary['output'], 'dead_letters')}/")
    print(lifecycle.ledger_line(spec))
    return summary


if __name__ == '__main__':
    from pipelines.cli import main_for
    sys.exit(main_for(NAME))

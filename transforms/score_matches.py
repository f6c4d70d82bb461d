"""``ScoreMatches``: candidates x offers -> matches, in bounded memory.

The offers (thousands) are a side input, indexed once per worker. Candidates stream through in
batches; each batch is scored against every offer ``pair_budget`` pairs at a time, so the cross
product is never materialised. Without ``top_k`` every match reaching its offer's threshold flows
straight out. With ``top_k``, each bundle keeps a running best K per offer (``scoring.TopKPerOffer``)
and one combine merges the bundles' results: nothing ever holds more than about K rows per offer,
twice over, whatever the number of candidates.
"""
import typing

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms import window

from transforms import arrow_coder
from transforms import scoring
from transforms.batching import Rebatcher
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.params import check_positive_int

_OUTPUT_ROWS = 65_536
_OUTPUT_BYTES = 16 << 20
PAIRS_SCORED = 'pairs_scored'
CANDIDATES_SCORED = 'candidates_scored'
MATCHES_FOUND = 'matches'


class MatchScorer:
    """Scores candidate batches against one offer index, in preallocated buffers.

    With ``config.top_k`` it keeps the running top K per offer (``result()``), so later batches skip
    every pair below an offer's current K-th best score; without, ``score`` yields the match blocks.
    ``pairs`` counts the pairs scored.
    """

    def __init__(self, index: scoring.OfferIndex, config: scoring.ScoringConfig, pair_budget: int):
        self.index = index
        self._config = config
        self._pair_budget = pair_budget
        self._workspace = scoring.Workspace(max(1, pair_budget // index.size), index)
        self._top_k = scoring.TopKPerOffer(index, config.top_k) if config.top_k else None
        self.pairs = 0

    def score(self, candidates: pa.RecordBatch) -> typing.Iterator[pa.RecordBatch]:
        floors = self._top_k.floors if self._top_k else None
        for pairs, matches in scoring.score_candidates(candidates, self.index, self._config,
                                                       pair_budget=self._pair_budget, floors=floors,
                                                       workspace=self._workspace):
            self.pairs += pairs
            if self._top_k is not None:
                self._top_k.add(matches)
            elif matches.num_rows:
                yield matches

    def result(self) -> pa.RecordBatch | None:
        """The top K per offer of everything scored (top-K mode), else None."""
        return self._top_k.result() if self._top_k is not None else None


def offer_index(offers: list[pa.RecordBatch]) -> scoring.OfferIndex | None:
    """The index of all offers (sorted by id, so every worker builds the same), None if there are none."""
    if not offers:
        return None
    table = pa.Table.from_batches(offers).sort_by('offer_id').combine_chunks()
    return scoring.OfferIndex.build(table) if table.num_rows else None


class _ScoreBatchFn(beam.DoFn):
    """Scores candidate batches; with top-K, one ``MatchScorer`` serves the whole bundle and its top K
    leaves when the bundle finishes, so almost nothing but the final rows leaves."""

    def __init__(self, config: scoring.ScoringConfig, pair_budget: int):
        self._config = config
        self._pair_budget = pair_budget
        self._pairs = Metrics.counter(METRICS_NAMESPACE, PAIRS_SCORED)
        self._candidates = Metrics.counter(METRICS_NAMESPACE, CANDIDATES_SCORED)
        self._index = None
        self._index_of = None
        self._scorer = None

    def start_bundle(self):
        self._scorer = None
        # Matches leave in batches of about _OUTPUT_ROWS: a few large elements cross the shuffle
        # to the writer far more cheaply than thousands of small ones.
        self._rebatcher = Rebatcher(max_rows=_OUTPUT_ROWS, max_bytes=_OUTPUT_BYTES)

    def process(self, candidates: pa.RecordBatch, offers):
        if self._index_of is not offers:  # the side input is one object per bundle: index it once
            self._index, self._index_of = offer_index(offers), offers
        self._candidates.inc(candidates.num_rows)
        if self._index is None:
            return
        if self._scorer is None or self._scorer.index is not self._index:
            yield from self._flush()
            self._scorer = MatchScorer(self._index, self._config, self._pair_budget)
        before = self._scorer.pairs
        for matches in self._scorer.score(candidates):
            # A match row is ~100 bytes: none is ever 'oversize', every piece is a batch to emit.
            yield from (batch for _, batch in self._rebatcher.add(matches))
        self._pairs.inc(self._scorer.pairs - before)

    def _flush(self):
        yield from (batch for _, batch in self._rebatcher.flush())
        if self._scorer is not None:
            result = self._scorer.result()
            self._scorer = None
            if result is not None and result.num_rows:
                yield result

    def finish_bundle(self):
        for result in self._flush():
            yield window.GlobalWindows.windowed_value_at_end_of_window(result)


class _MergeTopKFn(beam.CombineFn):
    """Merges the per-bundle top-K results into the exact top K per offer."""

    def __init__(self, top_k: int):
        self._top_k = top_k

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, matches):
        return self.compact(accumulator + [matches])

    def merge_accumulators(self, accumulators):
        return self.compact([part for acc in accumulators for part in acc])

    def compact(self, accumulator):
        return [scoring.merge_top_k(accumulator, self._top_k)] if len(accumulator) > 1 else accumulator

    def extract_output(self, accumulator):
        return scoring.merge_top_k(accumulator, self._top_k)

    def get_accumulator_coder(self):
        return beam.coders.ListCoder(arrow_coder.RecordBatchCoder())


class _CountMatchesFn(beam.DoFn):

    def __init__(self):
        self._matches = Metrics.counter(METRICS_NAMESPACE, MATCHES_FOUND)

    def process(self, matches: pa.RecordBatch):
        self._matches.inc(matches.num_rows)
        yield matches


class ScoreMatches(beam.PTransform):
    """Scores candidate RecordBatches against ``offers`` (a PCollection of offer RecordBatches).

    Returns a PCollection of RecordBatches in the ``schemas.MATCHES`` layout: every pair reaching its
    offer's ``minimum_match_score`` or, with ``config.top_k``, the K best of each offer, ranked.
    """

    def __init__(self, *, offers, config: scoring.ScoringConfig, pair_budget: int = scoring.DEFAULT_PAIR_BUDGET):
        super().__init__()
        if not isinstance(config, scoring.ScoringConfig):
            raise ValueError(f'config must be a ScoringConfig, got {type(config).__name__}')
        check_positive_int('pair_budget', pair_budget)
        self._offers = offers
        self._config = config
        self._pair_budget = pair_budget

    def expand(self, candidates):
        config = self._config
        blocks = candidates | 'Score' >> beam.ParDo(
            _ScoreBatchFn(config, self._pair_budget), offers=beam.pvalue.AsList(self._offers)
        ).with_output_types(pa.RecordBatch)
        if config.top_k is None:
            matches = blocks | 'ToMatchRows' >> beam.Map(
                scoring.to_match_rows, config, ranked=False).with_output_types(pa.RecordBatch)
        else:
            matches = (
                blocks
                | 'TopKPerOffer' >> beam.CombineGlobally(_MergeTopKFn(config.top_k)).without_defaults()
                | 'ToRankedRows' >> beam.Map(scoring.to_match_rows, config, ranked=True
                                             ).with_output_types(pa.RecordBatch))
        return matches | 'CountMatches' >> beam.ParDo(_CountMatchesFn()).with_output_types(pa.RecordBatch)

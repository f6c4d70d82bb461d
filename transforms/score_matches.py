"""``ScoreMatches``: candidates x offers -> matches, in bounded memory.

The offers (thousands) are a side input, indexed once per worker. Candidates stream through in
batches; each batch is scored against every offer ``pair_budget`` pairs at a time, so the cross
product is never materialised. Without ``top_k`` every match reaching its offer's threshold flows
straight out. With ``top_k``, each batch keeps its own best K per offer and one combine merges them:
its accumulator never holds more than about K rows per offer, whatever the number of candidates.
"""
import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from transforms import arrow_coder
from transforms import scoring
from transforms.dead_letters import METRICS_NAMESPACE

PAIRS_SCORED = 'pairs_scored'
CANDIDATES_SCORED = 'candidates_scored'
MATCHES_FOUND = 'matches'


def _offer_table(batches: list[pa.RecordBatch]) -> pa.Table:
    """All offers as one table, sorted by id so every worker builds the same index."""
    if not batches:
        return None
    table = pa.Table.from_batches(batches)
    return table.sort_by('offer_id').combine_chunks()


class _ScoreBatchFn(beam.DoFn):

    def __init__(self, config: scoring.ScoringConfig, pair_budget: int):
        self._config = config
        self._pair_budget = pair_budget
        self._pairs = Metrics.counter(METRICS_NAMESPACE, PAIRS_SCORED)
        self._candidates = Metrics.counter(METRICS_NAMESPACE, CANDIDATES_SCORED)
        self._index = None
        self._index_of = None

    def _offer_index(self, offers: list[pa.RecordBatch]) -> scoring.OfferIndex | None:
        # The side input is the same object for every element of a bundle: index it once.
        if self._index_of is not offers:
            table = _offer_table(offers)
            self._index = scoring.OfferIndex.build(table) if table is not None and table.num_rows else None
            self._index_of = offers
        return self._index

    def process(self, candidates: pa.RecordBatch, offers):
        index = self._offer_index(offers)
        self._candidates.inc(candidates.num_rows)
        if index is None:
            return
        for pairs, matches in scoring.score_candidates(candidates, index, self._config,
                                                       pair_budget=self._pair_budget):
            self._pairs.inc(pairs)
            if matches.num_rows:
                yield matches


class _TopKPerOfferFn(beam.CombineFn):
    """Accumulates match blocks, compacting them to the exact top K per offer as they grow."""

    def __init__(self, top_k: int):
        self._top_k = top_k

    def create_accumulator(self):
        return []

    def _compact(self, parts):
        rows = sum(p.num_rows for p in parts)
        # Merge only when the buffer has at least doubled since it was last merged: amortised O(n log n).
        if len(parts) > 1 and rows > max(2 * parts[0].num_rows, 100_000):
            return [scoring.merge_top_k(parts, self._top_k)]
        return parts

    def add_input(self, accumulator, matches):
        return self._compact(accumulator + [matches])

    def merge_accumulators(self, accumulators):
        return self._compact([part for acc in accumulators for part in acc])

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

    def __init__(self, *, offers, config: scoring.ScoringConfig, pair_budget: int = 1_000_000):
        super().__init__()
        if not isinstance(config, scoring.ScoringConfig):
            raise ValueError(f'config must be a ScoringConfig, got {type(config).__name__}')
        if not isinstance(pair_budget, int) or pair_budget < 1:
            raise ValueError(f'pair_budget must be an integer >= 1 (pairs per scoring block), got {pair_budget!r}')
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
                | 'TopKPerOffer' >> beam.CombineGlobally(_TopKPerOfferFn(config.top_k)).without_defaults()
                | 'ToRankedRows' >> beam.Map(scoring.to_match_rows, config, ranked=True
                                             ).with_output_types(pa.RecordBatch))
        return matches | 'CountMatches' >> beam.ParDo(_CountMatchesFn()).with_output_types(pa.RecordBatch)

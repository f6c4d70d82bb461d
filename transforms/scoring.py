"""Candidate x job-offer scoring: the formula, its vectorised kernel, and top-K selection.

Each (candidate, offer) pair gets six component scores in [0, 1] and their weighted mean:

- ``required_skills``: share of the offer's required skills the candidate has (1 if it requires none);
- ``nice_to_have_skills``: same for the nice-to-have skills (1 if there are none);
- ``experience``: years of experience / the offer's minimum, capped at 1 (1 if no minimum);
- ``distance``: 1 at the offer's location, falling linearly to 0 at ``max_distance_km`` (haversine,
  R = 6371.0088 km);
- ``salary``: 1 if the expected salary is within the band's maximum, falling linearly to 0 at
  ``salary_max * (1 + salary_tolerance)``;
- ``contract``: 1 if the candidate accepts the offer's contract type, else 0.

A pair is a match when its score reaches the offer's ``minimum_match_score``; with ``top_k`` only the
K best matches of each offer are kept (ties broken by candidate_id, so the result is deterministic).
Every match keeps its components and the weights used: automated ranking of candidates is high-risk
under the EU AI Act (Annex III 4(a)) and each score must be explainable.

``score_pair`` states the formula in plain Python, one pair at a time; it is the reference the
vectorised kernel is tested against, and the per-pair loop the benchmarks compare with. The kernel
(``score_block``) scores a block of candidates against every offer with numpy on float32 matrices of
``n x m``; callers bound ``n x m`` (``pair_budget``) so the cross product is never materialised whole.
"""
import dataclasses
import functools
import json
import math
from collections.abc import Iterator
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.schemas import CONTRACT_TYPES
from transforms.schemas import MATCHES
from transforms.schemas import SCORE_COMPONENTS

EARTH_RADIUS_KM = 6371.0088
DEFAULT_WEIGHTS = {
    'required_skills': 0.35,
    'nice_to_have_skills': 0.10,
    'experience': 0.15,
    'distance': 0.15,
    'salary': 0.15,
    'contract': 0.10,
}
# Pairs scored per block. About 128k keeps each n x m float32 matrix (512 KiB) and its buffers near
# the CPU caches: measured ~1.6x faster than 1M-pair blocks (benchmarks/matching.py, 2 cores).
DEFAULT_PAIR_BUDGET = 131_072


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """How pairs are scored. Build with ``ScoringConfig.create`` (validates every value)."""
    weights: tuple[float, ...]  # in SCORE_COMPONENTS order, normalised to sum to 1
    max_distance_km: float = 100.0
    salary_tolerance: float = 0.25
    top_k: int | None = None

    @classmethod
    def create(cls, *, weights: Mapping[str, float] | None = None, max_distance_km: float = 100.0,
               salary_tolerance: float = 0.25, top_k: int | None = None) -> 'ScoringConfig':
        merged = dict(DEFAULT_WEIGHTS)
        unknown = sorted(set(weights or {}) - set(SCORE_COMPONENTS))
        if unknown:
            raise ValueError(f'weights: unknown component(s) {unknown}; allowed: {list(SCORE_COMPONENTS)}')
        merged.update(weights or {})
        bad = {k: v for k, v in merged.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f'weights: {bad} must be finite numbers >= 0')
        total = sum(merged.values())
        if total <= 0:
            raise ValueError(f'weights: at least one weight must be > 0, got {merged}')
        if not (isinstance(max_distance_km, (int, float)) and max_distance_km > 0):
            raise ValueError(f'max_distance_km must be a number > 0, got {max_distance_km!r}')
        if not (isinstance(salary_tolerance, (int, float)) and salary_tolerance > 0):
            raise ValueError(f'salary_tolerance must be a number > 0, got {salary_tolerance!r}')
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f'top_k must be an integer >= 1 or None, got {top_k!r}')
        return cls(weights=tuple(merged[c] / total for c in SCORE_COMPONENTS),
                   max_distance_km=float(max_distance_km), salary_tolerance=float(salary_tolerance), top_k=top_k)

    def weights_json(self) -> str:
        """The weights used, as stored with every match."""
        return json.dumps(dict(zip(SCORE_COMPONENTS, (round(w, 6) for w in self.weights))), sort_keys=True)


# --- The formula, one pair at a time (reference and task-queue baseline) -------------------------

def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def score_pair(candidate: Mapping, offer: Mapping, config: ScoringConfig) -> dict[str, float]:
    """Scores one pair given as dict rows of the candidates and offers schemas."""
    skills = set(candidate['skills'])
    required, nice = set(offer['required_skills']), set(offer['nice_to_have_skills'])
    distance = haversine_km(candidate['latitude'], candidate['longitude'], offer['latitude'], offer['longitude'])
    over = candidate['expected_salary'] - offer['salary_max']
    components = {
        'required_skills': len(skills & required) / len(required) if required else 1.0,
        'nice_to_have_skills': len(skills & nice) / len(nice) if nice else 1.0,
        'experience': (min(1.0, candidate['years_experience'] / offer['min_experience_years'])
                       if offer['min_experience_years'] > 0 else 1.0),
        'distance': max(0.0, 1.0 - distance / config.max_distance_km),
        'salary': 1.0 if over <= 0 else max(0.0, 1.0 - over / (offer['salary_max'] * config.salary_tolerance)),
        'contract': 1.0 if offer['contract_type'] in candidate['contract_types'] else 0.0,
    }
    score = sum(w * components[c] for c, w in zip(SCORE_COMPONENTS, config.weights))
    return {'score': score, 'distance_km': distance, **components}


# --- The vectorised kernel -------------------------------------------------------------------------

def _half_angle_terms(degrees: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = np.radians(degrees.astype(np.float64)) / 2
    return np.sin(half).astype(np.float32), np.cos(half).astype(np.float32)


def _column(table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _contract_masks(values) -> np.ndarray:
    """Bit mask of contract types per row, for a string or list<string> column."""
    if pa.types.is_list(values.type):
        flat = pc.list_flatten(values)
        parents = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
        bits = _contract_masks(flat)
        out = np.zeros(len(values), dtype=np.uint8)
        np.bitwise_or.at(out, parents, bits)
        return out
    codes = pc.index_in(values, value_set=pa.array(CONTRACT_TYPES)).to_numpy(zero_copy_only=False)
    codes = np.where(np.isnan(codes.astype(np.float64)), -1, codes).astype(np.int64)
    return np.where(codes >= 0, np.left_shift(1, np.maximum(codes, 0)), 0).astype(np.uint8)


def _inverse_or_zero(values: np.ndarray) -> np.ndarray:
    safe = np.where(values > 0, values, 1).astype(np.float32)
    return np.where(values > 0, 1 / safe, 0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class OfferIndex:
    """All offers in columnar form, built once per worker and scored against every candidate block.

    Skills become columns of a (vocabulary + 1) x 2m count matrix (required | nice-to-have); row
    ``vocabulary`` is all zeros and stands for skills no offer asks for.
    """
    offer_ids: pa.Array
    thresholds: np.ndarray
    lat_sin: np.ndarray
    lat_cos: np.ndarray
    lon_sin: np.ndarray
    lon_cos: np.ndarray
    cos_lat: np.ndarray
    inverse_min_experience: np.ndarray  # 0 where no minimum
    salary_max: np.ndarray
    contract_bits: np.ndarray
    vocabulary: pa.Array
    skill_matrix: np.ndarray  # uint8, shape (len(vocabulary) + 1, 2m)
    required_count: np.ndarray
    nice_count: np.ndarray

    @property
    def size(self) -> int:
        return len(self.offer_ids)

    @functools.cached_property
    def count_dtype(self):
        # Skill counts fit a byte unless an offer lists more than 255 skills of one kind.
        widest = max(self.required_count.max(initial=0), self.nice_count.max(initial=0))
        return np.uint16 if widest > np.iinfo(np.uint8).max else np.uint8

    @functools.cached_property
    def inverse_required(self) -> np.ndarray:
        return _inverse_or_zero(self.required_count)

    @functools.cached_property
    def required_bias(self) -> np.ndarray:
        return (self.required_count == 0).astype(np.float32)

    @functools.cached_property
    def inverse_nice(self) -> np.ndarray:
        return _inverse_or_zero(self.nice_count)

    @functools.cached_property
    def nice_bias(self) -> np.ndarray:
        return (self.nice_count == 0).astype(np.float32)

    @functools.cached_property
    def experience_floor(self) -> np.ndarray:
        return (self.inverse_min_experience == 0).astype(np.float32)

    @classmethod
    def build(cls, offers: pa.Table | pa.RecordBatch) -> 'OfferIndex':
        m = offers.num_rows
        required, nice = offers.column('required_skills'), offers.column('nice_to_have_skills')
        if isinstance(required, pa.ChunkedArray):
            required, nice = required.combine_chunks(), nice.combine_chunks()
        vocabulary = pc.unique(pa.concat_arrays([pc.list_flatten(required), pc.list_flatten(nice)]))
        vocabulary = vocabulary.take(pc.sort_indices(vocabulary))
        matrix = np.zeros((len(vocabulary) + 1, 2 * m), dtype=np.uint8)
        for offset, lists in ((0, required), (m, nice)):
            rows = pc.index_in(pc.list_flatten(lists), value_set=vocabulary).to_numpy(zero_copy_only=False)
            cols = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False) + offset
            matrix[rows.astype(np.int64), cols] = 1  # a skill listed twice counts once
        lat = _column(offers, 'latitude')
        lat_sin, lat_cos = _half_angle_terms(lat)
        lon_sin, lon_cos = _half_angle_terms(_column(offers, 'longitude'))
        min_exp = _column(offers, 'min_experience_years').astype(np.float32)
        with np.errstate(divide='ignore'):
            inverse_min_exp = np.where(min_exp > 0, 1.0 / np.where(min_exp > 0, min_exp, 1), 0).astype(np.float32)
        return cls(
            offer_ids=offers.column('offer_id') if isinstance(offers, pa.RecordBatch)
            else offers.column('offer_id').combine_chunks(),
            thresholds=_column(offers, 'minimum_match_score').astype(np.float32),
            lat_sin=lat_sin, lat_cos=lat_cos, lon_sin=lon_sin, lon_cos=lon_cos,
            cos_lat=np.cos(np.radians(lat)).astype(np.float32),
            inverse_min_experience=inverse_min_exp,
            salary_max=_column(offers, 'salary_max').astype(np.float32),
            contract_bits=_contract_masks(offers.column('contract_type')),
            vocabulary=vocabulary,
            skill_matrix=matrix,
            required_count=matrix[:, :m].sum(axis=0, dtype=np.float32),
            nice_count=matrix[:, m:].sum(axis=0, dtype=np.float32),
        )


@dataclasses.dataclass(frozen=True)
class CandidateBlock:
    """The columns of a candidate batch the kernel needs, as numpy arrays."""
    candidate_ids: pa.Array
    skill_rows: np.ndarray     # per skill occurrence: row in the offer index's skill matrix
    skill_starts: np.ndarray   # per candidate: first position in skill_rows (len n + 1)
    lat_sin: np.ndarray
    lat_cos: np.ndarray
    lon_sin: np.ndarray
    lon_cos: np.ndarray
    cos_lat: np.ndarray
    years: np.ndarray
    salary: np.ndarray
    contract_mask: np.ndarray

    @property
    def size(self) -> int:
        return len(self.candidate_ids)

    @classmethod
    def build(cls, batch: pa.RecordBatch, index: OfferIndex) -> 'CandidateBlock':
        skills = batch.column('skills')
        # Only skills some offer asks for matter: others would add rows of zeros to every sum. A skill
        # listed twice by a candidate counts once, as in the set-based formula.
        rows = pc.index_in(pc.list_flatten(skills), value_set=index.vocabulary)
        parents = pc.list_parent_indices(skills).to_numpy(zero_copy_only=False).astype(np.int64)
        known = pc.is_valid(rows).to_numpy(zero_copy_only=False)
        width = len(index.vocabulary) + 1
        pairs = np.unique(parents[known] * width + rows.to_numpy(zero_copy_only=False)[known].astype(np.int64))
        skill_rows, owners = pairs % width, pairs // width
        counts = np.bincount(owners, minlength=batch.num_rows)
        lat = _column(batch, 'latitude')
        lat_sin, lat_cos = _half_angle_terms(lat)
        lon_sin, lon_cos = _half_angle_terms(_column(batch, 'longitude'))
        return cls(
            candidate_ids=batch.column('candidate_id'),
            skill_rows=skill_rows,
            skill_starts=np.concatenate([[0], np.cumsum(counts)]),
            lat_sin=lat_sin, lat_cos=lat_cos, lon_sin=lon_sin, lon_cos=lon_cos,
            cos_lat=np.cos(np.radians(lat)).astype(np.float32),
            years=_column(batch, 'years_experience').astype(np.float32),
            salary=_column(batch, 'expected_salary').astype(np.float32),
            contract_mask=_contract_masks(batch.column('contract_types')),
        )

    def slice(self, start: int, stop: int) -> 'CandidateBlock':
        a, b = self.skill_starts[start], self.skill_starts[stop]
        return dataclasses.replace(
            self,
            candidate_ids=self.candidate_ids.slice(start, stop - start),
            skill_rows=self.skill_rows[a:b],
            skill_starts=self.skill_starts[start:stop + 1] - a,
            **{f: getattr(self, f)[start:stop] for f in
               ('lat_sin', 'lat_cos', 'lon_sin', 'lon_cos', 'cos_lat', 'years', 'salary', 'contract_mask')})


class Workspace:
    """Preallocated n x m buffers for ``score_block``, reused from block to block.

    Scoring allocates nothing per block: no page faults, and no heap fragmentation from thousands of
    short-lived matrices (which otherwise made a long run's memory creep up with its input size).
    """
    _FLOATS = ('score', 'distance_km', *SCORE_COMPONENTS, 'tmp_a', 'tmp_b')

    def __init__(self, rows: int, index: 'OfferIndex'):
        m = index.size
        self.rows = rows
        self.floats = {name: np.empty((rows, m), dtype=np.float32) for name in self._FLOATS}
        self.counts = np.empty((rows, 2 * m), dtype=index.count_dtype)
        self.gathered = np.empty((rows, 2 * m), dtype=np.uint8)
        self.bits = np.empty((rows, m), dtype=np.uint8)

    def fits(self, rows: int, index: 'OfferIndex') -> bool:
        return rows <= self.rows and self.counts.shape[1] == 2 * index.size \
            and self.counts.dtype == index.count_dtype


def _skill_counts(block: CandidateBlock, index: OfferIndex, work: Workspace) -> np.ndarray:
    """n x 2m matrix: how many of each offer's required | nice-to-have skills each candidate has."""
    # Lay each candidate's skill rows out in a padded n x k table (padding = the all-zero last row of
    # the matrix), then add k gathered n x 2m slices: k small-integer vector adds, no per-pair Python.
    n, zero_row = block.size, index.skill_matrix.shape[0] - 1
    lengths = np.diff(block.skill_starts)
    width = int(lengths.max()) if n else 0
    table = np.full((n, width), zero_row, dtype=np.int64)
    owners = np.repeat(np.arange(n), lengths)
    table[owners, np.arange(len(block.skill_rows)) - block.skill_starts[owners]] = block.skill_rows
    counts, gathered = work.counts[:n], work.gathered[:n]
    counts.fill(0)
    for j in range(width):
        np.take(index.skill_matrix, table[:, j], axis=0, out=gathered)
        np.add(counts, gathered, out=counts)
    return counts


def score_block(block: CandidateBlock, index: OfferIndex, config: ScoringConfig,
                work: Workspace | None = None) -> dict[str, np.ndarray]:
    """Every component, the total ``score`` and ``distance_km`` as n x m float32 matrices.

    The matrices are views into ``work`` (a new one if not given): read them before the next call.
    """
    n, m = block.size, index.size
    if work is None or not work.fits(n, index):
        work = Workspace(n, index)
    out = {name: buffer[:n] for name, buffer in work.floats.items()}
    tmp_a, tmp_b = out.pop('tmp_a'), out.pop('tmp_b')
    counts = _skill_counts(block, index, work)
    # Share of skills held: count / needed, or 1 when the offer lists none (bias term).
    for name, part, inverse, bias in (('required_skills', counts[:, :m], index.inverse_required, index.required_bias),
                                      ('nice_to_have_skills', counts[:, m:], index.inverse_nice, index.nice_bias)):
        np.multiply(part, inverse, out=out[name])
        np.add(out[name], bias, out=out[name])
    experience = out['experience']
    np.multiply(block.years[:, None], index.inverse_min_experience[None, :], out=experience)
    np.minimum(experience, 1, out=experience)
    np.maximum(experience, index.experience_floor, out=experience)
    # Haversine from half-angle sines and cosines: sin((a - b) / 2) = sin a' cos b' - cos a' sin b'
    # keeps float32 accurate to about a metre, with outer products instead of n x m sin calls.
    distance_km = out['distance_km']
    np.multiply(block.lat_sin[:, None], index.lat_cos[None, :], out=tmp_a)
    np.multiply(block.lat_cos[:, None], index.lat_sin[None, :], out=tmp_b)
    np.subtract(tmp_a, tmp_b, out=distance_km)
    np.square(distance_km, out=distance_km)                      # sin^2(dlat / 2)
    np.multiply(block.lon_sin[:, None], index.lon_cos[None, :], out=tmp_a)
    np.multiply(block.lon_cos[:, None], index.lon_sin[None, :], out=tmp_b)
    np.subtract(tmp_a, tmp_b, out=tmp_a)
    np.square(tmp_a, out=tmp_a)                                  # sin^2(dlon / 2)
    np.multiply(block.cos_lat[:, None], index.cos_lat[None, :], out=tmp_b)
    np.multiply(tmp_a, tmp_b, out=tmp_a)
    np.add(distance_km, tmp_a, out=distance_km)                  # h
    np.clip(distance_km, 0, 1, out=distance_km)
    np.sqrt(distance_km, out=distance_km)
    np.arcsin(distance_km, out=distance_km)
    np.multiply(distance_km, np.float32(2 * EARTH_RADIUS_KM), out=distance_km)
    distance = out['distance']
    np.multiply(distance_km, np.float32(-1 / config.max_distance_km), out=distance)
    np.add(distance, 1, out=distance)
    np.clip(distance, 0, 1, out=distance)
    salary = out['salary']
    np.subtract(block.salary[:, None], index.salary_max[None, :], out=salary)  # above the band
    np.multiply(salary, (-1 / (index.salary_max * np.float32(config.salary_tolerance)))[None, :], out=salary)
    np.add(salary, 1, out=salary)
    np.clip(salary, 0, 1, out=salary)
    bits = work.bits[:n]
    np.bitwise_and(block.contract_mask[:, None], index.contract_bits[None, :], out=bits)
    np.minimum(bits, 1, out=bits)
    np.copyto(out['contract'], bits, casting='unsafe')
    score = out['score']
    score.fill(0)
    for name, weight in zip(SCORE_COMPONENTS, config.weights):
        np.multiply(out[name], np.float32(weight), out=tmp_a)
        np.add(score, tmp_a, out=score)
    return out


_BLOCK_SCHEMA = pa.schema(
    [('offer_id', pa.string()), ('candidate_id', pa.string()), ('score', pa.float32())]
    + [(f'score_{c}', pa.float32()) for c in SCORE_COMPONENTS] + [('distance_km', pa.float32())])


def score_candidates(batch: pa.RecordBatch, index: OfferIndex, config: ScoringConfig, *,
                     pair_budget: int = DEFAULT_PAIR_BUDGET,
                     floors: np.ndarray | None = None,
                     workspace: Workspace | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Scores a candidate batch against every offer, ``pair_budget`` pairs at a time.

    Yields ``(pairs scored, matches)`` per block; matches have the columns of ``_BLOCK_SCHEMA``: the
    pairs whose score reaches their offer's floor (by default its ``minimum_match_score``; a
    ``TopKPerOffer`` passes higher floors as it learns the K-th best score of each offer).
    """
    if index.size == 0 or batch.num_rows == 0:
        return
    floors = index.thresholds if floors is None else floors
    block = CandidateBlock.build(batch, index)
    rows_per_block = max(1, pair_budget // index.size)
    if workspace is None or not workspace.fits(min(rows_per_block, block.size), index):
        workspace = Workspace(min(rows_per_block, block.size), index)
    for start in range(0, block.size, rows_per_block):
        part = block.slice(start, min(block.size, start + rows_per_block))
        scores = score_block(part, index, config, workspace)
        rows, cols = np.nonzero(scores['score'] >= floors[None, :])
        columns = [index.offer_ids.take(pa.array(cols)), part.candidate_ids.take(pa.array(rows))]
        columns += [pa.array(scores[name][rows, cols]) for name in
                    ('score', *SCORE_COMPONENTS, 'distance_km')]
        yield part.size * index.size, pa.RecordBatch.from_arrays(columns, schema=_BLOCK_SCHEMA)


def empty_matches() -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=_BLOCK_SCHEMA)


def _order_within_offer(matches: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """Row order by (offer, score desc, candidate_id) and each row's 1-based rank in its offer."""
    order = pc.sort_indices(matches, sort_keys=[('offer_id', 'ascending'), ('score', 'descending'),
                                                ('candidate_id', 'ascending')]).to_numpy()
    offers = matches.column('offer_id').take(pa.array(order)).to_numpy(zero_copy_only=False)
    n = len(order)
    group_start = np.flatnonzero(np.r_[True, offers[1:] != offers[:-1]]) if n else np.array([], dtype=np.int64)
    sizes = np.diff(np.r_[group_start, n])
    rank = np.arange(n) - np.repeat(group_start, sizes) + 1
    return order, rank


def merge_top_k(parts: list[pa.RecordBatch], top_k: int) -> pa.RecordBatch:
    """Exact top K per offer of the union of ``parts`` (ties broken by candidate_id)."""
    parts = [p for p in parts if p.num_rows]
    if not parts:
        return empty_matches()
    merged = parts[0] if len(parts) == 1 else pa.concat_batches(parts)
    order, rank = _order_within_offer(merged)
    return merged.take(pa.array(order[rank <= top_k]))


class TopKPerOffer:
    """The exact top K matches of each offer over a stream of match blocks, in bounded memory.

    Blocks are buffered and merged whenever the buffer has doubled since the last merge (amortised
    O(n log n)). After each merge, ``floors`` holds for each offer the higher of its threshold and
    its current K-th best score: a later pair scoring below that can never enter the top K, so
    ``score_candidates(..., floors=...)`` does not even emit it. Ties at the floor are kept and
    settled by candidate_id in the merge.
    """

    def __init__(self, index: OfferIndex, top_k: int, *, min_merge_rows: int = 100_000):
        self.index = index
        self.top_k = top_k
        self.floors = index.thresholds.copy()
        self._min_merge_rows = min_merge_rows
        self._parts: list[pa.RecordBatch] = []
        self._merged_rows = 0
        self._rows = 0

    def add(self, block: pa.RecordBatch) -> None:
        if not block.num_rows:
            return
        self._parts.append(block)
        self._rows += block.num_rows
        if self._rows > max(self._min_merge_rows, 2 * self._merged_rows):
            self._merge()

    def _merge(self) -> None:
        merged = merge_top_k(self._parts, self.top_k)
        self._parts, self._rows, self._merged_rows = [merged], merged.num_rows, merged.num_rows
        order, rank = _order_within_offer(merged)
        kth = merged.take(pa.array(order[rank == self.top_k]))
        if kth.num_rows:
            positions = pc.index_in(kth.column('offer_id'), value_set=self.index.offer_ids).to_numpy()
            self.floors[positions] = np.maximum(self.floors[positions], kth.column('score').to_numpy())

    def result(self) -> pa.RecordBatch:
        return merge_top_k(self._parts, self.top_k)


def to_match_rows(matches: pa.RecordBatch, config: ScoringConfig, *, ranked: bool) -> pa.RecordBatch:
    """Block-form matches as rows of the MATCHES schema (offer ids, the weights used, the rank).

    With ``ranked``, ``matches`` must hold all the matches kept for their offers (the top-K merge
    does) and ``rank`` is each one's position in its offer; otherwise ``rank`` is null.
    """
    order, rank = _order_within_offer(matches)
    ordered = matches.take(pa.array(order))
    n = ordered.num_rows
    columns = {
        'offer_id': ordered.column('offer_id'),
        'candidate_id': ordered.column('candidate_id'),
        'score': ordered.column('score'),
        'rank': pa.array(rank.astype(np.int32)) if ranked else pa.nulls(n, pa.int32()),
        **{f'score_{c}': ordered.column(f'score_{c}') for c in SCORE_COMPONENTS},
        'distance_km': ordered.column('distance_km'),
        # One JSON string for the whole run, dictionary-encoded: 4 bytes a row until it is written.
        'weights': pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)),
                                                  pa.array([config.weights_json()])),
    }
    fields = [f.with_type(columns[f.name].type) for f in MATCHES.arrow_schema()]
    return pa.RecordBatch.from_arrays([columns[f.name] for f in fields], schema=pa.schema(fields))

import datetime
import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from transforms import schemas
from transforms import scoring
from transforms.taxonomy import esco_skills

SKILLS = [skill_id for skill_id, _ in esco_skills()[:12]]

_candidate = st.fixed_dictionaries({
    'skills': st.lists(st.sampled_from(SKILLS), max_size=8, unique=True),
    'latitude': st.floats(41.0, 51.5), 'longitude': st.floats(-5.0, 9.5),
    'years_experience': st.floats(0, 40), 'expected_salary': st.floats(15_000, 120_000),
    'contract_types': st.lists(st.sampled_from(schemas.CONTRACT_TYPES), min_size=1, max_size=3, unique=True),
})
_offer = st.fixed_dictionaries({
    'required_skills': st.lists(st.sampled_from(SKILLS), max_size=5, unique=True),
    'nice_to_have_skills': st.lists(st.sampled_from(SKILLS), max_size=3, unique=True),
    'latitude': st.floats(41.0, 51.5), 'longitude': st.floats(-5.0, 9.5),
    'min_experience_years': st.sampled_from([0.0, 1.0, 2.5, 5.0, 10.0]),
    'salary_max': st.floats(20_000, 100_000), 'contract_type': st.sampled_from(schemas.CONTRACT_TYPES),
    'minimum_match_score': st.floats(0, 1),
})


def _candidates(rows):
    full = [{'candidate_id': f'C{i:04d}', 'first_name': 'A', 'last_name': 'B', 'email': 'a@b.fr', 'city': 'X',
             'languages': ['fr'], 'last_contact_date': datetime.date(2026, 1, 1), **r} for i, r in enumerate(rows)]
    return pa.RecordBatch.from_pylist(full, schema=schemas.CANDIDATES.arrow_schema())


def _offers(rows):
    full = [{'offer_id': f'O{i:03d}', 'employer_siret': '73282932000074', 'title': 'T', 'city': 'X',
             'salary_min': r['salary_max'] * 0.8, **r} for i, r in enumerate(rows)]
    return pa.RecordBatch.from_pylist(full, schema=schemas.OFFERS.arrow_schema())


def _reference(cands, offers, config):
    """Every pair scored one at a time by the plain-Python formula."""
    return {(c['candidate_id'], o['offer_id']): scoring.score_pair(c, o, config)
            for c in cands.to_pylist() for o in offers.to_pylist()}


@settings(max_examples=60, deadline=None)
@given(cands=st.lists(_candidate, min_size=1, max_size=12), offers=st.lists(_offer, min_size=1, max_size=6))
def test_kernel_agrees_with_the_per_pair_formula(cands, offers):
    cands, offers = _candidates(cands), _offers(offers)
    config = scoring.ScoringConfig.create()
    index = scoring.OfferIndex.build(offers)
    got = scoring.score_block(scoring.CandidateBlock.build(cands, index), index, config)
    expected = _reference(cands, offers, config)
    for i, cid in enumerate(cands.column('candidate_id').to_pylist()):
        for j, oid in enumerate(offers.column('offer_id').to_pylist()):
            ref = expected[(cid, oid)]
            for name in ('score', *schemas.SCORE_COMPONENTS):
                assert got[name][i, j] == pytest.approx(ref[name], abs=2e-4), (name, cid, oid)
            assert got['distance_km'][i, j] == pytest.approx(ref['distance_km'], abs=0.05)


def test_distance_is_accurate_for_near_and_far_points():
    config = scoring.ScoringConfig.create()
    base = {'skills': [], 'years_experience': 1.0, 'expected_salary': 30_000.0, 'contract_types': ['CDI']}
    # Paris - Paris + 100 m east, Paris - Lyon (391.5 km), Paris - Marseille (660.5 km)
    cands = _candidates([{**base, 'latitude': 48.8566, 'longitude': 2.3522 + 0.1 / 73.2},
                         {**base, 'latitude': 45.7640, 'longitude': 4.8357},
                         {**base, 'latitude': 43.2965, 'longitude': 5.3698}])
    offer = {'required_skills': [], 'nice_to_have_skills': [], 'latitude': 48.8566, 'longitude': 2.3522,
             'min_experience_years': 0.0, 'salary_max': 40_000.0, 'contract_type': 'CDI', 'minimum_match_score': 0.0}
    index = scoring.OfferIndex.build(_offers([offer]))
    got = scoring.score_block(scoring.CandidateBlock.build(cands, index), index, config)['distance_km'][:, 0]
    exact = [scoring.haversine_km(48.8566, 2.3522, c['latitude'], c['longitude']) for c in cands.to_pylist()]
    assert got[0] == pytest.approx(0.1, abs=0.005)
    assert got[1] == pytest.approx(exact[1], abs=0.01) and 385 < exact[1] < 395
    assert got[2] == pytest.approx(exact[2], abs=0.01) and 655 < exact[2] < 665


@settings(max_examples=40, deadline=None)
@given(cands=st.lists(_candidate, min_size=1, max_size=30), offers=st.lists(_offer, min_size=1, max_size=5),
       top_k=st.integers(1, 6), budget=st.integers(1, 40), split=st.integers(1, 29))
def test_thresholds_and_top_k_are_exact_whatever_the_blocking(cands, offers, top_k, budget, split):
    cands, offers = _candidates(cands), _offers(offers)
    config = scoring.ScoringConfig.create(top_k=top_k)
    index = scoring.OfferIndex.build(offers)
    # Score in two batches and small blocks, then merge: must equal the exact top K of all pairs.
    parts = [block for batch in (cands.slice(0, split), cands.slice(split))
             for _, block in scoring.score_candidates(batch, index, config, pair_budget=budget)]
    merged = scoring.to_match_rows(scoring.merge_top_k(parts, top_k), config, ranked=True)
    got = [(r['offer_id'], r['rank'], r['candidate_id']) for r in merged.to_pylist()]
    # Reference: the kernel's own full score matrix (so float32 ties are identical), ranked in Python.
    scores = scoring.score_block(scoring.CandidateBlock.build(cands, index), index, config)['score']
    ids = cands.column('candidate_id').to_pylist()
    expected = []
    for j, oid in enumerate(offers.column('offer_id').to_pylist()):
        kept = sorted((-scores[i, j], ids[i]) for i in range(len(ids)) if scores[i, j] >= index.thresholds[j])
        expected += [(oid, rank, cid) for rank, (_, cid) in enumerate(kept[:top_k], start=1)]
    assert got == expected


def test_without_top_k_every_pair_reaching_the_threshold_is_kept_and_unranked():
    rng = np.random.default_rng(3)
    cands = _candidates([{'skills': list(rng.choice(SKILLS, 4, replace=False)), 'latitude': 48.85, 'longitude': 2.35,
                          'years_experience': float(rng.integers(0, 10)), 'expected_salary': 40_000.0,
                          'contract_types': ['CDI']} for _ in range(40)])
    offers = _offers([{'required_skills': SKILLS[:3], 'nice_to_have_skills': [], 'latitude': 48.86, 'longitude': 2.34,
                       'min_experience_years': 5.0, 'salary_max': 45_000.0, 'contract_type': 'CDI',
                       'minimum_match_score': t} for t in (0.0, 0.7, 0.95)])
    config = scoring.ScoringConfig.create()
    index = scoring.OfferIndex.build(offers)
    parts = [b for _, b in scoring.score_candidates(cands, index, config, pair_budget=7)]
    rows = scoring.to_match_rows(pa.concat_batches(parts), config, ranked=False).to_pylist()
    reference = _reference(cands, offers, config)
    thresholds = dict(zip(offers.column('offer_id').to_pylist(), (0.0, 0.7, 0.95)))
    expected = {k for k, v in reference.items() if v['score'] >= thresholds[k[1]] + 1e-4}
    borderline = {k for k, v in reference.items() if abs(v['score'] - thresholds[k[1]]) <= 1e-4}
    got = {(r['candidate_id'], r['offer_id']) for r in rows}
    assert expected <= got <= expected | borderline
    assert len({(r['offer_id'], r['candidate_id']) for r in rows}) == len(rows)
    assert all(r['rank'] is None for r in rows)
    assert {r['weights'] for r in rows} == {config.weights_json()}


def test_pairs_scored_counts_the_full_cross_product():
    cands = _candidates([{'skills': [], 'latitude': 45.0, 'longitude': 3.0, 'years_experience': 1.0,
                          'expected_salary': 1.0, 'contract_types': ['CDD']}] * 25)
    offers = _offers([{'required_skills': [SKILLS[0]], 'nice_to_have_skills': [], 'latitude': 45.0, 'longitude': 3.0,
                       'min_experience_years': 0.0, 'salary_max': 2.0, 'contract_type': 'CDI',
                       'minimum_match_score': 1.0}] * 4)
    index = scoring.OfferIndex.build(offers)
    out = list(scoring.score_candidates(cands, index, scoring.ScoringConfig.create(), pair_budget=10))
    assert sum(pairs for pairs, _ in out) == 100
    assert sum(b.num_rows for _, b in out) == 0  # a skill is missing and the contract differs: no match


def test_weights_are_normalised_and_validated():
    config = scoring.ScoringConfig.create(weights={'distance': 0.0, 'contract': 0.0})
    assert math.isclose(sum(config.weights), 1.0)
    for bad, message in [({'colour': 1.0}, 'unknown component'), ({'salary': -1}, 'finite numbers >= 0'),
                         ({c: 0 for c in schemas.SCORE_COMPONENTS}, 'at least one weight')]:
        with pytest.raises(ValueError, match=message):
            scoring.ScoringConfig.create(weights=bad)
    with pytest.raises(ValueError, match='top_k'):
        scoring.ScoringConfig.create(top_k=0)
    with pytest.raises(ValueError, match='max_distance_km'):
        scoring.ScoringConfig.create(max_distance_km=-3)


@settings(max_examples=40, deadline=None)
@given(cands=st.lists(_candidate, min_size=1, max_size=40), offers=st.lists(_offer, min_size=1, max_size=5),
       top_k=st.integers(1, 5), budget=st.integers(1, 30), merge_rows=st.integers(1, 20))
def test_running_top_k_with_rising_floors_equals_the_exact_top_k(cands, offers, top_k, budget, merge_rows):
    cands, offers = _candidates(cands), _offers(offers)
    config = scoring.ScoringConfig.create(top_k=top_k)
    index = scoring.OfferIndex.build(offers)
    running = scoring.TopKPerOffer(index, top_k, min_merge_rows=merge_rows)
    for batch in pa.Table.from_batches([cands]).to_batches(max_chunksize=7):
        for _, block in scoring.score_candidates(batch, index, config, pair_budget=budget, floors=running.floors):
            running.add(block)
    assert (running.floors >= index.thresholds).all()
    exact = scoring.merge_top_k([b for _, b in scoring.score_candidates(cands, index, config)], top_k)
    assert running.result().to_pylist() == exact.to_pylist()

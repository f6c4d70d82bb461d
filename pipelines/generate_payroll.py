"""Seeded sample payroll data: employees, establishments, contracts, one month's variable elements
and withholding rates, following ``transforms.schemas`` exactly.

The same guarantees as ``pipelines.generate``: deterministic (rows drawn in fixed blocks, each from its
own seeded generator, so the chunk size never changes a row), streaming (chunk by chunk, memory flat
in the number of employees), published after write, local or ``gs://``.

What the data looks like: one establishment per 100 employees, a few large and many small,
three per company (the company headcount is their sum: companies fall on both sides of the 11 and
50 thresholds), 5 % of establishments in
Alsace-Moselle; 18 % cadres; 82 % full time, the rest 24 to 32 hours; salaries from the SMIC up, cadres
higher; 12 % fixed-term contracts, some ending during the month; 1.5 % hired during the month; a third
of the employees with overtime, a bonus or unpaid absence that month; three quarters with a personal
withholding rate. NIRs are valid (key as DOMAIN.md says), SIRETs and SIRENs pass their Luhn keys.

    hrbatch generate --output data --employees 100000 --period 2026-11
"""
import functools
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import generate
from transforms import schemas
from transforms.payroll_inputs import month_bounds
from transforms.payroll_rules import period_start

DATASETS = ('employees', 'establishments', 'contracts', 'variable_elements', 'withholding_rates')
EMPLOYEES_PER_ESTABLISHMENT = 100
ESTABLISHMENTS_PER_COMPANY = 3
_EMPLOYEES_STREAM, _ESTABLISHMENTS_STREAM, _VARIABLES_STREAM, _CONTACTS_STREAM = 20, 21, 22, 23
_SMIC_MONTHLY_35H = 1867.03  # 12.31 x 151.67: generated salaries start at the SMIC of June 2026
_PART_TIME_HOURS = np.array([24.0, 28.0, 30.0, 32.0])
_AT_MP_RATES = np.array([0.8, 1.1, 1.5, 2.2, 3.1, 4.4])
_MOBILITY_RATES = np.array([0.0, 1.0, 1.6, 2.0, 2.95, 3.2])


def establishment_count(employees: int) -> int:
    return max(1, -(-employees // EMPLOYEES_PER_ESTABLISHMENT))


def establishment_of(numbers: np.ndarray, establishments: int) -> np.ndarray:
    """A few large establishments and a long tail of small ones (Zipf 2), so that companies fall on
    both sides of the 11 and 50 employee thresholds; deterministic in the employee number."""
    weights = 1.0 / np.arange(1, establishments + 1) ** 2.0
    cumulative = np.cumsum(weights) / weights.sum()
    spread = (numbers * 0.6180339887498949) % 1.0
    return np.minimum(np.searchsorted(cumulative, spread), establishments - 1)


@functools.lru_cache(maxsize=4)
def establishments_table(employees: int, seed: int) -> pa.Table:
    n = establishment_count(employees)
    rng = generate.stream_rng(seed, _ESTABLISHMENTS_STREAM)
    companies = np.arange(n) // ESTABLISHMENTS_PER_COMPANY
    siren_bodies = rng.integers(10_000_000, 35_000_000, size=companies.max() + 1)  # clear of La Poste's 356...
    sirets = [generate.make_siret(int(siren_bodies[c]), 10 + i % ESTABLISHMENTS_PER_COMPANY)
              for i, c in enumerate(companies)]
    staff = np.bincount(establishment_of(np.arange(1, employees + 1), n), minlength=n)
    headcount = np.bincount(companies, weights=staff).astype(np.int64)[companies]
    return pa.table({
        'establishment_siret': pa.array(sirets, pa.string()),
        'company_siren': pa.array([s[:9] for s in sirets], pa.string()),
        'name': pa.array([f'Établissement {i + 1}' for i in range(n)], pa.string()),
        'company_headcount': pa.array(headcount, pa.int64()),
        'at_mp_rate': rng.choice(_AT_MP_RATES, size=n),
        'mobility_rate': rng.choice(_MOBILITY_RATES, size=n),
    }, schema=schemas.ESTABLISHMENTS.arrow_schema())


def _alsace_moselle(seed: int, establishments: int) -> np.ndarray:
    return generate.stream_rng(seed, _ESTABLISHMENTS_STREAM, 1).random(establishments) < 0.05


def _department(numbers: np.ndarray) -> np.ndarray:
    return np.where(numbers == 20, 21, numbers)  # Corsica is 2A/2B in a NIR, never 20


def _nirs(sex: np.ndarray, birth: np.ndarray, department: np.ndarray, commune: np.ndarray,
          order: np.ndarray) -> list[str]:
    bodies = [f'{s}{d.year % 100:02d}{d.month:02d}{dep:02d}{c:03d}{o:03d}'
              for s, d, dep, c, o in zip(sex, birth.tolist(), department, commune, order)]
    return [b + f'{97 - int(b) % 97:02d}' for b in bodies]


def _block(block: int, employees: int, period: str, seed: int) -> dict[str, pa.Table]:
    """Every dataset's rows for the employees of one RNG block."""
    n = generate.RNG_BLOCK_ROWS
    numbers = np.arange(block * n + 1, min((block + 1) * n, employees) + 1)
    rng = generate.stream_rng(seed, _EMPLOYEES_STREAM, block)
    draws = {name: rng.random(n)[:len(numbers)] for name in (
        'cadre', 'low', 'cdd', 'hired', 'ends', 'part', 'salary', 'variables', 'overtime', 'bonus', 'absence', 'pas')}
    k = len(numbers)
    ids = pa.array([f'E{x:08d}' for x in numbers], pa.string())
    names = generate.person_names()
    sites = establishments_table(employees, seed)
    site = establishment_of(numbers, sites.num_rows)
    first, last = month_bounds(period)
    birth = np.datetime64('1960-01-01') + rng.integers(0, 365 * 45, size=n)[:k].astype('timedelta64[D]')
    cadre = draws['cadre'] < 0.18
    nirs = pa.array(_nirs(rng.integers(1, 3, size=n)[:k], birth.astype('datetime64[D]').astype(object),
                          _department(rng.integers(1, 96, size=n)[:k]), rng.integers(1, 999, size=n)[:k],
                          rng.integers(1, 999, size=n)[:k]), pa.string())
    last_name = rng.integers(len(names.last), size=n)[:k]
    first_name = rng.integers(len(names.first), size=n)[:k]
    contacts = generate.contact_details(seed, _CONTACTS_STREAM, block, n)
    employees_table = pa.table({
        'employee_id': ids,
        'nir': nirs,
        'last_name': names.last.take(pa.array(last_name)),
        'first_name': names.first.take(pa.array(first_name)),
        'birth_date': pa.array(birth, pa.date32()),
        'email': pc.binary_join_element_wise(
            pc.binary_join_element_wise(names.first_slug.take(pa.array(first_name)),
                                        names.last_slug.take(pa.array(last_name)),
                                        pa.array(numbers).cast(pa.string()), '.'), 'example.com', '@'),
        'phone': contacts['phone'].slice(0, k),
        'postcode': contacts['postcode'].slice(0, k),
        'cadre': pa.array(cadre),
        'alsace_moselle': pa.array(_alsace_moselle(seed, sites.num_rows)[site]),
        'low_qualification': pa.array((draws['low'] < 0.15) & ~cadre),
    }, schema=schemas.EMPLOYEES.arrow_schema())

    cdd = draws['cdd'] < 0.12
    hired = draws['hired'] < 0.015
    month_days = (last - first).days + 1
    start_offsets = rng.integers(1, 3650, size=n)[:k]
    start = np.where(hired, np.datetime64(first) + rng.integers(1, month_days, size=n)[:k].astype('timedelta64[D]'),
                     np.datetime64(first) - start_offsets.astype('timedelta64[D]'))
    end_in_month = np.datetime64(first) + rng.integers(0, month_days, size=n)[:k].astype('timedelta64[D]')
    end_later = np.datetime64(last) + rng.integers(1, 400, size=n)[:k].astype('timedelta64[D]')
    end = np.where(draws['ends'] < 0.3, np.maximum(end_in_month, start), end_later)
    part_time = draws['part'] < 0.18
    hours = np.where(part_time, _PART_TIME_HOURS[rng.integers(0, 4, size=n)[:k]], 35.0)
    level = np.exp(draws['salary'] * 1.6) * np.where(cadre, 1.9, 1.0)   # 1 to 5 x SMIC, cadres higher
    salary = np.round(_SMIC_MONTHLY_35H * level * hours / 35.0, 2)
    contracts_table = pa.table({
        'contract_id': pa.array([f'C{x:08d}' for x in numbers], pa.string()),
        'employee_id': ids,
        'establishment_siret': sites.column('establishment_siret').take(pa.array(site)),
        'contract_type': pa.array(np.where(cdd, 'CDD', 'CDI').astype(object), pa.string()),
        'start_date': pa.array(start, pa.date32()),
        'end_date': pa.array(end, pa.date32(), mask=~cdd),
        'weekly_hours': pa.array(hours),
        'monthly_salary': pa.array(salary),
    }, schema=schemas.CONTRACTS.arrow_schema())

    has_variables = draws['variables'] < 0.35
    overtime = np.where(~part_time & (draws['overtime'] < 0.5), np.round(draws['overtime'] * 32, 1), 0.0)
    bonus = np.where(draws['bonus'] < 0.4, np.round(100 + draws['bonus'] * 3500, 0), 0.0)
    absence = np.where(draws['absence'] < 0.15, 7.0 * (1 + (draws['absence'] < 0.05)), 0.0)
    rows = np.flatnonzero(has_variables)
    variables_table = pa.table({
        'employee_id': ids.take(pa.array(rows)), 'period': pa.array([period] * len(rows), pa.string()),
        'overtime_hours': pa.array(overtime[rows]), 'bonus': pa.array(bonus[rows]),
        'unpaid_absence_hours': pa.array(absence[rows]),
    }, schema=schemas.VARIABLE_ELEMENTS.arrow_schema())
    with_rate = np.flatnonzero(draws['pas'] < 0.75)
    rates_table = pa.table({
        'employee_id': ids.take(pa.array(with_rate)), 'period': pa.array([period] * len(with_rate), pa.string()),
        'pas_rate': pa.array(np.round(draws['pas'][with_rate] * 30, 1)),
    }, schema=schemas.WITHHOLDING_RATES.arrow_schema())
    return {'employees': employees_table, 'contracts': contracts_table, 'variable_elements': variables_table,
            'withholding_rates': rates_table}


def _chunks(dataset: str, employees: int, period: str, seed: int, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    blocks = -(-employees // generate.RNG_BLOCK_ROWS)
    pending = []
    for block in range(blocks):
        pending.append(_block(block, employees, period, seed)[dataset])
        if sum(t.num_rows for t in pending) >= chunk_rows or block == blocks - 1:
            yield from pa.concat_tables(pending).combine_chunks().to_batches(max_chunksize=chunk_rows)
            pending = []


def generate_payroll(output_dir: str, *, employees: int, period: str = '2026-11', seed: int = generate.DEFAULT_SEED,
                     formats: Sequence[str] = ('parquet',),
                     chunk_rows: int = generate.DEFAULT_CHUNK_ROWS, rows: dict | None = None) -> dict[str, dict[str, str]]:
    """Writes the five payroll datasets for ``employees`` employees and ``period``; {dataset: {format: path}}.
    ``rows``, if given, receives the number of rows of each dataset."""
    generate.check_output_dir(output_dir)
    formats = generate.check_formats(formats)
    period_start(period)
    dataset_schemas = {'employees': schemas.EMPLOYEES, 'establishments': schemas.ESTABLISHMENTS,
                       'contracts': schemas.CONTRACTS, 'variable_elements': schemas.VARIABLE_ELEMENTS,
                       'withholding_rates': schemas.WITHHOLDING_RATES}
    written = {}
    for dataset in DATASETS:
        if dataset == 'establishments':
            batches = iter(establishments_table(employees, seed).to_batches())
        else:
            batches = _chunks(dataset, employees, period, seed, chunk_rows)
        paths = {f: generate.output_path(str(output_dir), dataset, f) for f in formats}
        count = generate.write_dataset(batches, paths, dataset_schemas[dataset], seed, chunk_rows)
        if rows is not None:
            rows[dataset] = count
        written[dataset] = paths
    return written


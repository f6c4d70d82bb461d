"""hrbatch against the Celery jobs it replaces, on the same machine, the same data and the same database.

    bash benchmarks/celery_baseline/install.sh          # once: redis-server and the Celery lock
    .venv/bin/python benchmarks/compare.py               # pipelines: 200,000 x 500, 200,000 employees; Celery: a sample
    .venv/bin/python benchmarks/compare.py --candidates 20000 --offers 100 --employees 20000 --celery_offers 100 --celery_employees 20000

In one run, on generated data (cached in benchmarks/.data/) loaded into one SQLite database first
(untimed: a Celery team has its data in its database already):

Celery works on a sample (``--celery_offers`` offers against every candidate, the first
``--celery_employees`` employees): the cost of a task does not depend on how many others run, so its
rate is the same, and the whole set would keep it busy for hours. The checks compare that sample.

  matching  Celery: one ``match_offer`` task per offer (benchmarks/celery_baseline/tasks.py) on a real
            Redis broker and result backend and a prefork worker of concurrency 2, loading every
            candidate from the database, scoring chunks of 50 with ``transforms.scoring.score_pair``,
            upserting each match, reporting PROGRESS after each chunk;
            hrbatch: ``python -m pipelines.matching`` (no --top_k: every match reaching the offer's
            minimum is kept, as Celery keeps them), DirectRunner, --direct_num_workers 2,
            multi_processing, Parquet and the same SQLite database.
  payroll   Celery: one ``pay_employees`` task per 50 employees, reading their rows from the database
            and computing with the project's payslip engine, upserting payslips and lines;
            hrbatch: ``python -m pipelines.payroll``, same runner options, Parquet and the same database.

It checks that both produce the same matches (scores within 1e-5; a pair scoring within 1e-5 of its
offer's minimum may be kept by one side only: the kernel computes in float32, ``score_pair`` in float64;
those are counted) and the same payslips and payslip lines (every column equal, exact cents), then
prints throughput, wall time and peak memory of each, with the ratios, and ends with one JSON line.

What is timed: Celery, from sending the tasks to the last result (the worker and Redis are already up,
as in production); hrbatch, the whole ``python -m pipelines...`` process, start-up included. Peak
memory: the worker's process tree plus Redis during the Celery phase; the pipeline's process tree.
Nothing here asserts a time.
"""
import argparse
import json
import math
import os
import shutil
import sqlite3
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCHMARKS)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCHMARKS)

from memory import run_logged  # noqa: E402
from pipelines import generate  # noqa: E402
from pipelines import generate_payroll  # noqa: E402

PERIOD = '2026-11'
SCORE_TOLERANCE = 1e-5
COMPONENTS = ('required_skills', 'nice_to_have_skills', 'experience', 'distance', 'salary', 'contract')


# --- data -------------------------------------------------------------------------------------------

def row_group_rows(candidates: int) -> int:
    """Parquet row groups (the pipeline's parallel read unit): at least 8 per file, at most 32,768 rows."""
    return max(256, min(32_768, math.ceil(candidates / 8)))


def matching_data(cache: str, candidates: int, offers: int, seed: int) -> tuple[str, str]:
    rows = row_group_rows(candidates)
    directory = os.path.join(cache, f'c{candidates}-o{offers}-s{seed}-g{rows}')
    paths = (os.path.join(directory, 'candidates.parquet'), os.path.join(directory, 'offers.parquet'))
    if not all(os.path.exists(p) for p in paths):
        generate.generate(directory, candidates=candidates, offers=offers, seed=seed, formats=('parquet',),
                          chunk_rows=rows)
    return paths


def payroll_data(cache: str, employees: int, seed: int) -> str:
    """The same cache as benchmarks/payroll.py."""
    directory = os.path.join(cache, f'payroll-{employees}-{seed}-{PERIOD}')
    if not os.path.exists(os.path.join(directory, 'withholding_rates.parquet')):
        generate_payroll.generate_payroll(directory, employees=employees, period=PERIOD, seed=seed)
    return directory


# --- Celery -----------------------------------------------------------------------------------------

def celery_matching(services, database: str, timeout: float, sample_offers: int) -> dict:
    from celery import group
    from celery_baseline.services import ProgressObserver
    from celery_baseline.services import Sampler
    from celery_baseline.tasks import CHUNK
    from celery_baseline.tasks import match_offer
    conn = sqlite3.connect(database)
    offer_ids = [r[0] for r in conn.execute('SELECT offer_id FROM offers ORDER BY offer_id LIMIT ?', (sample_offers,))]
    candidates = conn.execute('SELECT COUNT(*) FROM candidates').fetchone()[0]
    conn.close()
    with ProgressObserver(services.redis_url) as progress, Sampler(services.pids()) as sampler:
        start = time.perf_counter()
        results = group(match_offer.s(offer_id) for offer_id in offer_ids).apply_async().get(timeout=timeout)
        seconds = time.perf_counter() - start
    pairs = sum(r['pairs'] for r in results)
    return {'pairs': pairs, 'matches': sum(r['matches'] for r in results), 'seconds': seconds,
            'pairs_per_s': pairs / seconds, 'peak_rss_mb': sampler.peak / 2**20, 'tasks': len(offer_ids),
            'progress_updates': progress.count,
            'progress_expected': len(offer_ids) * math.ceil(candidates / CHUNK)}


def celery_payroll(services, database: str, timeout: float, sample_employees: int) -> dict:
    from celery import group
    from celery_baseline.services import Sampler
    from celery_baseline.tasks import pay_employees
    conn = sqlite3.connect(database)
    ids = [r[0] for r in conn.execute('SELECT employee_id FROM employees ORDER BY employee_id LIMIT ?',
                                      (sample_employees,))]
    conn.close()
    chunks = [ids[i:i + 50] for i in range(0, len(ids), 50)]
    with Sampler(services.pids()) as sampler:
        start = time.perf_counter()
        results = group(pay_employees.s(chunk, PERIOD) for chunk in chunks).apply_async().get(timeout=timeout)
        seconds = time.perf_counter() - start
    paid = sum(r['paid'] for r in results)
    return {'paid': paid, 'refused': sum(r['refused'] for r in results), 'seconds': seconds,
            'payslips_per_s': paid / seconds, 'peak_rss_mb': sampler.peak / 2**20, 'tasks': len(chunks)}


# --- the pipelines ------------------------------------------------------------------------------------

def runner_options(workers: int) -> list[str]:
    return ['--direct_num_workers', str(workers), '--direct_running_mode', 'multi_processing']


def pipeline_matching(candidates: str, offers: str, database: str, work: str, workers: int) -> dict:
    output = os.path.join(work, 'pipeline-matching')
    cmd = [sys.executable, '-m', 'pipelines.matching', '--candidates', candidates, '--offers', offers,
           '--output', output, '--database', f'sqlite:///{database}',
           '--ledger', f'sqlite:///{os.path.join(work, "ledger.db")}', '--run_id', 'compare-matching',
           *runner_options(workers)]
    seconds, peak, text = run_logged(cmd, os.path.join(work, 'pipeline-matching.log'))
    pairs = int(text.split('pairs scored')[1].split()[0].replace(',', ''))
    matches = int(text.split('matches written')[1].split()[0].replace(',', ''))
    return {'pairs': pairs, 'matches': matches, 'seconds': seconds, 'pairs_per_s': pairs / seconds,
            'peak_rss_mb': peak, 'command': cmd}


def pipeline_payroll(directory: str, database: str, work: str, workers: int) -> dict:
    output = os.path.join(work, 'pipeline-payroll')
    cmd = [sys.executable, '-m', 'pipelines.payroll', '--period', PERIOD, '--output', output,
           '--database', f'sqlite:///{database}', '--ledger', f'sqlite:///{os.path.join(work, "ledger.db")}',
           '--run_id', 'compare-payroll', *runner_options(workers)]
    for name in generate_payroll.DATASETS:
        cmd += [f'--{name}', os.path.join(directory, f'{name}.parquet')]
    seconds, peak, text = run_logged(cmd, os.path.join(work, 'pipeline-payroll.log'))
    paid = int(text.split(' employees paid')[0].rsplit(' ', 1)[1].replace(',', ''))
    return {'paid': paid, 'seconds': seconds, 'payslips_per_s': paid / seconds, 'peak_rss_mb': peak,
            'command': cmd}


# --- the checks -------------------------------------------------------------------------------------

def compare_matches(database: str, sample_offers: int) -> dict:
    """Celery's ``celery_matches`` against the pipeline's ``matches`` of the same offers (the first
    ``sample_offers``); raises on a real difference."""
    conn = sqlite3.connect(database)
    minimum = dict(conn.execute('SELECT offer_id, minimum_match_score FROM offers'))
    columns = ['score', *(f'score_{c}' for c in COMPONENTS)]
    select = ', '.join(columns)
    celery = {(o, c): v for o, c, *v in conn.execute(f'SELECT offer_id, candidate_id, {select} FROM celery_matches')}
    done = {o for o, _ in celery}  # Celery scored a sample of the offers: compare those
    done |= {o for (o,) in conn.execute('SELECT offer_id FROM offers ORDER BY offer_id LIMIT ?', (sample_offers,))}
    beam = {(o, c): v for o, c, *v in conn.execute(f'SELECT offer_id, candidate_id, {select} FROM matches') if o in done}
    conn.close()
    borderline, problems, max_difference = 0, [], 0.0
    for key in celery.keys() ^ beam.keys():
        score = (celery.get(key) or beam.get(key))[0]
        if abs(score - minimum[key[0]]) <= SCORE_TOLERANCE:
            borderline += 1
        else:
            problems.append(f'{key} kept only by {"Celery" if key in celery else "the pipeline"} '
                            f'(score {score:.7f}, minimum {minimum[key[0]]:.7f})')
    for key in celery.keys() & beam.keys():
        difference = max(abs(a - b) for a, b in zip(celery[key], beam[key]))
        max_difference = max(max_difference, difference)
        if difference > SCORE_TOLERANCE:
            problems.append(f'{key}: Celery {celery[key]} vs pipeline {beam[key]}')
    if problems:
        raise AssertionError(f'{len(problems)} matches differ, e.g.: ' + '; '.join(problems[:5]))
    return {'celery_matches': len(celery), 'pipeline_matches': len(beam),
            'common_matches': len(celery.keys() & beam.keys()), 'borderline_matches': borderline,
            'max_score_difference': max_difference}


def compare_payslips(database: str) -> dict:
    """Every column of every payslip and payslip line of the employees Celery paid equal, both ways
    (SQL EXCEPT: exact); the pipeline paid them and more."""
    from transforms import schemas
    conn = sqlite3.connect(database)
    found = {}
    for table, schema in (('payslips', schemas.PAYSLIPS), ('payslip_lines', schemas.PAYSLIP_LINES)):
        columns = ', '.join(schema.names)
        sample = 'WHERE employee_id IN (SELECT employee_id FROM celery_payslips)'
        count = {side: conn.execute(f'SELECT COUNT(*) FROM {side} {sample}').fetchone()[0]
                 for side in (table, f'celery_{table}')}
        only = {side: conn.execute(f'SELECT COUNT(*) FROM (SELECT {columns} FROM {side} {sample} EXCEPT '
                                   f'SELECT {columns} FROM {other} {sample})').fetchone()[0]
                for side, other in ((table, f'celery_{table}'), (f'celery_{table}', table))}
        if any(only.values()) or not count[table]:
            raise AssertionError(f'{table}: {count} rows; rows found on one side only: {only}')
        found[table] = count[table]
    conn.close()
    return found


# --- the run ----------------------------------------------------------------------------------------

def run(*, candidates: int, offers: int, employees: int, celery_offers: int, celery_employees: int,
        workers: int = 2, seed: int = 7, cache: str, work: str, timeout: float = 6 * 3600, log=print) -> dict:
    """Runs both sides of both operations in ``work``; returns the figures (see ``main``)."""
    from celery_baseline import db
    from celery_baseline.services import Services
    candidates_path, offers_path = matching_data(cache, candidates, offers, seed)
    payroll_dir = payroll_data(cache, employees, seed)
    database = os.path.join(work, 'hrbatch.db')
    start = time.perf_counter()
    loaded = db.load_inputs(database, {'candidates': candidates_path, 'offers': offers_path,
                                       **{name: os.path.join(payroll_dir, f'{name}.parquet')
                                          for name in generate_payroll.DATASETS}})
    db.create_output_tables(database)
    log(f'Loaded the inputs into {database} (untimed, {time.perf_counter() - start:.1f} s): '
        + ', '.join(f'{table} {rows:,}' for table, rows in loaded.items()))

    with Services(database, work, concurrency=workers) as services:
        log(f'Redis at {services.redis_url}, Celery worker (prefork, concurrency {workers}) ready')
        cm = celery_matching(services, database, timeout, celery_offers)
        log(f'Celery matching    {cm["pairs_per_s"]:>13,.0f} pairs/s     {cm["seconds"]:8.1f} s  '
            f'peak {cm["peak_rss_mb"]:7,.0f} MiB  ({cm["tasks"]} tasks, {cm["matches"]:,} matches, '
            f'{cm["progress_updates"]:,} progress updates)')
        cp = celery_payroll(services, database, timeout, celery_employees)
        log(f'Celery payroll     {cp["payslips_per_s"]:>13,.0f} payslips/s  {cp["seconds"]:8.1f} s  '
            f'peak {cp["peak_rss_mb"]:7,.0f} MiB  ({cp["tasks"]} tasks, {cp["paid"]:,} payslips)')
    pm = pipeline_matching(candidates_path, offers_path, database, work, workers)
    log(f'hrbatch matching   {pm["pairs_per_s"]:>13,.0f} pairs/s     {pm["seconds"]:8.1f} s  '
        f'peak {pm["peak_rss_mb"]:7,.0f} MiB  ({pm["matches"]:,} matches)')
    pp = pipeline_payroll(payroll_dir, database, work, workers)
    log(f'hrbatch payroll    {pp["payslips_per_s"]:>13,.0f} payslips/s  {pp["seconds"]:8.1f} s  '
        f'peak {pp["peak_rss_mb"]:7,.0f} MiB  ({pp["paid"]:,} payslips)')

    if cm['pairs'] != candidates * min(offers, celery_offers):
        raise AssertionError(f'Celery scored {cm["pairs"]:,} pairs, not every candidate against {celery_offers} offers')
    matches = compare_matches(database, celery_offers)
    payslips = compare_payslips(database)
    if cp['paid'] != payslips['payslips']:
        raise AssertionError(f'Celery paid {cp["paid"]:,} employees, the pipeline paid {payslips["payslips"]:,} of them')
    log(f'Same matches: {matches["common_matches"]:,} identical (scores within {SCORE_TOLERANCE:g}, largest '
        f'difference {matches["max_score_difference"]:.1e}), {matches["borderline_matches"]} kept by one side only '
        f'at the threshold (within {SCORE_TOLERANCE:g} of the offer\'s minimum)')
    log(f'Same payslips: {payslips["payslips"]:,} payslips and {payslips["payslip_lines"]:,} lines, every column equal')
    figures = {
        'candidates': candidates, 'offers': offers, 'employees': employees, 'workers': workers,
        'celery_offers': min(offers, celery_offers), 'celery_employees': cp['paid'],
        'pairs': pm['pairs'], 'celery_pairs': cm['pairs'], 'matches': matches['common_matches'], 'borderline_matches': matches['borderline_matches'],
        'payslips': pp['paid'], 'compared_payslips': payslips['payslips'],
        'compared_payslip_lines': payslips['payslip_lines'],
        'celery_matching_pairs_per_s': round(cm['pairs_per_s']),
        'pipeline_matching_pairs_per_s': round(pm['pairs_per_s']),
        'matching_ratio_vs_celery': round(pm['pairs_per_s'] / cm['pairs_per_s'], 2),
        'celery_matching_seconds': round(cm['seconds'], 2), 'pipeline_matching_seconds': round(pm['seconds'], 2),
        'celery_matching_peak_rss_mb': round(cm['peak_rss_mb'], 1),
        'pipeline_matching_peak_rss_mb': round(pm['peak_rss_mb'], 1),
        'celery_progress_updates': cm['progress_updates'],
        'celery_payslips_per_s': round(cp['payslips_per_s']),
        'pipeline_payslips_per_s': round(pp['payslips_per_s']),
        'payroll_ratio_vs_celery': round(pp['payslips_per_s'] / cp['payslips_per_s'], 2),
        'celery_payroll_seconds': round(cp['seconds'], 2), 'pipeline_payroll_seconds': round(pp['seconds'], 2),
        'celery_payroll_peak_rss_mb': round(cp['peak_rss_mb'], 1),
        'pipeline_payroll_peak_rss_mb': round(pp['peak_rss_mb'], 1),
        'progress_expected': cm['progress_expected'],
    }
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--candidates', type=int, default=200_000)
    parser.add_argument('--offers', type=int, default=500)
    parser.add_argument('--employees', type=int, default=200_000)
    parser.add_argument('--celery_offers', type=int, default=5,
                        help='Offers Celery scores (each against every candidate): its rate per pair does not '
                             'depend on how many; the full set would take it hours.')
    parser.add_argument('--celery_employees', type=int, default=20_000,
                        help='Employees Celery pays (the first ones); its rate does not depend on how many.')
    parser.add_argument('--workers', type=int, default=2, help='Celery concurrency and --direct_num_workers.')
    parser.add_argument('--seed', type=int, default=7)
    parser.add_argument('--cache', default=os.path.join(BENCHMARKS, '.data'))
    parser.add_argument('--keep', action='store_true', help='Keep the work directory (database, logs, outputs).')
    args = parser.parse_args(argv)

    from celery_baseline.services import missing
    why = missing()
    if why:
        raise SystemExit(f'compare.py needs the Celery baseline: {why}')
    work = tempfile.mkdtemp(prefix='hrbatch-compare-')
    try:
        print(f'Data: {args.candidates:,} candidates x {args.offers:,} offers = {args.candidates * args.offers:,} '
              f'pairs; {args.employees:,} employees ({PERIOD}); {args.workers} workers each side', flush=True)
        figures = run(candidates=args.candidates, offers=args.offers, employees=args.employees,
                      celery_offers=args.celery_offers, celery_employees=args.celery_employees,
                      workers=args.workers, seed=args.seed, cache=args.cache, work=work,
                      log=lambda text: print(text, flush=True))
        if figures['celery_progress_updates'] != figures['progress_expected']:
            print(f'note: {figures["celery_progress_updates"]:,} progress updates observed, '
                  f'{figures["progress_expected"]:,} sent')
        print(f'matching: hrbatch / Celery = {figures["matching_ratio_vs_celery"]} x pairs per second   '
              f'payroll: hrbatch / Celery = {figures["payroll_ratio_vs_celery"]} x payslips per second')
        print(json.dumps(figures, sort_keys=True))
    finally:
        if args.keep:
            print(f'work directory kept: {work}')
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

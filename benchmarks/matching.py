"""Matching throughput and memory, side by side in one run.

    python benchmarks/matching.py                      # 200,000 candidates x 500 offers, then 100k/1M memory
    python benchmarks/matching.py --candidates 20000 --offers 100 --memory_sizes 10000,50000   # quick

Measures, on the same generated data:
  (a) the task-queue way (Hangfire/BullMQ/Celery jobs): a Python loop scoring one candidate-offer pair
      at a time in chunks of 50 candidates, saving each match one by one into SQLite. It is run on a
      sample of the candidates (``--task_loop_candidates``) because the full run would take hours; its
      figure is a rate (pairs per second), which does not depend on the sample size;
  (b) the bare vectorised kernel (transforms.scoring) in this process, no Beam, one core;
  (c) the matching pipeline end to end on the DirectRunner's engine with 2 workers, writing Parquet
      (and, reported separately, Parquet + SQLite);
then the peak memory of (c) with ``--top_k 100`` at two input sizes (default 100,000 and 1,000,000
candidates), which must stay nearly flat. Prints a table and ends with one JSON line of figures.
Nothing here asserts a time.
"""
import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time

import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memory import run_measured  # noqa: E402
from pipelines import generate  # noqa: E402
from transforms import scoring  # noqa: E402

CHUNK = 50  # candidates per task, as in the task-queue jobs this replaces
# Parquet row groups of 32k candidates (~10 MB): several per file even at 100,000 candidates, so
# both local workers have row groups to read at every size measured (a row group is the unit of
# parallel reading; one 100k-row group would leave a worker idle and flatter the small run's memory).
ROW_GROUP_ROWS = 32_768


def data(cache: str, candidates: int, offers: int, seed: int) -> tuple[str, str]:
    """Generated Parquet inputs, cached by size so repeated runs skip generation."""
    directory = os.path.join(cache, f'c{candidates}-o{offers}-s{seed}-g{ROW_GROUP_ROWS}')
    paths = (os.path.join(directory, 'candidates.parquet'), os.path.join(directory, 'offers.parquet'))
    if not all(os.path.exists(p) for p in paths):
        generate.generate(directory, candidates=candidates, offers=offers, seed=seed, formats=('parquet',),
                          chunk_rows=ROW_GROUP_ROWS)
    return paths


def task_loop(candidates_path: str, offers_path: str, sample: int, top_k: int | None) -> dict:
    """(a): one pair at a time, chunks of 50, each match saved with its own INSERT."""
    offers = pq.read_table(offers_path).to_pylist()
    candidates = pq.read_table(candidates_path).slice(0, sample).to_pylist()
    config = scoring.ScoringConfig.create(top_k=top_k)
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(os.path.join(tmp, 'matches.db'))
        db.execute('CREATE TABLE matches (offer_id TEXT, candidate_id TEXT, score REAL, '
                   'PRIMARY KEY (offer_id, candidate_id))')
        start = time.perf_counter()
        pairs = matches = 0
        for first in range(0, len(candidates), CHUNK):
            for candidate in candidates[first:first + CHUNK]:
                for offer in offers:
                    result = scoring.score_pair(candidate, offer, config)
                    pairs += 1
                    if result['score'] >= offer['minimum_match_score']:
                        db.execute('INSERT OR REPLACE INTO matches VALUES (?, ?, ?)',
                                   (offer['offer_id'], candidate['candidate_id'], result['score']))
                        matches += 1
            db.commit()  # one task = one chunk
        seconds = time.perf_counter() - start
        db.close()
    return {'pairs': pairs, 'seconds': seconds, 'pairs_per_second': pairs / seconds, 'matches': matches}


def kernel(candidates_path: str, offers_path: str, top_k: int | None, batch_rows: int) -> dict:
    """(b): the vectorised kernel over every candidate batch, plus the top-K merge, in this process."""
    config = scoring.ScoringConfig.create(top_k=top_k)
    index = scoring.OfferIndex.build(pq.read_table(offers_path).sort_by('offer_id'))
    workspace = scoring.Workspace(max(1, scoring.DEFAULT_PAIR_BUDGET // index.size), index)
    start = time.perf_counter()
    pairs, parts = 0, []
    for batch in pq.ParquetFile(candidates_path).iter_batches(batch_size=batch_rows):
        for scored, block in scoring.score_candidates(batch, index, config, workspace=workspace):
            pairs += scored
            parts.append(block)
        if top_k and sum(p.num_rows for p in parts) > 200_000:
            parts = [scoring.merge_top_k(parts, top_k)]
    kept = scoring.merge_top_k(parts, top_k).num_rows if top_k else sum(p.num_rows for p in parts)
    seconds = time.perf_counter() - start
    return {'pairs': pairs, 'seconds': seconds, 'pairs_per_second': pairs / seconds, 'matches': kept}


def pipeline(candidates_path: str, offers_path: str, output: str, *, top_k: int | None, database: str,
             workers: int, log: str, running_mode: str = 'multi_processing') -> dict:
    """(c): the pipeline in a subprocess, so its whole process tree's memory can be measured."""
    cmd = [sys.executable, '-m', 'pipelines.matching', '--candidates', candidates_path, '--offers', offers_path,
           '--output', output, '--database', database, '--run_id', 'benchmark',
           '--direct_num_workers', str(workers), '--direct_running_mode', running_mode]
    if top_k:
        cmd += ['--top_k', str(top_k)]
    with open(log, 'w') as handle:
        code, seconds, peak = run_measured(cmd, stdout=handle)
    if code != 0:
        raise SystemExit(f'pipeline failed with exit code {code}; see {log}')
    with open(log) as handle:
        text = handle.read()
    pairs = int(text.split('pairs scored')[1].split()[0].replace(',', ''))
    matches = int(text.split('matches written')[1].split()[0].replace(',', ''))
    return {'pairs': pairs, 'seconds': seconds, 'pairs_per_second': pairs / seconds, 'matches': matches,
            'peak_rss_mb': peak / 2**20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--candidates', type=int, default=200_000)
    parser.add_argument('--offers', type=int, default=500)
    parser.add_argument('--top_k', type=int, default=100)
    parser.add_argument('--task_loop_candidates', type=int, default=1_000)
    parser.add_argument('--memory_sizes', default='100000,1000000', help='Two candidate counts, comma-separated.')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--seed', type=int, default=7)
    parser.add_argument('--cache', default=os.path.join(ROOT, 'benchmarks', '.data'))
    args = parser.parse_args(argv)

    candidates_path, offers_path = data(args.cache, args.candidates, args.offers, args.seed)
    work = tempfile.mkdtemp(prefix='hrbatch-bench-')
    try:
        print(f'Data: {args.candidates:,} candidates x {args.offers:,} offers = '
              f'{args.candidates * args.offers:,} pairs, top_k={args.top_k}', flush=True)
        a = task_loop(candidates_path, offers_path, args.task_loop_candidates, args.top_k)
        print(f'(a) task loop      {a["pairs_per_second"]:>14,.0f} pairs/s  ({a["pairs"]:,} pairs sampled, '
              f'{a["seconds"]:.1f} s)', flush=True)
        b = kernel(candidates_path, offers_path, args.top_k, 8192)
        print(f'(b) kernel         {b["pairs_per_second"]:>14,.0f} pairs/s  ({b["seconds"]:.1f} s)', flush=True)
        c = pipeline(candidates_path, offers_path, os.path.join(work, 'c'), top_k=args.top_k, database='none',
                     workers=args.workers, log=os.path.join(work, 'c.log'))
        print(f'(c) pipeline       {c["pairs_per_second"]:>14,.0f} pairs/s  ({c["seconds"]:.1f} s wall, '
              f'peak {c["peak_rss_mb"]:,.0f} MiB, Parquet)', flush=True)
        c_sql = pipeline(candidates_path, offers_path, os.path.join(work, 'c_sql'), top_k=args.top_k,
                         database='sqlite:///' + os.path.join(work, 'c_sql.db'), workers=args.workers,
                         log=os.path.join(work, 'c_sql.log'))
        print(f'(c) + SQLite       {c_sql["pairs_per_second"]:>14,.0f} pairs/s  ({c_sql["seconds"]:.1f} s wall, '
              f'peak {c_sql["peak_rss_mb"]:,.0f} MiB, Parquet + SQLite)', flush=True)
        if c['matches'] != b['matches']:
            raise SystemExit(f'the pipeline kept {c["matches"]} matches but the kernel {b["matches"]}')

        small, large = (int(x) for x in args.memory_sizes.split(','))
        peaks = {}
        for size in (small, large):
            paths = data(args.cache, size, args.offers, args.seed)
            run = pipeline(*paths, os.path.join(work, f'm{size}'), top_k=100, database='none',
                           workers=args.workers, log=os.path.join(work, f'm{size}.log'))
            peaks[size] = run['peak_rss_mb']
            print(f'(c) memory at {size:>9,} candidates, top_k=100: peak {run["peak_rss_mb"]:,.0f} MiB '
                  f'({run["seconds"]:.1f} s)', flush=True)

        figures = {
            'candidates': args.candidates, 'offers': args.offers, 'top_k': args.top_k, 'workers': args.workers,
            'task_loop_pairs_per_second': round(a['pairs_per_second']),
            'kernel_pairs_per_second': round(b['pairs_per_second']),
            'pipeline_pairs_per_second': round(c['pairs_per_second']),
            'pipeline_sqlite_pairs_per_second': round(c_sql['pairs_per_second']),
            'pipeline_seconds': round(c['seconds'], 2),
            'pipeline_peak_rss_mb': round(c['peak_rss_mb'], 1),
            'ratio_vs_task_loop': round(c['pairs_per_second'] / a['pairs_per_second'], 2),
            'ratio_vs_kernel': round(c['pairs_per_second'] / b['pairs_per_second'], 3),
            'sqlite_ratio_vs_task_loop': round(c_sql['pairs_per_second'] / a['pairs_per_second'], 2),
            f'peak_rss_mb_{small}': round(peaks[small], 1), f'peak_rss_mb_{large}': round(peaks[large], 1),
            'memory_ratio_1m_vs_100k': round(peaks[large] / peaks[small], 3),
        }
        print(f'c/a = {figures["ratio_vs_task_loop"]}   c/b = {figures["ratio_vs_kernel"]}   '
              f'memory {large:,}/{small:,} = {figures["memory_ratio_1m_vs_100k"]}')
        print(json.dumps(figures, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

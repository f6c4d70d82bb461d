"""Local throughput of matching by DirectRunner worker count and running mode, side by side in one run.

    python benchmarks/local_scaling.py                       # 200,000 candidates x 500 offers, top 100
    python benchmarks/local_scaling.py --candidates 50000 --offers 200   # quick

Runs the matching pipeline (a subprocess each, Parquet output, no SQL) on the same cached data with
``--direct_num_workers`` 1 and 2 in the ``in_memory``, ``multi_threading`` and ``multi_processing``
modes of the DirectRunner's engine, and prints pairs scored per second, wall time and peak memory of
each, then one JSON line. Figures for the README's scaling guide. Nothing here asserts a time.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import matching as matching_benchmark  # noqa: E402

# (workers, running mode): in_memory runs everything in the launching process on one thread, whatever
# the worker count; multi_threading shares one interpreter (the GIL) between workers; multi_processing
# starts one SDK worker process per worker.
SETUPS = ((1, 'in_memory'), (1, 'multi_processing'), (2, 'multi_threading'), (2, 'multi_processing'))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--candidates', type=int, default=200_000)
    parser.add_argument('--offers', type=int, default=500)
    parser.add_argument('--top_k', type=int, default=100)
    parser.add_argument('--seed', type=int, default=7)
    parser.add_argument('--cache', default=os.path.join(matching_benchmark.ROOT, 'benchmarks', '.data'))
    args = parser.parse_args(argv)

    paths = matching_benchmark.data(args.cache, args.candidates, args.offers, args.seed)
    work = tempfile.mkdtemp(prefix='hrbatch-scaling-')
    figures = {'candidates': args.candidates, 'offers': args.offers, 'top_k': args.top_k}
    try:
        print(f'Data: {args.candidates:,} candidates x {args.offers:,} offers, top_k={args.top_k}', flush=True)
        for workers, mode in SETUPS:
            name = f'{workers}_{mode}'
            run = matching_benchmark.pipeline(*paths, os.path.join(work, name), top_k=args.top_k, database='none',
                                              workers=workers, running_mode=mode, log=os.path.join(work, name + '.log'))
            print(f'--direct_num_workers {workers} --direct_running_mode {mode:<17} '
                  f'{run["pairs_per_second"]:>14,.0f} pairs/s  {run["seconds"]:6.1f} s  '
                  f'peak {run["peak_rss_mb"]:,.0f} MiB', flush=True)
            figures[f'pairs_per_second_{name}'] = round(run['pairs_per_second'])
            figures[f'peak_rss_mb_{name}'] = round(run['peak_rss_mb'], 1)
        figures['ratio_2_vs_1_multi_processing'] = round(
            figures['pairs_per_second_2_multi_processing'] / figures['pairs_per_second_1_multi_processing'], 2)
        print(json.dumps(figures, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""The pipelines at scale: throughput, wall time and peak memory, recorded and charted.

    .venv/bin/python benchmarks/scale.py matching --candidates 1000000 --offers 1000 --top_k 100
    .venv/bin/python benchmarks/scale.py matching --candidates 10000000 --offers 100 --top_k 100
    .venv/bin/python benchmarks/scale.py payroll --employees 1000000
    .venv/bin/python benchmarks/scale.py matching --candidates 10000,100000,1000000 --offers 100 --top_k 100
    .venv/bin/python benchmarks/scale.py payroll --employees 10000,100000,1000000
    .venv/bin/python benchmarks/scale.py chart          # redraw the chart from the recorded runs

Each run generates its data once (cached in benchmarks/.data/, the same files as benchmarks/compare.py),
runs ``python -m pipelines.matching`` or ``python -m pipelines.payroll`` on the DirectRunner engine with
2 workers (multi_processing), Parquet output, and measures the wall time of the whole process and
the peak resident memory of its process tree (benchmarks/memory.py). Every run is recorded in
``benchmarks/results/scale.json`` (a run of the same pipeline and size replaces the earlier one), and
``benchmarks/results/memory.svg`` is redrawn: peak memory against input size, per pipeline, which
must stay flat. Prints one line per run and ends with one JSON line of the runs just made.
Nothing here asserts a time.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCHMARKS)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCHMARKS)

from compare import PERIOD  # noqa: E402
from compare import matching_data  # noqa: E402
from compare import payroll_data  # noqa: E402
from compare import runner_options  # noqa: E402
from memory import run_logged  # noqa: E402
from pipelines import generate_payroll  # noqa: E402

RESULTS = os.path.join(BENCHMARKS, 'results')


def _counts(text: str) -> list[int]:
    return [int(x) for x in text.split(',')]


def _shown(cmd: list[str], work: str) -> str:
    """The command as recorded: paths relative to the repository, the temporary output as OUT."""
    shown = [part.replace(work, 'OUT') for part in cmd]
    shown = [os.path.relpath(part, ROOT) if part.startswith(ROOT) else part for part in shown]
    return ' '.join(['python', *shown[1:]])


def run_matching(candidates: int, offers: int, top_k: int | None, workers: int, seed: int, cache: str,
                 work: str) -> dict:
    paths = matching_data(cache, candidates, offers, seed)
    cmd = [sys.executable, '-m', 'pipelines.matching', '--candidates', paths[0], '--offers', paths[1],
           '--output', os.path.join(work, 'out'), '--database', 'none', '--ledger',
           'sqlite:///' + os.path.join(work, 'ledger.db'), '--run_id', 'scale', *runner_options(workers)]
    if top_k:
        cmd += ['--top_k', str(top_k)]
    load = os.getloadavg()[0]
    seconds, peak, text = run_logged(cmd, os.path.join(work, 'run.log'))
    pairs = int(text.split('pairs scored')[1].split()[0].replace(',', ''))
    matches = int(text.split('matches written')[1].split()[0].replace(',', ''))
    return {'pipeline': 'matching', 'candidates': candidates, 'offers': offers, 'top_k': top_k, 'size': candidates,
            'pairs': pairs, 'matches': matches, 'seconds': round(seconds, 2), 'pairs_per_s': round(pairs / seconds),
            'peak_rss_mb': round(peak, 1), 'load_average_before': round(load, 2), 'command': _shown(cmd, work)}


def run_payroll(employees: int, workers: int, seed: int, cache: str, work: str) -> dict:
    directory = payroll_data(cache, employees, seed)
    cmd = [sys.executable, '-m', 'pipelines.payroll', '--period', PERIOD, '--output', os.path.join(work, 'out'),
           '--database', 'none', '--ledger', 'sqlite:///' + os.path.join(work, 'ledger.db'), '--run_id', 'scale',
           *runner_options(workers)]
    for name in generate_payroll.DATASETS:
        cmd += [f'--{name}', os.path.join(directory, f'{name}.parquet')]
    load = os.getloadavg()[0]
    seconds, peak, text = run_logged(cmd, os.path.join(work, 'run.log'))
    paid = int(text.split(' employees paid')[0].rsplit(' ', 1)[1].replace(',', ''))
    return {'pipeline': 'payroll', 'employees': employees, 'size': employees, 'payslips': paid,
            'seconds': round(seconds, 2), 'payslips_per_s': round(paid / seconds), 'peak_rss_mb': round(peak, 1),
            'load_average_before': round(load, 2), 'command': _shown(cmd, work)}


def _key(run: dict) -> tuple:
    return (run['pipeline'], run['size'], run.get('offers'), run.get('top_k'))


def record(runs: list[dict], path: str) -> list[dict]:
    """Adds ``runs`` to the JSON list at ``path`` (replacing a run of the same pipeline and size)."""
    recorded = []
    if os.path.exists(path):
        with open(path) as handle:
            recorded = json.load(handle)
    fresh = {_key(r) for r in runs}
    recorded = [r for r in recorded if _key(r) not in fresh] + runs
    recorded.sort(key=lambda r: (r['pipeline'], r.get('offers') or 0, r['size']))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as handle:
        json.dump(recorded, handle, indent=1, sort_keys=True)
        handle.write('\n')
    return recorded


_STYLE = ('<style>text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;fill:#52606d}'
          '.grid{stroke:#edf0f3;stroke-width:1}.tick{font-size:10.5px}.label,.legend{font-size:11.5px;fill:#323f4b}'
          '</style><rect width="100%" height="100%" fill="#fff"/>')


def _size_label(n: int) -> str:
    for limit, suffix in ((1_000_000, 'M'), (1_000, 'k')):
        if n >= limit:
            return f'{n / limit:g}{suffix}'
    return str(n)


def chart(recorded: list[dict], path: str) -> str:
    """Peak memory against input size (candidates or employees), one series per pipeline run kind."""
    from transforms import report_html
    series = {}
    for run in recorded:
        name = (f'matching, {run["offers"]:,} offers' + (f', top {run["top_k"]}' if run.get('top_k') else '')
                if run['pipeline'] == 'matching' else 'payroll')
        series.setdefault(name, {})[run['size']] = run['peak_rss_mb']
    sizes = sorted({size for points in series.values() for size in points})
    svg = report_html.column_chart(
        [_size_label(s) for s in sizes],
        [(name, [points.get(s) for s in sizes]) for name, points in sorted(series.items())],
        title='Peak memory (MiB) against input size (candidates or employees), 2 workers',
        value_text=lambda v: f'{v:,.0f} MiB', width=720, height=340)
    svg = svg.replace('<svg ', '<svg xmlns="http://www.w3.org/2000/svg" ', 1)
    svg = svg.replace('>', '>' + _STYLE, 1)
    title = ('<text x="58" y="334" class="tick">peak RSS of the whole process tree (MiB), by input size; '
             'recorded in benchmarks/results/scale.json</text>')
    svg = svg.replace('</svg>', title + '</svg>')
    with open(path, 'w') as handle:
        handle.write(svg + '\n')
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('pipeline', choices=('matching', 'payroll', 'chart'))
    parser.add_argument('--candidates', type=_counts, default=[1_000_000], help='One or more, comma-separated.')
    parser.add_argument('--offers', type=int, default=1_000)
    parser.add_argument('--top_k', type=int, default=100, help='0: keep every match (see README: memory).')
    parser.add_argument('--employees', type=_counts, default=[1_000_000], help='One or more, comma-separated.')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--seed', type=int, default=7)
    parser.add_argument('--cache', default=os.path.join(BENCHMARKS, '.data'))
    parser.add_argument('--results', default=RESULTS)
    args = parser.parse_args(argv)
    path = os.path.join(args.results, 'scale.json')
    runs = []
    if args.pipeline != 'chart':
        for size in (args.candidates if args.pipeline == 'matching' else args.employees):
            work = tempfile.mkdtemp(prefix='hrbatch-scale-')
            try:
                if args.pipeline == 'matching':
                    run = run_matching(size, args.offers, args.top_k or None, args.workers, args.seed, args.cache, work)
                    print(f'matching {size:>11,} x {args.offers:,}  {run["pairs_per_s"]:>13,} pairs/s  '
                          f'{run["seconds"]:7.1f} s  peak {run["peak_rss_mb"]:7,.0f} MiB', flush=True)
                else:
                    run = run_payroll(size, args.workers, args.seed, args.cache, work)
                    print(f'payroll  {size:>11,} employees  {run["payslips_per_s"]:>10,} payslips/s  '
                          f'{run["seconds"]:7.1f} s  peak {run["peak_rss_mb"]:7,.0f} MiB', flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            run.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                       cpus=os.cpu_count(), machine=platform.machine(), workers=args.workers)
            runs.append(run)
            record([run], path)
    with open(path) as handle:
        recorded = json.load(handle)
    svg = chart(recorded, os.path.join(args.results, 'memory.svg'))
    print(f'recorded in {os.path.relpath(path)}; chart {os.path.relpath(svg)}')
    print(json.dumps(runs, sort_keys=True))
    return 0


if __name__ == '__main__':
    sys.exit(main())

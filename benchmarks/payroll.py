"""Payroll throughput and memory, with OpenFisca-France as the peer figure, side by side in one run.

    python benchmarks/payroll.py                          # 100,000 and 1,000,000 employees
    python benchmarks/payroll.py --sizes 20000,100000     # quick

Measures, on generated employees (``hrbatch generate --employees N``, cached in benchmarks/.data/):
  (p) the payroll pipeline end to end, DirectRunner engine, 2 workers (multi_processing), Parquet
      output: payslips per second (wall time of the whole process, start-up included) and the peak
      memory of its process tree, at each size (memory must stay flat);
  (e) the payslip engine alone (transforms.payslips.compute, one process, no Beam) on the first size;
  (o) OpenFisca-France computing the net salaries (net avant impôt, net imposable, CSG, CRDS and
      the réduction générale) of the same employees of the first size, in its own virtualenv
      (``bash .ci/install_openfisca.sh``): its compute time, and its time including loading its
      tax-benefit system.
Ends with one JSON line, with ``payslips_per_s`` (the pipeline at the largest size) and
``ratio_vs_openfisca`` (that rate over OpenFisca's net salaries per second, load excluded).
Nothing here asserts a time.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memory import run_measured  # noqa: E402
from pipelines import generate_payroll  # noqa: E402
from transforms import payroll_inputs  # noqa: E402
from transforms import payroll_rules  # noqa: E402
from transforms import payslips  # noqa: E402

PERIOD = '2026-11'
OPENFISCA_PYTHON = os.path.join(ROOT, '.openfisca', 'venv', 'bin', 'python')
OPENFISCA_SCRIPT = os.path.join(ROOT, 'tests', 'openfisca', 'net_salaries.py')


def data(cache: str, employees: int, seed: int) -> str:
    directory = os.path.join(cache, f'payroll-{employees}-{seed}-{PERIOD}')
    if not os.path.exists(os.path.join(directory, 'withholding_rates.parquet')):
        generate_payroll.generate_payroll(directory, employees=employees, period=PERIOD, seed=seed)
    return directory


def pipeline(directory: str, output: str, workers: int, log: str) -> dict:
    cmd = [sys.executable, '-m', 'pipelines.payroll', '--period', PERIOD, '--output', output, '--database', 'none',
           '--run_id', 'benchmark', '--direct_num_workers', str(workers), '--direct_running_mode', 'multi_processing']
    for name in generate_payroll.DATASETS:
        cmd += [f'--{name}', os.path.join(directory, f'{name}.parquet')]
    with open(log, 'w') as handle:
        code, seconds, peak = run_measured(cmd, stdout=handle)
    if code != 0:
        raise SystemExit(f'the payroll pipeline failed with exit code {code}; see {log}')
    with open(log) as handle:
        text = handle.read()
    paid = int(text.split(' employees paid')[0].rsplit(' ', 1)[1].replace(',', ''))
    return {'paid': paid, 'seconds': seconds, 'payslips_per_s': paid / seconds, 'peak_rss_mb': peak / 2**20}


def month_input(directory: str):
    tables = {name: pq.read_table(os.path.join(directory, f'{name}.parquet')) for name in generate_payroll.DATASETS}
    assembled = payroll_inputs.assemble(PERIOD, tables['employees'], tables['contracts'], tables['variable_elements'],
                                        tables['withholding_rates'], tables['establishments'], {})
    return assembled.month


def engine(month) -> dict:
    rules = payroll_rules.PayrollRules.for_period(PERIOD)
    best = None
    for _ in range(3):  # the best of three: the first run also pays the process's first memory allocations
        start = time.perf_counter()
        _, totals = payslips.compute(month, rules)
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    seconds = best
    return {'paid': totals.num_rows, 'seconds': seconds, 'payslips_per_s': totals.num_rows / seconds,
            'totals': totals}


def openfisca(month, totals, work: str) -> dict:
    """OpenFisca on the same employees: gross = the engine's gross (overtime, bonuses and absences
    included), hours = the hours paid, so both compute the same payslips' nets."""
    if not os.path.exists(OPENFISCA_PYTHON):
        raise SystemExit(f'{OPENFISCA_PYTHON} is missing: run bash .ci/install_openfisca.sh')
    employees = {
        'gross': (totals.column('gross_cents').to_numpy() / 100).tolist(),
        'cadre': month.column('cadre').to_pylist(),
        'hours': np.round(totals.column('hours_paid').to_numpy(), 2).tolist(),
        'alsace_moselle': month.column('alsace_moselle').to_pylist(),
        'headcount': month.column('company_headcount').to_pylist(),
        'period': PERIOD,
    }
    source, result = os.path.join(work, 'openfisca_in.json'), os.path.join(work, 'openfisca_out.json')
    with open(source, 'w') as handle:
        json.dump(employees, handle)
    start = time.perf_counter()
    subprocess.run([OPENFISCA_PYTHON, OPENFISCA_SCRIPT, source, result], check=True, timeout=1800)
    with_load = time.perf_counter() - start
    with open(result) as handle:
        out = json.load(handle)
    compute_seconds = out['seconds_compute']
    n = len(employees['gross'])
    return {'employees': n, 'seconds': compute_seconds, 'seconds_with_load': with_load,
            'net_salaries_per_s': n / compute_seconds, 'net_salaries_per_s_with_load': n / with_load}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sizes', default='100000,1000000', help='Employee counts, comma separated.')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--seed', type=int, default=7)
    parser.add_argument('--cache', default=os.path.join(ROOT, 'benchmarks', '.data'))
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(',')]
    work = tempfile.mkdtemp(prefix='hrbatch-payroll-bench-')
    figures = {'period': PERIOD, 'workers': args.workers}
    try:
        runs = {}
        for size in sizes:
            directory = data(args.cache, size, args.seed)
            run = pipeline(directory, os.path.join(work, f'p{size}'), args.workers, os.path.join(work, f'p{size}.log'))
            runs[size] = run
            print(f'(p) pipeline  {size:>10,} employees  {run["payslips_per_s"]:>10,.0f} payslips/s  '
                  f'{run["seconds"]:6.1f} s  peak {run["peak_rss_mb"]:,.0f} MiB', flush=True)
            figures[f'pipeline_payslips_per_s_{size}'] = round(run['payslips_per_s'])
            figures[f'pipeline_seconds_{size}'] = round(run['seconds'], 2)
            figures[f'peak_rss_mb_{size}'] = round(run['peak_rss_mb'], 1)
        month = month_input(data(args.cache, sizes[0], args.seed))
        e = engine(month)
        print(f'(e) engine    {sizes[0]:>10,} employees  {e["payslips_per_s"]:>10,.0f} payslips/s  '
              f'{e["seconds"]:6.2f} s (one process, no Beam)', flush=True)
        o = openfisca(month, e['totals'], work)
        print(f'(o) OpenFisca {o["employees"]:>10,} employees  {o["net_salaries_per_s"]:>10,.0f} net salaries/s  '
              f'{o["seconds"]:6.2f} s ({o["net_salaries_per_s_with_load"]:,.0f}/s, {o["seconds_with_load"]:.1f} s '
              'with loading its tax-benefit system)', flush=True)
        largest = max(sizes)
        figures.update({
            'payslips_per_s': round(runs[largest]['payslips_per_s']),
            'engine_payslips_per_s': round(e['payslips_per_s']),
            'openfisca_net_salaries_per_s': round(o['net_salaries_per_s']),
            'openfisca_net_salaries_per_s_with_load': round(o['net_salaries_per_s_with_load']),
            'ratio_vs_openfisca': round(runs[largest]['payslips_per_s'] / o['net_salaries_per_s'], 3),
            'ratio_vs_openfisca_with_load': round(runs[largest]['payslips_per_s'] / o['net_salaries_per_s_with_load'], 3),
            'engine_ratio_vs_openfisca': round(e['payslips_per_s'] / o['net_salaries_per_s'], 3),
        })
        if len(sizes) > 1:
            figures['memory_ratio_largest_vs_smallest'] = round(
                runs[largest]['peak_rss_mb'] / runs[min(sizes)]['peak_rss_mb'], 3)
        print(json.dumps(figures, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

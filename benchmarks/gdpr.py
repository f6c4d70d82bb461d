"""GDPR jobs at scale: anonymisation throughput, and subject-access bundles in one pass per dataset.

    python benchmarks/gdpr.py                               # 1,000,000 candidates, 1,000 requests
    python benchmarks/gdpr.py --candidates 100000 --requests 200   # quick

Data (generated once, cached in benchmarks/.data/gdpr-*): N candidates (``generate.candidate_chunks``,
last contacts spread over 3 years before 2026-12-01) as a keyed dataset of 32 partitions, as the
pipelines write them; and a month of payroll for 20,000 employees (employees, contracts, payslips,
payslip lines). Measured, each in its own process on the DirectRunner engine, 2 workers
(multi_processing), with the peak memory of the process tree:

  (a) ``gdpr_anonymize`` over a fresh copy of the candidates (retention 2 years, k = 5): records read
      per second (every record is read and checked; those past retention are rewritten) and records
      anonymised per second;
  (s) ``subject_access`` with R requests (70 % candidate e-mails, 20 % employee NIRs, 10 % unknown
      people) over the candidates plus the payroll datasets: bundles per second, and the passes per
      dataset counted by the pipeline's own metrics (files scanned / files in the dataset).

Ends with one JSON line: ``anonymised_per_s``, ``records_per_s``, ``bundles_per_s``,
``passes_per_dataset`` (subject access), ``anonymise_passes_per_dataset``, peak memories, wall times.
Nothing here asserts a time.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memory import run_measured  # noqa: E402
from pipelines import generate  # noqa: E402
from pipelines import generate_payroll  # noqa: E402
from transforms import keyed_write  # noqa: E402
from transforms import schemas  # noqa: E402

AS_OF = '2026-12-01'
PERIOD = '2026-11'
BUCKETS = 32
EMPLOYEES = 20_000
KEY = 'benchmark-only-key-never-use-this-one-0123456789'
_RUN = 'import sys; from pipelines import {0}; {0}.run(sys.argv[1:])'


def candidates_dataset(cache: str, count: int) -> str:
    target = os.path.join(cache, f'gdpr-candidates-{count}')
    if os.path.exists(os.path.join(target, '.complete')):
        return target
    shutil.rmtree(target, ignore_errors=True)
    pieces = {}
    for batch in generate.candidate_chunks(count, chunk_rows=100_000):
        for directory, piece in keyed_write.split_by_partition(
                keyed_write.conform_batch(batch, schemas.CANDIDATES), 'candidate_id', BUCKETS):
            pieces.setdefault(directory, []).append(piece)
    for directory, batches in pieces.items():
        keyed_write.write_partition(batches, schema=schemas.CANDIDATES, target=target, directory=directory,
                                    temp_dir=os.path.join(target, '.tmp'))
    keyed_write.remove_temp_dir(os.path.join(target, '.tmp'))
    open(os.path.join(target, '.complete'), 'w').close()
    return target


def payroll_datasets(cache: str) -> str:
    directory = os.path.join(cache, f'gdpr-payroll-{EMPLOYEES}')
    if os.path.exists(os.path.join(directory, '.complete')):
        return directory
    data = os.path.join(directory, 'in')
    generate_payroll.generate_payroll(data, employees=EMPLOYEES, period=PERIOD, seed=7)
    cmd = [sys.executable, '-c', _RUN.format('payroll'), '--period', PERIOD, '--output',
           os.path.join(directory, 'payroll'), '--database', 'none', '--buckets', '16']
    for name in generate_payroll.DATASETS:
        cmd += [f'--{name}', os.path.join(data, f'{name}.parquet')]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    open(os.path.join(directory, '.complete'), 'w').close()
    return directory


def requests_file(path: str, candidates: str, payroll: str, count: int) -> None:
    emails = []
    for name in sorted(os.listdir(candidates))[:8]:
        if name.startswith('candidate_id_bucket='):
            emails += pq.read_table(os.path.join(candidates, name, 'part-00000.parquet'),
                                    columns=['email']).column('email').to_pylist()[:count]
    nirs = pq.read_table(os.path.join(payroll, 'in', 'employees.parquet'), columns=['nir']).column('nir').to_pylist()
    with open(path, 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(['request_id', 'received', 'email', 'nir'])
        for n in range(count):
            share = n % 10
            if share < 7:
                writer.writerow([f'SAR-{n:05d}', '2026-11-15', emails[(n * 7919) % len(emails)], ''])
            elif share < 9:
                writer.writerow([f'SAR-{n:05d}', '2026-10-15', '', nirs[(n * 104_729) % len(nirs)]])
            else:
                writer.writerow([f'SAR-{n:05d}', '2026-11-15', f'nobody.{n}@example.invalid', ''])


def run_job(module: str, args: list[str], log: str) -> tuple[float, int]:
    cmd = [sys.executable, '-c', _RUN.format(module), *args, '--direct_num_workers', '2',
           '--direct_running_mode', 'multi_processing']
    with open(log, 'w') as handle:
        code, seconds, peak = run_measured(cmd, stdout=handle)
    if code != 0:
        sys.exit(f'{module} failed ({code}); see {log}')
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--candidates', type=int, default=1_000_000)
    parser.add_argument('--requests', type=int, default=1_000)
    parser.add_argument('--cache', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), '.data'))
    args = parser.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    candidates = candidates_dataset(args.cache, args.candidates)
    payroll = payroll_datasets(args.cache)
    work = tempfile.mkdtemp(prefix='gdpr-bench-')
    try:
        # (a) anonymisation, on a copy (it rewrites in place)
        copy = os.path.join(work, 'candidates')
        shutil.copytree(candidates, copy)
        with open(os.path.join(work, 'key'), 'w') as handle:
            handle.write(KEY)
        with open(os.path.join(work, 'policy.yaml'), 'w') as handle:
            json.dump({'k': 5, 'datasets': [dict(name='candidates', path=copy, category='recruitment',
                                                  retention='2y', **{'from': 'last_contact_date'})]}, handle)
        seconds_a, peak_a = run_job('gdpr_anonymize', [
            '--policy', os.path.join(work, 'policy.yaml'), '--key_file', os.path.join(work, 'key'),
            '--output', os.path.join(work, 'gdpr'), '--as_of', AS_OF], os.path.join(work, 'anonymise.log'))
        report_dir = os.path.join(work, 'gdpr', 'reports')
        report = json.load(open(os.path.join(report_dir, os.listdir(report_dir)[0])))
        figures = report['datasets']['candidates']
        print(f"(a) gdpr_anonymize, {figures['rows']:,} candidates: {figures['expired']:,} past retention, "
              f"{figures['anonymised']:,} anonymised, {figures['suppressed']:,} suppressed (k=5, reached "
              f"{figures['k_reached']}), {figures['files_rewritten']} of {figures['files']} files rewritten, "
              f"{figures['passes']} passes; {seconds_a:.1f} s, peak {peak_a / 2**20:,.0f} MiB")
        print(f"    {figures['rows'] / seconds_a:,.0f} records read and checked per second, "
              f"{figures['anonymised'] / seconds_a:,.0f} records anonymised per second")
        # (s) subject access
        requests = os.path.join(work, 'requests.csv')
        requests_file(requests, candidates, payroll, args.requests)
        output = os.path.join(work, 'sar')
        seconds_s, peak_s = run_job('subject_access', [
            '--subjects', requests, '--output', output, '--as_of', AS_OF, '--candidates', candidates,
            '--employees', os.path.join(payroll, 'in', 'employees.parquet'),
            '--contracts', os.path.join(payroll, 'in', 'contracts.parquet'),
            '--payslips', os.path.join(payroll, 'payroll', 'payslips'),
            '--payslip_lines', os.path.join(payroll, 'payroll', 'payslip_lines')], os.path.join(work, 'sar.log'))
        log = open(os.path.join(work, 'sar.log')).read()
        passes = json.loads(log.split('Passes per dataset:')[1].splitlines()[0].strip().replace("'", '"'))
        bundles = len(os.listdir(os.path.join(output, 'bundles')))
        records = args.candidates + sum(pq.ParquetFile(p).metadata.num_rows for p in (
            os.path.join(payroll, 'in', 'employees.parquet'), os.path.join(payroll, 'in', 'contracts.parquet')))
        records += sum(keyed_write.read_parquet_dataset(os.path.join(payroll, 'payroll', n)).num_rows
                       for n in ('payslips', 'payslip_lines'))
        print(f"(s) subject_access, {args.requests:,} requests over {records:,} records in {len(passes)} datasets: "
              f"{bundles:,} bundles in {seconds_s:.1f} s ({bundles / seconds_s:,.1f} bundles per second), "
              f"peak {peak_s / 2**20:,.0f} MiB; passes per dataset {passes}")
        print(json.dumps({
            'candidates': args.candidates, 'requests': args.requests, 'records_searched': records,
            'anonymised_per_s': round(figures['anonymised'] / seconds_a),
            'records_per_s': round(figures['rows'] / seconds_a),
            'anonymised': figures['anonymised'], 'suppressed': figures['suppressed'],
            'anonymise_seconds': round(seconds_a, 1), 'anonymise_peak_mib': round(peak_a / 2**20),
            'anonymise_passes_per_dataset': {'candidates': figures['passes']},
            'bundles_per_s': round(bundles / seconds_s, 1), 'bundles': bundles,
            'subject_access_seconds': round(seconds_s, 1), 'subject_access_peak_mib': round(peak_s / 2**20),
            'passes_per_dataset': passes,
        }, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()

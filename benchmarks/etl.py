"""ETL throughput: a French semicolon CSV export into Parquet, with pyarrow's own CSV reader as the
peer figure, side by side in one run.

    python benchmarks/etl.py                 # 1,000,000 rows
    python benchmarks/etl.py --rows 100000   # quick

The export (cached in benchmarks/.data/) is what a French payroll system writes for its employees:
Latin-1, ';' separators, DD/MM/YYYY dates, phones as people type them ('06 12 34 56 78'), codes
('Cadre' / 'Non cadre', 'oui' / 'non'), an update time, 2% of rows repeating an employee with a
later update and 1% with a bad value. Measured:
  (p) the ETL pipeline end to end (``python -m pipelines.etl``, DirectRunner, Parquet output, no
      database; in-process by default, as one export file is read by one worker anyway; ``--workers
      2`` runs two worker processes): every validation on (NIR keys, dates, enumerations, e-mail, E.164
      phones, postcodes), de-duplication and the reconciliation; wall time of the whole process,
      start-up included, and the peak memory of its process tree;
  (a) pyarrow alone: ``pyarrow.csv.read_csv`` of the same file with the same separator, encoding
      and date format, then ``pyarrow.parquet.write_table``: no validation, no de-duplication; the
      best of two runs (the file is then in the page cache, as it is for the pipeline after it).
Ends with one JSON line: ``rows_per_s`` (the pipeline), ``pyarrow_rows_per_s`` and
``ratio_vs_pyarrow``. Nothing here asserts a time.
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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memory import run_measured  # noqa: E402
from pipelines import generate_payroll  # noqa: E402

MAPPING = """dataset: employees
source: {encoding: latin-1, delimiter: ';', date_format: '%d/%m/%Y'}
updated_at: {column: date_maj, format: '%d/%m/%Y %H:%M'}
fields:
  employee_id: matricule
  nir: num_secu
  last_name: {column: nom, normalize: upper_name}
  first_name: {column: prenom, normalize: name}
  birth_date: date_naissance
  email: {column: courriel, normalize: email}
  phone: {column: telephone, normalize: phone}
  postcode: {column: code_postal, normalize: postcode}
  cadre: {column: statut, values: {Cadre: true, 'Non cadre': false}}
  alsace_moselle: {column: regime_local, values: {oui: true, non: false}}
  low_qualification: {column: peu_qualifie, values: {oui: true, non: false}}
"""
COLUMNS = ('matricule', 'num_secu', 'nom', 'prenom', 'date_naissance', 'courriel', 'telephone', 'code_postal',
           'statut', 'regime_local', 'peu_qualifie', 'date_maj')


def export(cache: str, rows: int, seed: int = 7) -> str:
    """The CSV export of ``rows`` rows (about 2% repeated employees, 1% bad values)."""
    path = os.path.join(cache, f'etl-employees-{rows}-{seed}.csv')
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    source = tempfile.mkdtemp(prefix='hrbatch-etl-gen-')
    try:
        employees = int(rows / 1.02)
        generate_payroll.generate_payroll(source, employees=employees, seed=seed)
        table = pq.read_table(os.path.join(source, 'employees.parquet'))
    finally:
        shutil.rmtree(source, ignore_errors=True)
    rng = np.random.default_rng(seed)
    repeated = table.take(pa.array(rng.choice(employees, size=rows - employees, replace=False)))
    table = pa.concat_tables([table, repeated])
    n = table.num_rows
    phone = table.column('phone').combine_chunks()
    national = pc.utf8_slice_codeunits(phone, 3)  # +33612345678 -> 612345678, written 06 12 34 56 78
    spaced = pc.replace_substring_regex(national, r'^(\d)(\d\d)(\d\d)(\d\d)(\d\d)$', r'0\1 \2 \3 \4 \5')
    updated = np.datetime64('2026-01-01T08:00') + rng.integers(0, 300 * 24 * 60, size=n).astype('timedelta64[m]')
    updated[employees:] = np.datetime64('2026-11-30T18:00')  # the repeats are the latest
    columns = {
        'matricule': table.column('employee_id'),
        'num_secu': table.column('nir'),
        'nom': table.column('last_name'),
        'prenom': table.column('first_name'),
        'date_naissance': pc.strftime(table.column('birth_date'), format='%d/%m/%Y'),
        'courriel': table.column('email'),
        'telephone': spaced,
        'code_postal': table.column('postcode'),
        'statut': pc.if_else(table.column('cadre'), 'Cadre', 'Non cadre'),
        'regime_local': pc.if_else(table.column('alsace_moselle'), 'oui', 'non'),
        'peu_qualifie': pc.if_else(table.column('low_qualification'), 'oui', 'non'),
        'date_maj': pc.strftime(pa.array(updated.astype('datetime64[s]'), pa.timestamp('s')), format='%d/%m/%Y %H:%M'),
    }
    bad = rng.random(n) < 0.01
    columns['date_naissance'] = pc.if_else(pa.array(bad), '31/02/1980', columns['date_naissance'])
    out = pa.table(columns)
    with open(path + '.tmp', 'wb') as handle:
        text = pa.BufferOutputStream()
        pa_csv.write_csv(out, text, write_options=pa_csv.WriteOptions(delimiter=';', quoting_style='needed'))
        handle.write(text.getvalue().to_pybytes().decode('utf-8').encode('latin-1', 'replace'))
    os.replace(path + '.tmp', path)
    return path


def pipeline(path: str, work: str, workers: int) -> dict:
    mapping = os.path.join(work, 'employees.yaml')
    with open(mapping, 'w') as handle:
        handle.write(MAPPING)
    output = os.path.join(work, 'out')
    cmd = [sys.executable, '-m', 'pipelines.etl', '--mapping', mapping, '--input', path, '--output', output,
           '--database', 'none', '--run_id', 'benchmark', '--direct_num_workers', str(workers),
           '--direct_running_mode', 'in_memory' if workers == 1 else 'multi_processing']
    log = os.path.join(work, 'etl.log')
    with open(log, 'w') as handle:
        code, seconds, peak = run_measured(cmd, stdout=handle)
    if code != 0:
        raise SystemExit(f'the ETL pipeline failed with exit code {code}; see {log}')
    with open(os.path.join(output, 'reconciliation', 'reconciliation.json')) as handle:
        files = json.load(handle)
    read = sum(f['read'] for f in files)
    return {'read': read, 'written': sum(f['written'] for f in files),
            'dead_lettered': sum(f['dead_lettered'] for f in files), 'merged': sum(f['merged'] for f in files),
            'seconds': seconds, 'rows_per_s': read / seconds, 'peak_rss_mb': peak / 2**20}


def with_pyarrow(path: str, work: str) -> dict:
    """The best of two runs: the first also pays for reading the file into the page cache."""
    best = None
    for _ in range(2):
        start = time.perf_counter()
        table = pa_csv.read_csv(
            path, read_options=pa_csv.ReadOptions(encoding='latin-1'),
            parse_options=pa_csv.ParseOptions(delimiter=';'),
            convert_options=pa_csv.ConvertOptions(timestamp_parsers=['%d/%m/%Y', '%d/%m/%Y %H:%M'],
                                                  column_types={'code_postal': pa.string(), 'telephone': pa.string()}))
        pq.write_table(table, os.path.join(work, 'pyarrow.parquet'))
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    return {'rows': table.num_rows, 'seconds': best, 'rows_per_s': table.num_rows / best}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--rows', type=int, default=1_000_000)
    parser.add_argument('--workers', type=int, default=1, help='DirectRunner workers (1: in-process).')
    parser.add_argument('--cache', default=os.path.join(ROOT, 'benchmarks', '.data'))
    args = parser.parse_args(argv)
    path = export(args.cache, args.rows)
    work = tempfile.mkdtemp(prefix='hrbatch-etl-bench-')
    try:
        a = with_pyarrow(path, work)
        print(f'(a) pyarrow   {a["rows"]:>10,} rows  {a["rows_per_s"]:>10,.0f} rows/s  {a["seconds"]:6.2f} s '
              '(read_csv + write_table, no validation)', flush=True)
        p = pipeline(path, work, args.workers)
        print(f'(p) pipeline  {p["read"]:>10,} rows  {p["rows_per_s"]:>10,.0f} rows/s  {p["seconds"]:6.2f} s  '
              f'peak {p["peak_rss_mb"]:,.0f} MiB  ({p["written"]:,} written, {p["dead_lettered"]:,} dead letters, '
              f'{p["merged"]:,} merged)', flush=True)
        figures = {'rows': p['read'], 'workers': args.workers, 'rows_per_s': round(p['rows_per_s']), 'seconds': round(p['seconds'], 2),
                   'peak_rss_mb': round(p['peak_rss_mb'], 1), 'written': p['written'],
                   'dead_lettered': p['dead_lettered'], 'merged': p['merged'],
                   'pyarrow_rows_per_s': round(a['rows_per_s']), 'pyarrow_seconds': round(a['seconds'], 2),
                   'ratio_vs_pyarrow': round(p['rows_per_s'] / a['rows_per_s'], 3)}
        print(json.dumps(figures, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

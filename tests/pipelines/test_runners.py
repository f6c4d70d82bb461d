"""The same pipeline, unchanged, on other runners: its outputs equal the local runner's, file for file.

Each runner is real and runs in processes of its own: a standalone Flink cluster behind Beam's Flink
job server, and Beam's own job service (the portable submission path every remote runner takes); both
run the pipeline's Python code in an EXTERNAL SDK worker pool.
"""
import filecmp
import json
import os
import sqlite3

import pytest

from pipelines import generate
from pipelines import cpf
from pipelines import dsn
from pipelines import flink
from pipelines import generate_payroll
from pipelines import matching
from pipelines import payroll
from transforms.keyed_write import read_parquet_dataset
from transforms.errors import ConfigError

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

COUNTS = ('candidates_read', 'offers_read', 'pairs_scored', 'matches_written', 'dead_letters')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp('data')
    generate.generate(str(directory), candidates=400, offers=12, seed=5, formats=('parquet', 'csv'))
    return directory


@pytest.fixture(scope='module')
def local_result(tmp_path_factory, data):
    return _run_matching(tmp_path_factory.mktemp('local') / 'out', data)


@pytest.fixture(scope='module')
def payroll_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp('payroll_data')
    generate_payroll.generate_payroll(str(directory), employees=700, period='2026-11', seed=3)
    return directory


def _run_payroll(output, data, *beam_args):
    args = ['--period', '2026-11', '--output', str(output), '--buckets', '8']
    for name in generate_payroll.DATASETS:
        args += [f'--{name}', str(data / f'{name}.parquet')]
    return output, payroll.run(args + list(beam_args))


def _run_matching(output, data, *beam_args):
    summary = matching.run(['--candidates', str(data / 'candidates.parquet'), '--offers', str(data / 'offers.csv'),
                            '--output', str(output), '--top_k', '7', '--batch_rows', '64', *beam_args])
    return output, summary


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def assert_same_results(output, summary, local_result):
    """Same Parquet files byte for byte, same database rows, same counts."""
    local_output, local_summary = local_result
    matches, local_matches = output / 'matches', local_output / 'matches'
    assert _files(matches) == _files(local_matches) != []
    _, mismatch, errors = filecmp.cmpfiles(local_matches, matches, _files(local_matches), shallow=False)
    assert mismatch == errors == []
    query = 'SELECT * FROM matches ORDER BY offer_id, candidate_id'
    with sqlite3.connect(output / 'hrbatch.db') as db, sqlite3.connect(local_output / 'hrbatch.db') as local_db:
        assert db.execute(query).fetchall() == local_db.execute(query).fetchall()
    assert {k: summary[k] for k in COUNTS} == {k: local_summary[k] for k in COUNTS}
    assert summary['matches_written'] > 0


def test_portable_job_service_with_an_external_worker_pool_gives_the_local_results(
        tmp_path, data, local_result, local_job_service, beam_worker_pool):
    output, summary = _run_matching(
        tmp_path / 'out', data, '--runner=PortableRunner', f'--job_endpoint={local_job_service.address}',
        '--environment_type=EXTERNAL', f'--environment_config={beam_worker_pool.address}')
    assert_same_results(output, summary, local_result)


def test_flink_cluster_runs_matching_with_the_local_results(tmp_path, data, local_result, flink_cluster):
    """FlinkRunner on a standalone Flink cluster, the Python code in the EXTERNAL worker pool."""
    before = flink.overview(flink_cluster.rest_url)
    output, summary = _run_matching(tmp_path / 'out', data, *flink_cluster.beam_args())
    assert_same_results(output, summary, local_result)
    after = flink.overview(flink_cluster.rest_url)
    # The job really ran on the cluster: one more finished job there, none failed.
    assert after['jobs-finished'] == before['jobs-finished'] + 1
    assert after['jobs-failed'] == before['jobs-failed'] == 0
    assert after['taskmanagers'] == 1 and after['slots-total'] == 2


@pytest.fixture(scope='module')
def local_payroll(tmp_path_factory, payroll_data):
    return _run_payroll(tmp_path_factory.mktemp('payroll_local') / 'out', payroll_data)


def _assert_same_datasets(output, local_output, names):
    for name in names:
        assert _files(output / name) == _files(local_output / name) != []
        _, mismatch, errors = filecmp.cmpfiles(local_output / name, output / name, _files(local_output / name),
                                               shallow=False)
        assert mismatch == errors == [], name


def test_flink_cluster_runs_payroll_with_the_local_results(tmp_path, payroll_data, local_payroll, flink_cluster):
    local_output, local_summary = local_payroll
    output, summary = _run_payroll(tmp_path / 'flink', payroll_data, *flink_cluster.beam_args())
    _assert_same_datasets(output, local_output, ('payslips', 'payslip_lines', 'controls'))
    counts = ('employees_read', 'contracts_read', 'employees_paid', 'employees_without_contract', 'dead_letters')
    assert {k: summary[k] for k in counts} == {k: local_summary[k] for k in counts}
    assert summary['employees_paid'] == read_parquet_dataset(str(output / 'payslips')).num_rows > 600


def test_flink_cluster_runs_cpf_with_the_local_results(tmp_path, payroll_data, local_payroll, flink_cluster):
    payslips = str(local_payroll[0] / 'payslips' / '*' / 'part-*.parquet')

    def run_cpf(output, *beam_args):
        return cpf.run(['--year', '2026', '--payslips', payslips, '--employees', str(payroll_data / 'employees.parquet'),
                        '--output', str(output), '--buckets', '8', *beam_args])
    local = run_cpf(tmp_path / 'local')
    on_flink = run_cpf(tmp_path / 'flink', *flink_cluster.beam_args())
    _assert_same_datasets(tmp_path / 'flink', tmp_path / 'local', ('cpf_credits',))
    assert on_flink['credited_cents'] == local['credited_cents'] > 0


def test_flink_cluster_runs_dsn_with_the_local_results(tmp_path, payroll_data, local_payroll, flink_cluster):
    paid = local_payroll[0]

    def run_dsn(output, *beam_args):
        return dsn.run([
            '--period', '2026-11', '--output', str(output),
            '--payslips', str(paid / 'payslips' / '*' / 'part-*.parquet'),
            '--payslip_lines', str(paid / 'payslip_lines' / '*' / 'part-*.parquet'),
            *(arg for name in ('employees', 'contracts', 'establishments', 'withholding_rates')
              for arg in (f'--{name}', str(payroll_data / f'{name}.parquet'))),
            '--ape_code', '6201Z', '--at_risk_code', '620AA', '--urssaf_id', '78861779300013',
            '--contact_civility', '02', '--contact_name', 'Service paie', '--contact_email', 'paie@example.fr',
            '--contact_phone', '0102030405', '--buckets', '8', *beam_args])
    local = run_dsn(tmp_path / 'local')
    on_flink = run_dsn(tmp_path / 'flink', *flink_cluster.beam_args())
    _assert_same_datasets(tmp_path / 'flink', tmp_path / 'local', ('files',))

    def index(output):  # the same rows but for the path of each file, which names its run's directory
        return [{k: v for k, v in row.items() if k != 'path'} for row in read_parquet_dataset(str(output / 'index')).to_pylist()]
    assert index(tmp_path / 'flink') == index(tmp_path / 'local')
    assert on_flink['files_written'] == local['files_written'] > 0


def test_hrbatch_flink_status_reports_the_cluster_and_how_to_submit(flink_cluster, capsys):
    assert flink.main(['status', '--state_dir', flink_cluster.state_dir]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['up'] is True
    assert report['flink']['flink-version'] == '1.19.3'
    assert report['beam_args'] == flink_cluster.beam_args()
    with pytest.raises(ConfigError, match='already started'):
        flink.up(flink_cluster.state_dir)

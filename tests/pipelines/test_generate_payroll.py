"""Sample payroll data: valid against its schemas, deterministic, and paid identically in every format."""
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines import generate
from pipelines import generate_payroll
from pipelines import payroll
from transforms import schemas
from transforms.keyed_write import read_parquet_dataset
from transforms.validation import validate_batch

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

SCHEMAS = {'employees': schemas.EMPLOYEES, 'establishments': schemas.ESTABLISHMENTS, 'contracts': schemas.CONTRACTS,
           'variable_elements': schemas.VARIABLE_ELEMENTS, 'withholding_rates': schemas.WITHHOLDING_RATES}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp('payroll_data')
    rows = {}
    generate_payroll.generate_payroll(str(directory), employees=3000, period='2026-11', seed=9,
                                      formats=generate.FORMATS, chunk_rows=1000, rows=rows)
    return directory, rows


def test_every_generated_record_passes_its_schema(data):
    directory, rows = data
    for name, schema in SCHEMAS.items():
        table = pq.read_table(directory / f'{name}.parquet')
        assert table.num_rows == rows[name] > 0
        batch = table.combine_chunks().to_batches()[0]
        batch = batch.append_column('_source', pa.array(['x'] * batch.num_rows)).append_column(
            '_row', pa.array(range(batch.num_rows), pa.int64()))
        valid, letters = validate_batch(batch, schema, step='check')
        assert letters == [] and valid.num_rows == batch.num_rows, name


def test_the_data_covers_the_cases_payroll_must_handle(data):
    directory, _ = data
    contracts = pq.read_table(directory / 'contracts.parquet')
    employees = pq.read_table(directory / 'employees.parquet')
    sites = pq.read_table(directory / 'establishments.parquet')
    first, next_month = (pa.scalar(generate_payroll.period_start(p), pa.date32()) for p in ('2026-11', '2026-12'))
    assert pc.sum(pc.greater_equal(contracts.column('start_date'), first)).as_py() > 0   # hired this month
    assert pc.sum(pc.less(contracts.column('end_date'), next_month)).as_py() > 0        # leaving this month
    assert pc.sum(pc.less(contracts.column('weekly_hours'), 35.0)).as_py() > 0                   # part time
    assert 0 < pc.sum(employees.column('cadre')).as_py() < employees.num_rows
    headcounts = sites.column('company_headcount').to_pylist()
    assert min(headcounts) < 50 <= max(headcounts)
    assert len(set(employees.column('nir').to_pylist())) == employees.num_rows


def test_rows_do_not_depend_on_the_chunk_size(tmp_path, data):
    directory, _ = data
    generate_payroll.generate_payroll(str(tmp_path), employees=3000, period='2026-11', seed=9, chunk_rows=777)
    for name in SCHEMAS:
        assert pq.read_table(tmp_path / f'{name}.parquet').equals(pq.read_table(directory / f'{name}.parquet'))


def test_every_input_format_gives_the_same_payslips(tmp_path, data):
    directory, _ = data
    results = {}
    for file_format in generate.FORMATS:
        args = ['--period', '2026-11', '--output', str(tmp_path / file_format), '--database', 'none']
        for name in SCHEMAS:
            args += [f'--{name}', str(directory / f'{name}.{file_format}')]
        summary = payroll.run(args)
        assert summary['dead_letters'] == 0 and summary['employees_paid'] > 2900
        results[file_format] = read_parquet_dataset(str(tmp_path / file_format / 'payslips')).sort_by('employee_id')
    for file_format, table in results.items():
        assert table.equals(results['parquet']), file_format

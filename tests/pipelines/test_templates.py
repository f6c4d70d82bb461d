"""Dataflow Flex Templates: generated metadata, string parameters, and the launch path run offline.

Nothing here reaches Google Cloud: the DataflowRunner builds each job with ``--dry_run=True``, and the
template launch (``--template_location``) stages the job and writes its description to the GCS
emulator, which is where the Flex Template launcher would leave it for the Dataflow service.
"""
import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys

import apache_beam
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from google.cloud import dataflow_v1beta3

from pipelines import generate
from pipelines import generate_payroll
from pipelines import matching
from pipelines import registry
from pipelines import templates
from tests import sample_records
from transforms import dead_letters
from transforms import migrations
from transforms import schemas
from transforms.errors import ConfigError

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

IMAGE = 'europe-west9-docker.pkg.dev/hrbatch-test/hrbatch/matching:1'
DATAFLOW = ['--runner=DataflowRunner', '--project=hrbatch-test', '--region=europe-west9']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp('data')
    generate.generate(str(directory), candidates=60, offers=5, seed=3, formats=('parquet',))
    generate_payroll.generate_payroll(str(directory), employees=50, period='2026-11', seed=3)
    pq.write_table(schemas.PAYSLIPS.arrow_schema().empty_table(), directory / 'payslips.parquet')
    pq.write_table(schemas.PAYSLIP_LINES.arrow_schema().empty_table(), directory / 'payslip_lines.parquet')
    # ETL: an export of the generated employees and its mapping.
    employees = pq.read_table(directory / 'employees.parquet')
    pa_csv.write_csv(employees, directory / 'employees_export.csv')
    (directory / 'employees.yaml').write_text(
        'dataset: employees\nfields: {' + ', '.join(f'{n}: {n}' for n in employees.column_names) + '}\n')
    # Reports: one dead letter to report on.
    (directory / 'dead_letters.jsonl').write_text(dead_letters.to_json_line(dead_letters.DeadLetter(
        step='ReadEmployees', error='nir: must be a NIR', payload='{}', source='e.csv#row=1'), 'etl-x') + '\n')
    # Migration: candidates stored at version 1.
    v1 = [{**{k: v for k, v in sample_records.candidate(i).items() if k not in ('first_name', 'last_name', 'skills')},
           'full_name': f'Jean DUPONT{i}', 'phone': '06 12 34 56 78', 'skill_codes': []} for i in range(3)]
    (directory / 'candidates_v1').mkdir()
    pq.write_table(pa.Table.from_pylist(v1, schema=migrations.CANDIDATES_V1.arrow_schema()),
                   directory / 'candidates_v1' / 'part-00000.parquet')
    # GDPR: a retention policy over the candidates, its key, and one subject-access request.
    (directory / 'policy.yaml').write_text(
        f'datasets:\n  - {{name: candidates, path: {directory / "candidates.parquet"}, category: recruitment, '
        'retention: 2y, from: last_contact_date}\n')
    (directory / 'gdpr.key').write_bytes(b'k' * 32)
    (directory / 'requests.csv').write_text('request_id,received,candidate_id\nR1,2026-11-20,C00000001\n')
    return directory


# Steps each pipeline's Dataflow job must contain: its reads, its compute and its writes.
STEPS = {
    'matching': ('ReadOffers', 'ScoreTasks', 'WriteParquet', 'WriteDatabase', 'WriteDeadLetters'),
    'payroll': ('ReadEmployees', 'ReadContracts', 'PayBuckets', 'WritePayslips', 'WritePayslipsToDatabase',
                'WriteControls', 'WriteDeadLetters'),
    'cpf': ('ReadPayslips', 'ReadEmployees', 'Credit', 'WriteCredits', 'WriteCreditsToDatabase', 'WriteDeadLetters'),
    'dsn': ('ReadPayslips', 'ReadPayslipLines', 'ReadEmployees', 'Declare', 'Publish', 'WriteIndex', 'WriteDeadLetters'),
    'etl': ('ReadExports', 'Convert', 'Deduplicate', 'WriteParquet', 'WriteDatabase', 'Reconcile', 'WriteDeadLetters'),
    'reports': ('ReadDeadLetters', 'CombineReasons', 'WriteReport'),
    'migration': ('MigrateTasks', 'LoadCommitted', 'WritePartitions', 'WriteControls', 'WriteDeadLetters'),
    'gdpr_anonymize': ('MeasureCandidates', 'AnonymiseCandidates'),
    'subject_access': ('ParseRequests', 'ScanCandidates', 'WriteBundles', 'WriteDeadLetters'),
}


def _string_parameters(name, data, output):
    """Every parameter of template ``name`` as the string a launcher passes: required ones set, the
    others at their default text (so each option's default goes through its own parser)."""
    required = {'candidates': str(data / 'candidates.parquet'), 'offers': str(data / 'offers.parquet'),
                'output': str(output), 'period': '2026-11', 'year': '2026',
                'payslips': str(data / 'payslips.parquet'), 'payslip_lines': str(data / 'payslip_lines.parquet'),
                'ape_code': '6201Z', 'at_risk_code': '620ZA', 'urssaf_id': '117', 'contact_civility': '01',
                'contact_name': 'Service paie', 'contact_email': 'paie@example.com', 'contact_phone': '0100000000',
                'mapping': str(data / 'employees.yaml'), 'input': str(data / 'employees_export.csv'),
                'kind': 'quality', 'dead_letters': str(data / 'dead_letters.jsonl'),
                'dataset': 'candidates', 'from': '1', 'to': '2',
                'policy': str(data / 'policy.yaml'), 'subjects': str(data / 'requests.csv'),
                **{name: str(data / f'{name}.parquet') for name in generate_payroll.DATASETS}}
    if name == 'migration':
        required['input'] = str(data / 'candidates_v1')
    # Options that are optional in general but that these runs need.
    required_by_kind = {'reports': {'dead_letters': required['dead_letters']},
                        'gdpr_anonymize': {'key_file': str(data / 'gdpr.key')},
                        'subject_access': {'candidates': str(data / 'candidates.parquet')}}.get(name, {})
    parameters = {}
    for option in registry.load(name).OPTIONS:
        if option.required:
            parameters[option.name] = required[option.name]
        elif option.name in required_by_kind:
            parameters[option.name] = required_by_kind[option.name]
        elif option.default is not None:
            parameters[option.name] = templates.parameter_text(option, option.default)
    return parameters


@pytest.mark.parametrize('name', sorted(registry.PIPELINES))
def test_metadata_files_are_up_to_date_and_valid_template_metadata(name):
    path = templates.metadata_path(name)
    assert path.read_text(encoding='utf-8') == templates.render(name), (
        f'{path} is out of date: run hrbatch template metadata')
    message = dataflow_v1beta3.TemplateMetadata.from_json(path.read_text(encoding='utf-8'))
    options = registry.load(name).OPTIONS
    assert [p.name for p in message.parameters] == [o.name for o in options]
    for parameter, option in zip(message.parameters, options):
        assert parameter.is_optional == (not option.required)
        if option.default is not None:
            assert parameter.default_value == templates.parameter_text(option, option.default)
            # The form's own check accepts the default it shows.
            assert all(re.fullmatch(rx, parameter.default_value) for rx in parameter.regexes)


def test_every_text_a_template_form_accepts_parses_as_the_option_type():
    samples = ['0', '7', '-3', '1.5', '.5', '2e3', '-1E-2', 'true', 'false', 'True', 'yes', '', 'abc', '1,5',
               '08', '1e', 'nan', 'inf', '{"a": 1}']
    options = [o for name in registry.PIPELINES for o in registry.load(name).OPTIONS]
    checked = 0
    for option in options:
        for regex in templates.parameter(option).get('regexes', []):
            for text in samples:
                if not re.fullmatch(regex, text):
                    continue
                checked += 1
                try:
                    option.parse(text)
                except ConfigError as err:  # the syntax passed; only a range may still refuse it
                    assert 'must be >=' in str(err) or 'must be <=' in str(err) or 'must be in [' in str(err)
    assert checked > 10


@pytest.mark.parametrize('name', sorted(registry.PIPELINES))
def test_template_parameters_given_as_strings_build_the_dataflow_job(tmp_path, data, name):
    """What the launcher passes, strings only, through the image's entry point, on a dry run."""
    assert set(STEPS) == set(registry.PIPELINES)
    parameters = _string_parameters(name, data, tmp_path / 'out')
    argv = [f'--{k}={v}' for k, v in parameters.items()] + ['--force=false', '--resume=false']
    launched, launch_args = templates.launch_argv(
        argv + DATAFLOW + ['--dry_run=True', '--temp_location=gs://hrbatch-test/tmp'],
        {templates.PIPELINE_ENV: name, templates.IMAGE_ENV: IMAGE})
    assert launched == name
    assert '--sdk_location=container' in launch_args and f'--sdk_container_image={IMAGE}' in launch_args
    summary = registry.load(name).run(launch_args)
    assert summary['described'] is True
    job = summary['job']
    assert json.loads(job.json())['type'] == 'JOB_TYPE_BATCH'
    steps = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    for step in STEPS[name]:  # at top level, or inside a composite step
        assert any(s == step or s.endswith('/' + step) for s in steps), step
    environments = job.proto_pipeline.components.environments.values()
    assert any(env.urn == 'beam:env:docker:v1' and IMAGE.encode() in env.payload for env in environments)
    # Only described: nothing ran, so no Parquet output and no ledger entry that would stay "running"
    # (SQL tables are created at construction, so that a database problem shows at launch).
    assert not list((tmp_path / 'out').glob('*/*.parquet')) and not list((tmp_path / 'out').glob('*/*/*.parquet'))
    database = tmp_path / 'out' / 'hrbatch.db'
    if database.exists():  # only where the pipeline writes SQL (the DSN writes files)
        with sqlite3.connect(database) as db:
            tables = {table for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert tables and not tables & {'hrbatch_runs', 'hrbatch_audit'}
            for table in tables:
                assert db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone() == (0,)


def test_a_bad_parameter_string_fails_at_launch_with_the_option_named(tmp_path, data):
    parameters = _string_parameters('matching', data, tmp_path / 'out')
    parameters['top_k'] = 'ten'
    argv = [f'--{k}={v}' for k, v in parameters.items()] + DATAFLOW + ['--dry_run=True']
    with pytest.raises(ConfigError, match=r"--top_k='ten': must be an integer"):
        matching.run(templates.launch_argv(argv, {templates.PIPELINE_ENV: 'matching'})[1])
    assert templates.launch(argv, environ={}) == 2  # an image built for no pipeline says so


def test_template_launch_writes_the_job_description_where_the_launcher_collects_it(tmp_path, data, gcs_emulator):
    bucket = gcs_emulator.create_bucket('hrbatch-templates')
    parameters = _string_parameters('matching', data, tmp_path / 'out')
    job_file = f'gs://{bucket}/template_launches/launch-1/job_object'
    argv = [f'--{k}={v}' for k, v in parameters.items()] + DATAFLOW + [
        f'--template_location={job_file}', f'--staging_location=gs://{bucket}/staging',
        f'--temp_location=gs://{bucket}/temp']
    assert templates.launch(argv, environ={templates.PIPELINE_ENV: 'matching', templates.IMAGE_ENV: IMAGE}) == 0
    job = json.loads(gcs_emulator.client.bucket(bucket).blob(job_file.split('/', 3)[3]).download_as_text())
    assert job['type'] == 'JOB_TYPE_BATCH'
    assert IMAGE in json.dumps(job['environment'])
    staged = [blob.name for blob in gcs_emulator.client.list_blobs(bucket, prefix='staging/')]
    assert any(name.endswith('pipeline.pb') for name in staged)
    assert not (tmp_path / 'out' / 'matches').exists()


def test_build_prints_docker_and_gcloud_commands_with_the_pinned_beam_version(capsys):
    assert templates.main(['build', '--pipeline', 'matching', '--image', IMAGE,
                           '--template', 'gs://b/templates/matching.json']) == 0
    lines = capsys.readouterr().out.splitlines()
    build, push, spec = (shlex.split(line) for line in lines)
    assert build[:2] == ['docker', 'build'] and f'BEAM_VERSION={templates.beam_version()}' in build
    assert 'PIPELINE=matching' in build and f'IMAGE={IMAGE}' in build
    assert push == ['docker', 'push', IMAGE]
    assert spec[:5] == ['gcloud', 'dataflow', 'flex-template', 'build', 'gs://b/templates/matching.json']
    assert spec[spec.index('--metadata-file') + 1] == 'templates/matching/metadata.json'
    assert templates.beam_version() == apache_beam.__version__


def test_run_checks_parameters_before_printing_the_gcloud_command(capsys):
    assert templates.main(['run', '--pipeline', 'matching', '--template', 'gs://b/t.json', '--job_name', 'm-1',
                           '--region', 'europe-west9', '--parameter', 'candidates=gs://b/c.parquet',
                           '--parameter', 'offers=gs://b/o.parquet', '--parameter', 'output=gs://b/out',
                           '--parameter', 'weights={"required_skills":0.5,"distance":0.5}']) == 0
    command = shlex.split(capsys.readouterr().out)
    flag = next(arg for arg in command if arg.startswith('--parameters='))
    # A comma inside the JSON value: gcloud's ^DELIM^ escape keeps it one parameter.
    delimiter = flag[len('--parameters=^')]
    assert flag.startswith(f'--parameters=^{delimiter}^')
    pairs = dict(p.split('=', 1) for p in flag[len('--parameters=^x^'):].split(delimiter))
    assert json.loads(pairs['weights']) == {'required_skills': 0.5, 'distance': 0.5}
    with pytest.raises(ConfigError, match='unknown parameter'):
        templates.main(['run', '--pipeline', 'matching', '--template', 'gs://b/t.json', '--job_name', 'm',
                        '--region', 'r', '--parameter', 'candidate=x'])
    with pytest.raises(ConfigError, match='needs the parameter'):
        templates.main(['run', '--pipeline', 'matching', '--template', 'gs://b/t.json', '--job_name', 'm',
                        '--region', 'r', '--parameter', 'candidates=x'])
    with pytest.raises(ConfigError, match=r"--force='yes'"):
        templates.main(['run', '--pipeline', 'matching', '--template', 'gs://b/t.json', '--job_name', 'm',
                        '--region', 'r', '--parameter', 'candidates=x', '--parameter', 'offers=y',
                        '--parameter', 'output=z', '--parameter', 'force=yes'])


def test_the_image_runs_the_launcher_entry_point_it_copies(tmp_path):
    """templates/Dockerfile copies templates/main.py where FLEX_TEMPLATE_PYTHON_PY_FILE points, and
    that file, run as the launcher runs it, refuses to start without the image's pipeline."""
    dockerfile = (templates.TEMPLATES_DIR / 'Dockerfile').read_text(encoding='utf-8')
    copied = re.search(r'^COPY templates/main\.py (\S+)$', dockerfile, re.M).group(1)
    assert re.search(rf'^ENV FLEX_TEMPLATE_PYTHON_PY_FILE={re.escape(copied)}$', dockerfile, re.M)
    assert re.search(r'^FROM apache/beam_python3\.11_sdk:\$\{BEAM_VERSION\}$', dockerfile, re.M)
    env = {k: v for k, v in os.environ.items() if k != templates.PIPELINE_ENV}
    done = subprocess.run([sys.executable, str(templates.TEMPLATES_DIR / 'main.py'), '--output=x'],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert f'${templates.PIPELINE_ENV} is not set' in done.stderr

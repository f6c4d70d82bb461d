"""hrbatch schedule export: Kubernetes CronJobs, Cloud Scheduler commands, Airflow DAGs, validated.

The Airflow DAGs are compiled and checked with ``ast`` here; they are also imported by Airflow when
``$HRBATCH_AIRFLOW_PYTHON`` names an interpreter with ``apache-airflow``,
``apache-airflow-providers-apache-beam`` and ``apache-airflow-providers-google`` (the Beam operators
refuse to be constructed without it). Airflow is not a dependency of hrbatch: ``python -m venv V &&
V/bin/pip install apache-airflow==3.3.2 apache-airflow-providers-apache-beam==6.3.1
apache-airflow-providers-google==22.8.0`` takes about 3.5 minutes.
"""
import ast
import io
import json
import os
import py_compile
import shlex
import subprocess
import textwrap

import pytest
import yaml

from pipelines import schedule_export as export
from pipelines import scheduler as sched
from transforms.errors import ConfigError

EXAMPLE = 'pipelines/schedules.example.yaml'


@pytest.fixture
def config():
    return sched.load_config(EXAMPLE)


def _export(target, tmp_path, *extra):
    out = io.StringIO()
    assert sched.main(['export', '--config', EXAMPLE, '--target', target, '--output', str(tmp_path), *extra],
                      out=out) == 0
    return out.getvalue()


# ------------------------------------------------------------------------------------------------
# Kubernetes


def _check_types(node, schema, where='CronJob'):
    """``schema``: field -> type, or a nested schema (dict), or [schema] for a list of objects."""
    for field, expected in schema.items():
        assert field in node, f'{where}.{field} missing'
        value = node[field]
        if isinstance(expected, dict):
            assert isinstance(value, dict), f'{where}.{field} must be an object'
            _check_types(value, expected, f'{where}.{field}')
        elif isinstance(expected, list):
            assert isinstance(value, list) and value, f'{where}.{field} must be a non-empty list'
            for index, item in enumerate(value):
                _check_types(item, expected[0], f'{where}.{field}[{index}]')
        else:
            assert isinstance(value, expected) and not isinstance(value, bool) or expected is bool, \
                f'{where}.{field} must be {expected.__name__}, got {value!r}'


CRONJOB = {
    'apiVersion': str, 'kind': str, 'metadata': {'name': str, 'namespace': str, 'labels': dict},
    'spec': {'schedule': str, 'timeZone': str, 'concurrencyPolicy': str, 'startingDeadlineSeconds': int,
             'successfulJobsHistoryLimit': int, 'failedJobsHistoryLimit': int,
             'jobTemplate': {'spec': {'backoffLimit': int, 'podFailurePolicy': {'rules': [{'action': str,
                                                                                             'onExitCodes': dict}]},
                                      'template': {'spec': {
                                          'restartPolicy': str,
                                          'containers': [{'name': str, 'image': str, 'command': list,
                                                          'volumeMounts': list}],
                                          'volumes': [{'name': str, 'configMap': {'name': str}}]}}}}},
}


def test_k8s_cronjobs_have_the_required_fields_with_their_types(tmp_path, config):
    printed = _export('k8s', tmp_path)
    assert 'not exported  matching-nightly: runner dataflow is Dataflow' in printed
    assert 'SQLite file' in printed           # the example's ledger cannot be shared by pods
    job = yaml.safe_load((tmp_path / 'payroll-acme.yaml').read_text())
    _check_types(job, CRONJOB)
    schedule = config.schedule('payroll-acme')
    spec = job['spec']
    assert (job['apiVersion'], job['kind'], job['metadata']['name']) == ('batch/v1', 'CronJob', 'payroll-acme')
    assert spec['schedule'] == '0 22 25 * *' and spec['timeZone'] == 'Europe/Paris'
    assert spec['concurrencyPolicy'] == 'Forbid' and spec['startingDeadlineSeconds'] == 3600
    assert spec['jobTemplate']['spec']['backoffLimit'] == schedule.retries == 3
    pod = spec['jobTemplate']['spec']['template']['spec']
    assert pod['restartPolicy'] == 'Never'     # required by podFailurePolicy
    rule = spec['jobTemplate']['spec']['podFailurePolicy']['rules'][0]
    assert rule == {'action': 'FailJob', 'onExitCodes': {'containerName': 'hrbatch', 'operator': 'In', 'values': [2]}}
    (container,) = pod['containers']
    assert container['command'] == ['hrbatch', 'schedule', 'exec', '--config', '/etc/hrbatch/schedules.yaml',
                                    '--schedule', 'payroll-acme']
    assert container['volumeMounts'][0]['mountPath'] == '/etc/hrbatch'
    assert pod['volumes'][0]['configMap']['name'] == 'hrbatch-schedules'
    # The ConfigMap carries the schedules file the pod reads, unchanged.
    configmap = yaml.safe_load((tmp_path / 'configmap.yaml').read_text())
    assert configmap['kind'] == 'ConfigMap' and configmap['metadata']['name'] == 'hrbatch-schedules'
    assert yaml.safe_load(configmap['data']['schedules.yaml']) == yaml.safe_load(open(EXAMPLE).read())


def test_the_k8s_pod_command_runs_the_occurrence_on_the_flink_runner_with_the_windows(config, tmp_path):
    # What the container's command resolves to when the CronJob fires on 2026-11-25 22:00 Paris.
    config = sched.SchedulerConfig.from_document(yaml.safe_load(open(EXAMPLE).read()),
                                                 path='/etc/hrbatch/schedules.yaml')
    argv = sched.exec_argv(config, 'payroll-acme', sched.parse_instant('2026-11-25T21:00:30Z'))
    assert argv[:3] == ['run', 'payroll', '--period=2026-11']
    assert argv[argv.index('--run_key') + 1] == 'payroll-acme:2026-11-25T22:00'
    assert '--runner=FlinkRunner' in argv and '--job_endpoint=flink-jobserver:8099' in argv
    assert argv[-4:] == ['--windows', '/etc/hrbatch/schedules.yaml', '--company', 'acme']
    # A late start (within startingDeadlineSeconds) still gets the occurrence that fired.
    late = sched.exec_argv(config, 'payroll-acme', sched.parse_instant('2026-11-25T21:50:00Z'))
    assert late[late.index('--run_key') + 1] == 'payroll-acme:2026-11-25T22:00'


# ------------------------------------------------------------------------------------------------
# Cloud Scheduler


def test_cloud_scheduler_commands_launch_the_flex_template(tmp_path, config):
    printed = _export('cloud-scheduler', tmp_path)
    assert 'not exported  payroll-acme: runner flink is not Dataflow' in printed
    script = (tmp_path / 'matching-nightly.sh').read_text()
    (line,) = [l for l in script.splitlines() if l.startswith('gcloud ')]
    argv = shlex.split(line)
    assert argv[:6] == ['gcloud', 'scheduler', 'jobs', 'create', 'http', 'matching-nightly']
    flags = dict(a[2:].split('=', 1) for a in argv[6:])
    assert flags['schedule'] == '30 2 * * *' and flags['time-zone'] == 'Europe/Paris'
    assert flags['uri'] == ('https://dataflow.googleapis.com/v1b3/projects/my-project/locations/europe-west9/'
                            'flexTemplates:launch')
    assert flags['http-method'] == 'POST' and flags['max-retry-attempts'] == '2'
    assert flags['min-backoff'] == '60s' and flags['max-backoff'] == '3600s' and flags['max-doublings'] == '5'
    assert flags['oauth-service-account-email'].endswith('.iam.gserviceaccount.com')
    launch = json.loads(flags['message-body'])['launchParameter']
    assert launch['containerSpecGcsPath'] == 'gs://my-bucket/templates/matching.json'
    assert launch['environment'] == {'tempLocation': 'gs://my-bucket/tmp'}
    assert launch['parameters']['top_k'] == '100' and launch['parameters']['company'] == 'acme'
    assert launch['parameters']['windows'] == 'gs://my-bucket/config/schedules.yaml'
    # Every parameter is one of the template's, as metadata.json declares them.
    declared = {p['name'] for p in json.loads(open('templates/matching/metadata.json').read())['parameters']}
    assert set(launch['parameters']) <= declared


def test_cloud_scheduler_refuses_what_a_fixed_request_cannot_say(config):
    schedule = config.schedule('matching-nightly')
    timed = sched.Schedule(**{**schedule.__dict__, 'args': schedule.args + ('--output=gs://b/out-{scheduled_date}',)})
    with pytest.raises(ConfigError, match='depends on the scheduled time'):
        export.launch_body(config, timed)
    bad = sched.Schedule(**{**schedule.__dict__, 'args': ('--no_such_option=1',)})
    with pytest.raises(ConfigError, match='no_such_option is not a parameter of template matching'):
        export.launch_body(config, bad)


# ------------------------------------------------------------------------------------------------
# Airflow


def _dag_call(tree):
    return next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'DAG')


def _keywords(call):
    return {k.arg: k.value for k in call.keywords}


def test_airflow_dags_compile_and_use_the_beam_provider(tmp_path, config):
    _export('airflow', tmp_path)
    path = tmp_path / 'hrbatch_payroll_acme.py'
    py_compile.compile(str(path), doraise=True)
    tree = ast.parse(path.read_text())
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ('airflow.providers.apache.beam.operators.beam', 'BeamRunPythonPipelineOperator') in imports
    assert ('airflow.sdk', 'DAG') in imports and ('airflow', 'DAG') in imports
    dag = _keywords(_dag_call(tree))
    assert ast.literal_eval(dag['schedule']) == '0 22 25 * *'
    assert ast.literal_eval(dag['dag_id']) == 'hrbatch-payroll-acme'
    assert ast.literal_eval(dag['catchup']) is False and ast.literal_eval(dag['max_active_runs']) == 1
    assert ast.unparse(dag['start_date']) == 'pendulum.datetime(2026, 1, 1, tz=TIMEZONE)'
    timezone = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == 'TIMEZONE')
    assert ast.literal_eval(timezone.value) == 'Europe/Paris'
    default_args = ast.literal_eval(ast.unparse(dag['default_args']).replace('datetime.timedelta(seconds=', '(')
                                    .replace(')', ',)'))
    assert default_args['retries'] == 3 and default_args['retry_exponential_backoff'] is True
    operator = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                    and getattr(n.func, 'id', None) == 'BeamRunPythonPipelineOperator')
    task = {k: ast.literal_eval(v) for k, v in _keywords(operator).items()}
    assert task['py_file'] == 'pipelines.payroll' and task['py_options'] == ['-m'] and task['runner'] == 'FlinkRunner'
    options = task['pipeline_options']
    assert options['run_key'] == "payroll-acme:{{ data_interval_end.in_timezone('Europe/Paris').strftime('%Y-%m-%dT%H:%M') }}"
    assert options['period'] == "{{ data_interval_end.in_timezone('Europe/Paris').strftime('%Y-%m') }}"
    assert options['flink_master'] == 'flink-jobmanager:8081' and 'runner' not in options
    assert task['priority_weight'] == 100


def test_airflow_dags_pass_a_linter(tmp_path):
    pyflakes = pytest.importorskip('pyflakes.api', reason='pyflakes is not installed')
    _export('airflow', tmp_path)
    for path in tmp_path.glob('*.py'):
        assert pyflakes.checkPath(str(path)) == 0, path


AIRFLOW_PYTHON = os.environ.get('HRBATCH_AIRFLOW_PYTHON')


@pytest.mark.skipif(not AIRFLOW_PYTHON, reason='Airflow is not a dependency of hrbatch: set HRBATCH_AIRFLOW_PYTHON '
                    'to an interpreter with apache-airflow and apache-airflow-providers-apache-beam to import the '
                    'DAGs (see the module docstring); they are compiled and checked with ast above')
def test_airflow_imports_the_dags_and_reads_schedule_timezone_and_task(tmp_path):
    _export('airflow', tmp_path)
    script = textwrap.dedent(f'''
        import importlib.util, json, pathlib
        found = {{}}
        for path in sorted(pathlib.Path({str(tmp_path)!r}).glob('*.py')):
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as error:  # DataflowRunner needs apache-airflow-providers-google at parse time
                if type(error).__name__ != 'AirflowOptionalProviderFeatureException':
                    raise
                found[path.stem] = {{'needs': 'google provider'}}
                continue
            dag = module.dag
            (task,) = dag.tasks
            timetable = dag.timetable
            found[dag.dag_id] = {{'timezone': str(getattr(timetable, 'timezone', None) or dag.timezone),
                                  'cron': str(getattr(timetable, 'expression', None) or timetable.summary),
                                  'timetable': type(timetable).__name__,
                                  'operator': type(task).__name__, 'retries': task.retries,
                                  'run_key': task.pipeline_options['run_key']}}
        print(json.dumps(found))
    ''')
    env = {**os.environ, 'AIRFLOW_HOME': str(tmp_path / 'airflow_home'), 'AIRFLOW__CORE__LOAD_EXAMPLES': 'False'}
    result = subprocess.run([AIRFLOW_PYTHON, '-c', script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    # Airflow's Beam operators need apache-airflow-providers-google installed to be constructed at all.
    needs_google = {'hrbatch_matching_nightly', 'hrbatch_payroll_acme'} & set(found)
    if needs_google:
        pytest.skip(f'{AIRFLOW_PYTHON} lacks apache-airflow-providers-google, which the Beam operators need')
    assert set(found) == {'hrbatch-payroll-acme', 'hrbatch-matching-nightly'}
    payroll = found['hrbatch-payroll-acme']
    assert payroll['timezone'] == 'Europe/Paris' and payroll['cron'] == '0 22 25 * *', payroll
    # A cron string in Airflow 3 fires at the cron time (CronTriggerTimetable): data_interval_end is it.
    assert payroll['timetable'] == 'CronTriggerTimetable'
    assert payroll['operator'] == 'BeamRunPythonPipelineOperator' and payroll['retries'] == 3
    assert payroll['run_key'].startswith('payroll-acme:{{')

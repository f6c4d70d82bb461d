"""``hrbatch schedule export``: the schedules of a schedules file, for the job systems users already run.

    hrbatch schedule export --config schedules.yaml --target k8s --output deploy/k8s
    hrbatch schedule export --config schedules.yaml --target cloud-scheduler --output deploy/gcp
    hrbatch schedule export --config schedules.yaml --target airflow --output dags/

* ``k8s`` (schedules on any runner but Dataflow, typically Flink): one ``batch/v1`` CronJob per schedule,
  ``<name>.yaml``, plus ``configmap.yaml`` holding the schedules file. Each CronJob has the schedule's
  ``schedule`` and ``timeZone``, ``concurrencyPolicy: Forbid``, ``startingDeadlineSeconds`` (the
  schedule's ``max_lateness``, or ``export.kubernetes.starting_deadline``), ``backoffLimit`` = its
  ``retries`` (Kubernetes retries failed pods with its own exponential back-off, 10 s doubling to 6 min),
  and a pod failure policy that fails the Job at once on exit code 2 (a configuration error or a
  window refusal: retrying cannot help). The pod runs ``hrbatch schedule exec --config
  /etc/hrbatch/schedules.yaml --schedule NAME``: the occurrence that just fell due, with the same run
  key as the hrbatch scheduler (a second trigger of one local time is skipped by the run ledger), its
  args rendered, on the runner's Beam options (the Flink job endpoint), refused outside the company's
  windows (a CronJob cannot defer). The ledger must be reachable from the pods (postgresql://).
* ``cloud-scheduler`` (schedules on a runner with ``--runner=DataflowRunner``): ``<name>.sh`` with the
  ``gcloud scheduler jobs create http`` command that POSTs a Flex Template launch
  (``flexTemplates:launch``) of ``templates/<pipeline>`` with the schedule's args as template
  parameters, checked as the launch will parse them; retries map to Cloud Scheduler's
  ``--max-retry-attempts``, ``--min-backoff``, ``--max-backoff``, ``--max-doublings``. A request body
  is fixed text: a schedule whose args use ``{scheduled...}`` placeholders cannot be exported there
  (use Airflow or the hrbatch scheduler). With ``export.cloud_scheduler.windows`` (a gs:// copy of the
  schedules file) the launcher refuses a launch outside the company's windows.
* ``airflow`` (every schedule): ``hrbatch_<name>.py``, a DAG with the schedule and a pendulum
  ``start_date`` in its time zone, one ``BeamRunPythonPipelineOperator`` (``apache-airflow-providers-
  apache-beam``) running ``python -m pipelines.<pipeline>`` with the runner's options, the args
  rendered from the run's ``data_interval_end`` (its scheduled time), the same run key as the hrbatch
  scheduler, and the retries as Airflow's exponential back-off; ``catchup`` is True for ``catch_up:
  all`` only; ``max_active_runs=1``. The provider's operators need ``apache-airflow-providers-google``
  installed on the Airflow side even for Flink.
"""
from __future__ import annotations

import datetime
import json
import pathlib
import re
import shlex
import sys
import typing

import yaml

from pipelines import options as opts
from pipelines import registry
from pipelines import scheduler as sched
from transforms.errors import ConfigError

TARGETS = ('k8s', 'cloud-scheduler', 'airflow')
CONFIG_MOUNT = '/etc/hrbatch'
CONFIG_FILE = 'schedules.yaml'
DATAFLOW_LAUNCH = 'https://dataflow.googleapis.com/v1b3/projects/{project}/locations/{region}/flexTemplates:launch'
_PRIORITY_WEIGHT = {'critical': 100, 'default': 10, 'low': 1}
# Beam options of a Dataflow runner that become the Flex Template launch's runtime environment.
_ENVIRONMENT = {'temp_location': 'tempLocation', 'staging_location': 'stagingLocation', 'num_workers': 'numWorkers',
                'max_num_workers': 'maxWorkers', 'machine_type': 'machineType', 'network': 'network',
                'subnetwork': 'subnetwork', 'service_account_email': 'serviceAccountEmail',
                'worker_zone': 'workerZone', 'worker_region': 'workerRegion'}
_INTEGER_ENVIRONMENT = ('numWorkers', 'maxWorkers')
_PLACEHOLDER = re.compile(r'\{(scheduled|scheduled_date|previous_month|run_key)[^}]*\}')


def _flags(tokens: typing.Iterable[str]) -> dict[str, str | bool]:
    """``--name=value`` / ``--name value`` / ``--flag`` tokens as a mapping (``True`` for a bare flag)."""
    tokens, values = list(tokens), {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith('--'):
            raise ConfigError(f'argument {token!r}: expected --name=value')
        name, sep, value = token[2:].partition('=')
        if sep:
            values[name] = value
        elif index + 1 < len(tokens) and not tokens[index + 1].startswith('--'):
            index += 1
            values[name] = tokens[index]
        else:
            values[name] = True
        index += 1
    return values


def runner_kind(config: sched.SchedulerConfig, schedule: sched.Schedule) -> str:
    runner = _flags(config.runners[schedule.runner]).get('runner', 'local')
    return 'dataflow' if str(runner).lower() in ('dataflowrunner', 'dataflow') else 'other'


def _section(config: sched.SchedulerConfig, name: str, required: tuple[str, ...]) -> dict:
    section = dict(config.export.get(name) or {})
    missing = [key for key in required if not section.get(key)]
    if missing:
        raise ConfigError(f'{config.path or "schedules"}: export.{name} needs {", ".join(missing)}')
    return section


# ------------------------------------------------------------------------------------------------
# Kubernetes


def cronjob(config: sched.SchedulerConfig, schedule: sched.Schedule) -> dict:
    k8s = _section(config, 'kubernetes', ('image',))
    labels = {'app.kubernetes.io/name': 'hrbatch', 'app.kubernetes.io/component': 'schedule',
              'hrbatch/schedule': schedule.name, 'hrbatch/pipeline': schedule.pipeline}
    deadline = sched.parse_duration(k8s['starting_deadline'], where='export.kubernetes.starting_deadline') \
        if k8s.get('starting_deadline') else schedule.max_lateness
    pod = {
        'restartPolicy': 'Never',
        'containers': [{
            'name': 'hrbatch',
            'image': k8s['image'],
            'command': ['hrbatch', 'schedule', 'exec', '--config', f'{CONFIG_MOUNT}/{CONFIG_FILE}',
                        '--schedule', schedule.name],
            'env': [{'name': 'HRBATCH_OPERATOR', 'value': config.operator}],
            'volumeMounts': [{'name': 'schedules', 'mountPath': CONFIG_MOUNT, 'readOnly': True}],
        }],
        'volumes': [{'name': 'schedules', 'configMap': {'name': k8s.get('config_map', 'hrbatch-schedules')}}],
    }
    if k8s.get('service_account'):
        pod['serviceAccountName'] = k8s['service_account']
    metadata = {'name': schedule.name, 'labels': labels,
                'annotations': {'hrbatch/cron': schedule.cron, 'hrbatch/priority': schedule.priority,
                                'hrbatch/catch-up': schedule.catch_up}}
    if k8s.get('namespace'):
        metadata['namespace'] = k8s['namespace']
    return {
        'apiVersion': 'batch/v1',
        'kind': 'CronJob',
        'metadata': metadata,
        'spec': {
            'schedule': schedule.cron,
            'timeZone': schedule.timezone,
            'concurrencyPolicy': 'Forbid',
            'startingDeadlineSeconds': int(deadline.total_seconds()),
            'successfulJobsHistoryLimit': 3,
            'failedJobsHistoryLimit': 3,
            'jobTemplate': {
                'metadata': {'labels': labels},
                'spec': {
                    'backoffLimit': schedule.retries,
                    # Exit 2 is a configuration error or a window refusal: no retry can help.
                    'podFailurePolicy': {'rules': [{'action': 'FailJob', 'onExitCodes': {
                        'containerName': 'hrbatch', 'operator': 'In', 'values': [2]}}]},
                    'template': {'metadata': {'labels': labels}, 'spec': pod},
                },
            },
        },
    }


def configmap(config: sched.SchedulerConfig, text: str) -> dict:
    k8s = _section(config, 'kubernetes', ('image',))
    metadata = {'name': k8s.get('config_map', 'hrbatch-schedules'), 'labels': {'app.kubernetes.io/name': 'hrbatch'}}
    if k8s.get('namespace'):
        metadata['namespace'] = k8s['namespace']
    return {'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': metadata, 'data': {CONFIG_FILE: text}}


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # plain YAML, no &anchors: easier to read and to diff
        return True


def _yaml(document: dict) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _k8s_files(config, schedules, source_text) -> dict[str, str]:
    files = {'configmap.yaml': _yaml(configmap(config, source_text))}
    for schedule in schedules:
        header = (f'# Generated by hrbatch schedule export from {pathlib.Path(config.path or "schedules.yaml").name}: '
                  'do not edit.\n# DST: Kubernetes decides when a local time in a DST change fires; the run key '
                  '(schedule:local time) makes a second trigger of one local time a no-op.\n')
        files[f'{schedule.name}.yaml'] = header + _yaml(cronjob(config, schedule))
    return files


# ------------------------------------------------------------------------------------------------
# Cloud Scheduler -> Dataflow Flex Template


def _duration_text(delta: datetime.timedelta) -> str:
    return f'{int(delta.total_seconds())}s'


def launch_body(config: sched.SchedulerConfig, schedule: sched.Schedule) -> dict:
    """The ``flexTemplates:launch`` request of ``schedule``, its parameters checked like the launch."""
    gcp = _section(config, 'cloud_scheduler', ('project', 'region', 'templates'))
    placeholder = next((a for a in schedule.args if _PLACEHOLDER.search(a)), None)
    if placeholder:
        raise ConfigError(f'schedule {schedule.name}: argument {placeholder!r} depends on the scheduled time, '
                          'but a Cloud Scheduler request body is fixed: export it to airflow, or run it with '
                          'hrbatch schedule')
    parameters = {k: ('true' if v is True else str(v)) for k, v in _flags(schedule.render_args(
        datetime.datetime(2000, 1, 1))).items()}
    if schedule.company and gcp.get('windows'):
        parameters.update(windows=str(gcp['windows']), company=schedule.company)
    if gcp.get('ledger'):  # the run ledger and audit trail as the launcher reaches them (postgresql://)
        parameters['ledger'] = str(gcp['ledger'])
    module = registry.load(schedule.pipeline)
    known = {option.name: option for option in module.OPTIONS}
    for key, text in parameters.items():
        if key not in known:
            raise ConfigError(f'schedule {schedule.name}: {key} is not a parameter of template {schedule.pipeline}')
        known[key].parse(text)
    missing = [o.name for o in module.OPTIONS if o.required and o.name not in parameters]
    if missing:
        raise ConfigError(f'schedule {schedule.name}: template {schedule.pipeline} needs {", ".join(missing)}')
    environment = {}
    for key, value in _flags(config.runners[schedule.runner]).items():
        if key in ('runner', 'project', 'region'):
            continue
        if key not in _ENVIRONMENT:
            raise ConfigError(f'runner {schedule.runner}: --{key} has no Flex Template launch equivalent; '
                              f'allowed: {", ".join("--" + k for k in _ENVIRONMENT)}')
        name = _ENVIRONMENT[key]
        environment[name] = int(value) if name in _INTEGER_ENVIRONMENT else value
    job_name = schedule.name if schedule.name[0].isalpha() else f'hrbatch-{schedule.name}'
    launch = {'jobName': job_name, 'containerSpecGcsPath': str(gcp['templates']).format(pipeline=schedule.pipeline),
              'parameters': parameters}
    if environment:
        launch['environment'] = environment
    return {'launchParameter': launch}


def gcloud_command(config: sched.SchedulerConfig, schedule: sched.Schedule) -> list[str]:
    gcp = _section(config, 'cloud_scheduler', ('project', 'region', 'templates'))
    body = json.dumps(launch_body(config, schedule), sort_keys=True, separators=(',', ':'))
    backoff = schedule.backoff
    doublings = 0
    delay = backoff.initial.total_seconds()
    while delay * backoff.factor <= backoff.max.total_seconds() and doublings < 16 and backoff.factor > 1:
        delay *= backoff.factor
        doublings += 1
    command = ['gcloud', 'scheduler', 'jobs', 'create', 'http', schedule.name,
               f'--project={gcp["project"]}', f'--location={gcp.get("location", gcp["region"])}',
               f'--schedule={schedule.cron}', f'--time-zone={schedule.timezone}',
               '--uri=' + DATAFLOW_LAUNCH.format(project=gcp['project'], region=gcp['region']),
               '--http-method=POST', '--headers=Content-Type=application/json',
               f'--message-body={body}',
               f'--max-retry-attempts={schedule.retries}',
               f'--min-backoff={_duration_text(backoff.initial)}', f'--max-backoff={_duration_text(backoff.max)}',
               f'--max-doublings={doublings}',
               f'--description=hrbatch {schedule.pipeline} ({schedule.priority}), generated by hrbatch schedule export']
    if gcp.get('service_account'):
        command += [f'--oauth-service-account-email={gcp["service_account"]}',
                    '--oauth-token-scope=https://www.googleapis.com/auth/cloud-platform']
    return command


# ------------------------------------------------------------------------------------------------
# Airflow


class _JinjaWall:
    """Formats like the scheduled local time, as the Jinja expression Airflow renders per run."""

    def __init__(self, tz: str):
        self.tz = tz

    def expression(self, fmt: str, tail: str = '') -> str:
        return f"{{{{ data_interval_end.in_timezone('{self.tz}'){tail}.strftime('{fmt}') }}}}"

    def __format__(self, spec: str) -> str:
        return self.expression(spec or '%Y-%m-%d %H:%M:%S')


def airflow_placeholders(schedule: sched.Schedule) -> dict:
    wall = _JinjaWall(schedule.timezone)
    return {'scheduled': wall, 'scheduled_date': wall.expression('%Y-%m-%d'),
            'previous_month': wall.expression('%Y-%m', ".start_of('month').subtract(days=1)"),
            'schedule': schedule.name, 'run_key': f'{schedule.name}:' + wall.expression('%Y-%m-%dT%H:%M')}


def airflow_dag(config: sched.SchedulerConfig, schedule: sched.Schedule) -> str:
    """The source of the DAG file of ``schedule``."""
    section = dict(config.export.get('airflow') or {})
    values = airflow_placeholders(schedule)
    args = _flags(arg.format_map(values) for arg in schedule.args)
    runner_flags = _flags(config.runners[schedule.runner])
    runner = str(runner_flags.pop('runner', 'DirectRunner'))
    options = {**runner_flags, **args, 'run_key': values['run_key'], 'ledger': config.ledger,
               'operator': config.operator}
    if schedule.company and section.get('windows'):  # the schedules file as the Airflow workers see it
        options.update(windows=str(section['windows']), company=schedule.company)
    start = section.get('start_date', '2026-01-01')
    start_date = datetime.date.fromisoformat(str(start))
    backoff = schedule.backoff
    source = f'''"""hrbatch schedule {schedule.name}: {schedule.pipeline} at '{schedule.cron}' ({schedule.timezone}).

Generated by hrbatch schedule export --target airflow from {pathlib.Path(config.path or "schedules.yaml").name}: do not edit.
The run key is the schedule and its local scheduled time, as with hrbatch schedule: a run key that
succeeded in the run ledger is not run again, whoever triggers it.
"""
import datetime

import pendulum
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG

TIMEZONE = {schedule.timezone!r}

with DAG(
    dag_id={'hrbatch-' + schedule.name!r},
    description={f'hrbatch {schedule.pipeline} ({schedule.priority})'!r},
    schedule={schedule.cron!r},
    start_date=pendulum.datetime({start_date.year}, {start_date.month}, {start_date.day}, tz=TIMEZONE),
    catchup={schedule.catch_up == 'all'!r},
    max_active_runs=1,
    tags=['hrbatch', {schedule.pipeline!r}, {schedule.priority!r}],
    default_args={{
        'retries': {schedule.retries},
        'retry_delay': datetime.timedelta(seconds={int(backoff.initial.total_seconds())}),
        'retry_exponential_backoff': {backoff.factor > 1!r},
        'max_retry_delay': datetime.timedelta(seconds={int(backoff.max.total_seconds())}),
    }},
) as dag:
    BeamRunPythonPipelineOperator(
        task_id={schedule.pipeline!r},
        py_file={registry.PIPELINES[schedule.pipeline]!r},
        py_options=['-m'],
        py_interpreter={str(section.get('python', 'python3'))!r},
        runner={runner!r},
        pipeline_options={_pformat(options)},
        priority_weight={_PRIORITY_WEIGHT[schedule.priority]},
    )
'''
    return source


def _pformat(options: dict) -> str:
    lines = ['{']
    for key, value in options.items():
        lines.append(f'            {key!r}: {value!r},')
    lines.append('        }')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# CLI


def export(config: sched.SchedulerConfig, target: str, output: str, *, only: typing.Collection[str] = (),
           source_text: str = '', out: typing.TextIO | None = None) -> list[pathlib.Path]:
    """Writes the files of ``target`` to ``output``; returns their paths. A schedule of the other
    runner kind is listed as not exported (k8s: not Dataflow; cloud-scheduler: Dataflow)."""
    out = out or sys.stdout
    if target not in TARGETS:
        raise ConfigError(f'--target={target!r}: one of {", ".join(TARGETS)}')
    schedules = [config.schedule(name) for name in only] if only else list(config.schedules)
    chosen = []
    for schedule in schedules:
        kind = runner_kind(config, schedule)
        if (target == 'k8s' and kind == 'dataflow') or (target == 'cloud-scheduler' and kind != 'dataflow'):
            print(f'not exported  {schedule.name}: runner {schedule.runner} is '
                  f'{"Dataflow" if kind == "dataflow" else "not Dataflow"}; export it with --target '
                  f'{"cloud-scheduler" if kind == "dataflow" else "k8s"} or airflow', file=out)
            continue
        chosen.append(schedule)
    if target == 'k8s':
        if config.ledger.startswith('sqlite:'):
            print(f'warning: ledger {config.ledger} is a SQLite file: every pod would get its own; use '
                  'postgresql:// so the run keys are shared', file=out)
        files = _k8s_files(config, chosen, source_text)
    elif target == 'cloud-scheduler':
        files = {}
        for schedule in chosen:
            placeholder = next((a for a in schedule.args if _PLACEHOLDER.search(a)), None)
            if placeholder:
                print(f'not exported  {schedule.name}: argument {placeholder!r} depends on the scheduled time, '
                      'but a Cloud Scheduler request body is fixed; export it with --target airflow, or run it '
                      'with hrbatch schedule', file=out)
                continue
            files[f'{schedule.name}.sh'] = ('#!/bin/sh\n# Generated by hrbatch schedule export: do not edit.\n'
                                            'set -e\n' + shlex.join(gcloud_command(config, schedule)) + '\n')
    else:
        files = {f'hrbatch_{s.name.replace("-", "_")}.py': airflow_dag(config, s) for s in chosen}
    directory = pathlib.Path(output)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text, encoding='utf-8')
        written.append(path)
        print(path, file=out)
    return written


def main(argv: list[str], out: typing.TextIO | None = None) -> int:
    parser = opts.ConfigErrorParser(prog='hrbatch schedule export',
                                    description='Write the schedules as Kubernetes CronJobs, Cloud Scheduler '
                                                'commands or Airflow DAGs.')
    parser.add_argument('--config', required=True)
    parser.add_argument('--target', required=True, choices=TARGETS)
    parser.add_argument('--output', required=True, help='directory to write the files to')
    parser.add_argument('--schedule', action='append', default=[], help='only this schedule (repeatable)')
    args = parser.parse_args(argv)
    config = sched.load_config(args.config)
    text = pathlib.Path(args.config).read_text(encoding='utf-8')
    export(config, args.target, args.output, only=args.schedule, source_text=text, out=out)
    return 0

"""The life of every pipeline run: ledger first, audit trail throughout, checkpoints for resumption.

``execute`` wraps a pipeline's work:

1. the run ledger decides: a run key that already succeeded is a no-op that says so (``--force``
   recomputes); a key still marked ``running`` (its process died) is refused unless ``--resume``,
   which takes it over and reuses the work it had committed;
2. the audit trail records the start (or the skip, the override, the takeover), then the success or
   the failure, with counts and references, never personal data;
3. the work runs with a checkpoint directory scoped to the run key, the parameters and the inputs;
   it is removed once the run has succeeded.

Every pipeline declares ``LIFECYCLE_OPTIONS`` with its own options.
"""
import dataclasses
import datetime
import logging
import os
import typing

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import GoogleCloudOptions
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import TestOptions

from pipelines import options as opts
from pipelines import progress
from pipelines.runner import pipeline_options
from transforms import audit
from transforms import ledger
from transforms.checkpoints import CheckpointStore
from transforms.checkpoints import checkpoint_scope
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.errors import ConfigError

_LOGGER = logging.getLogger(__name__)

LIFECYCLE_OPTIONS = (
    opts.Option('run_key', 'Logical key of the run: operation plus business scope, e.g. matching:2026-12-03. '
                'A key that already succeeded is not run again. Default: OPERATION:<today, UTC>.'),
    opts.Option('force', 'Run even if the run key already succeeded (recomputes, overwrites idempotently).',
                type='bool', default=False),
    opts.Option('resume', 'Take over a run of the same key that died (still marked running) and reuse the '
                'work it had committed.', type='bool', default=False),
    opts.Option('operator', 'Who runs this, for the audit trail. Default: $HRBATCH_OPERATOR, else the OS user.'),
    opts.Option('ledger', 'SQL database of the run ledger and the audit trail (sqlite:///PATH or '
                'postgresql://...). Default: $HRBATCH_DATABASE, else sqlite:///OUTPUT/hrbatch.db for a local output.'),
    opts.Option('run_id', 'Identifier of this run. Default: generated.'),
    opts.Option('windows', 'YAML file (local or gs://) whose companies: section holds the maintenance windows '
                '(pipelines/schedules.example.yaml). With --company, a run outside the windows is refused, naming '
                'the rule and when it may run, unless --force (refusal and override are audited). '
                'Default: $HRBATCH_WINDOWS.'),
    opts.Option('company', 'Whose maintenance windows of --windows apply to this run. Default: $HRBATCH_COMPANY.'),
)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    operation: str
    run_key: str
    ledger_url: str
    force: bool
    resume: bool
    operator: str | None
    run_id: str

    @classmethod
    def from_values(cls, operation: str, values: dict, output: str) -> 'RunSpec':
        url = values['ledger'] or os.environ.get('HRBATCH_DATABASE')
        if not url:
            if output.startswith('gs://'):
                raise ConfigError('--ledger is required when --output is on gs:// (or set HRBATCH_DATABASE): '
                                  'the run ledger and audit trail need a SQL database, e.g. postgresql://...')
            url = 'sqlite:///' + os.path.join(os.path.abspath(output), 'hrbatch.db')
        if not url.startswith(('sqlite:///', 'postgresql://')):
            raise ConfigError(f'--ledger={url!r}: must be sqlite:///PATH or postgresql://...')
        if values['force'] and values['resume']:
            raise ConfigError('--force and --resume cannot be combined: --force recomputes everything, '
                              '--resume reuses what a run that died had committed')
        today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        return cls(operation=operation, run_key=values['run_key'] or f'{operation}:{today}', ledger_url=url,
                   force=values['force'], resume=values['resume'], operator=values['operator'],
                   run_id=values['run_id'] or ledger.new_run_id(operation))


def describes_only(pipeline_options: PipelineOptions) -> bool:
    """True when this process only describes the job and never sees it end.

    That is a DataflowRunner ``--dry_run`` (nothing is submitted), or a Flex Template launch: the
    launcher passes ``--template_location`` and the Dataflow service starts the job from the file
    written there, after this process has exited. The ledger records how a run ended, so such a
    process must not open a ledger entry: it would stay ``running`` for ever and block the run key.
    """
    return bool(pipeline_options.view_as(TestOptions).dry_run
                or pipeline_options.view_as(GoogleCloudOptions).template_location)


def spill_dir(output: str, run_id: str) -> str:
    """Where a run of ``output`` spills the rows it groups by key (``routing.ReadGroupedByKey``): in the
    output, so it is on storage every worker reaches; removed when the run has read it."""
    return FileSystems.join(output, '.spill', run_id)


def database_target(database: str | None, output: str) -> str | None:
    """The SQL target of ``--database``: default SQLite beside a local output, none for gs://."""
    if database is None:
        return None if output.startswith('gs://') else 'sqlite:///' + os.path.join(os.path.abspath(output), 'hrbatch.db')
    if database.lower() == 'none':
        return None
    if not database.startswith(('sqlite:///', 'postgresql://')):
        raise ConfigError(f'--database={database!r}: must be sqlite:///PATH, postgresql://... or none')
    return database


def describe(operation: str, run_id: str, output: str, beam_args: list[str],
             build: typing.Callable[[typing.Any, CheckpointStore], typing.Any]) -> dict:
    """Builds the job and hands it to the runner without running it here: a DataflowRunner dry run,
    or a Flex Template launch (the job description goes to ``--template_location``).

    The run ledger is not used (see ``describes_only``). Checkpoints go to a directory of this run id
    alone: without the ledger nothing tells a later launch which committed work it may reuse.
    """
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    build(pipeline, CheckpointStore(FileSystems.join(output, '.checkpoints', run_id)))
    result = pipeline.run()
    _LOGGER.warning('%s %s: job described, not run here; the run ledger and audit trail do not record jobs '
                    'launched this way', operation, run_id)
    # The Beam job description (apiclient.Job) of a dry run; a template launch has none to return.
    return {'described': True, 'run_id': run_id, 'job': getattr(result, 'job', None)}


class Outcome(typing.NamedTuple):
    counts: dict        # figures for the ledger and the audit trail
    outputs: dict       # where the results are
    record_refs: dict   # references for the audit trail (paths, row counts), never personal data


def execute(spec: RunSpec, *, parameters: dict, inputs: list[str], data_categories: list[str],
            checkpoint_root: str, work: typing.Callable[[CheckpointStore], Outcome]) -> Outcome | None:
    """Runs ``work`` under the ledger and the audit trail; None when the run key already succeeded."""
    runs = ledger.RunLedger(spec.ledger_url)
    trail = audit.AuditTrail(spec.ledger_url)
    common = dict(operation=spec.operation, run_key=spec.run_key, data_categories=data_categories,
                  operator=spec.operator)
    begin = runs.begin(spec.run_key, spec.operation, parameters, ledger.fingerprint_inputs(inputs),
                       spec.operator, force=spec.force, resume=spec.resume, run_id=spec.run_id)
    print(begin.message)
    if not begin.should_run:
        trail.append(audit.RUN_SKIPPED, run_id=begin.run_id, **common)
        return None
    if begin.taken_over:
        trail.append(audit.RUN_TAKEN_OVER, run_id=begin.taken_over, record_refs={'by': begin.run_id}, **common)
    trail.append(audit.RUN_FORCED if begin.forced else audit.RUN_STARTED, run_id=begin.run_id,
                 record_refs={'inputs': inputs}, **common)
    store = CheckpointStore(FileSystems.join(
        checkpoint_root, checkpoint_scope(spec.run_key, parameters, inputs)))
    if spec.force:
        store.clear()  # recompute everything: nothing committed before counts
    try:
        outcome = work(store)
    except (progress.RunCancelled, KeyboardInterrupt) as error:
        # Ctrl-C or ``hrbatch cancel``: the run stopped; its committed work is reused by the next run.
        runs.cancel(begin.run_id)
        reason = getattr(error, 'reason', 'interrupted (Ctrl-C)')
        trail.append(audit.RUN_CANCELLED, run_id=begin.run_id, record_refs={'reason': reason}, **common)
        if isinstance(error, KeyboardInterrupt):
            raise progress.RunCancelled(f'run {begin.run_id} cancelled: {reason}', reason=reason) from None
        raise
    except BaseException as error:
        runs.fail(begin.run_id, ledger.short_error(error))
        trail.append(audit.RUN_FAILED, run_id=begin.run_id, record_refs={'error': type(error).__name__}, **common)
        raise
    runs.succeed(begin.run_id, outcome.counts, outcome.outputs)
    trail.append(audit.RUN_SUCCEEDED, run_id=begin.run_id, counts=outcome.counts,
                 record_refs=outcome.record_refs, **common)
    store.clear()
    return outcome


def counter(result, name: str) -> int:
    """A counter of the ``hrbatch`` metrics namespace, summed over steps. Counters are told apart by
    name, never by step: runners name steps differently (Flink reports its own ids)."""
    query = MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name)
    return sum(r.committed or 0 for r in result.metrics().query(query)['counters'])


def window_guard(operation: str, values: dict, spec: RunSpec) -> None:
    """Refuses a run outside the maintenance windows of ``--company`` in ``--windows`` unless ``--force``
    (``pipelines.scheduler.guard_run``); nothing to check without them."""
    from pipelines import scheduler  # the scheduler imports the registry, which imports the pipelines
    scheduler.guard_run(operation, values, spec)


def run_pipeline(operation: str, values: dict, beam_args: list[str], *, output: str,
                 make_config: typing.Callable[[str], typing.Any], build: typing.Callable,
                 summarize: typing.Callable, inputs: typing.Callable[[typing.Any], list[str]],
                 data_categories: list[str], private: tuple[str, ...] = ()) -> tuple[RunSpec, dict]:
    """Everything a pipeline's ``run`` does around its graph, the same for every operation.

    ``make_config(run_id)`` builds the pipeline's config; ``build(pipeline, config, store)`` adds its
    graph; ``summarize(result, config, built)`` returns ``(summary, Outcome)`` once it has run.
    Returns the run spec and the summary: ``{'skipped': True, 'run_key': ...}`` when the key already
    succeeded, ``{'described': True, ...}`` when the Beam options only describe the job
    (``--dry_run``, or ``--template_location`` as a Flex Template launcher passes: no ledger entry).
    ``private`` options (personal data such as a contact's name) are left out of the ledger's parameters.
    """
    spec = RunSpec.from_values(operation, values, output)
    window_guard(operation, values, spec)
    config = make_config(spec.run_id)
    if describes_only(pipeline_options(beam_args)):
        return spec, describe(operation, spec.run_id, output, beam_args,
                              lambda pipeline, store: build(pipeline, config, store))
    left_out = ('run_id', 'force', 'resume', 'operator', 'ledger', 'windows', 'company', *private)
    parameters = {k: v for k, v in values.items() if k not in left_out}
    parameters['beam_args'] = beam_args
    summary = {}

    def work(store):
        # The local engine reports its counters while it runs; progress and cancellation: pipelines.progress.
        pipeline = beam.Pipeline(runner=progress.local_runner(beam_args), options=pipeline_options(beam_args))
        built = build(pipeline, config, store)
        result = progress.run_watched(pipeline, operation=operation, values=values, run_id=spec.run_id,
                                      ledger_url=spec.ledger_url, beam_args=beam_args, checkpoints=store.root)
        figures, outcome = summarize(result, config, built)
        summary.update(figures)
        return outcome

    outcome = execute(spec, parameters=parameters, inputs=inputs(config), data_categories=data_categories,
                      checkpoint_root=FileSystems.join(output, '.checkpoints'), work=work)
    if outcome is None:
        return spec, {'skipped': True, 'run_key': spec.run_key}
    return spec, summary


def ledger_line(spec: RunSpec) -> str:
    return f'Run ledger and audit:  {spec.ledger_url}  (hrbatch runs show {spec.run_id} --database URL)'

"""The ``hrbatch`` command.

    hrbatch demo                      generate sample data and run matching on it (local defaults)
    hrbatch generate --output DIR ... write seeded sample data (candidates and offers, or employees)
    hrbatch run NAME [options]        run one pipeline; ``hrbatch run NAME --help`` lists its options
    hrbatch runs list|show RUN_ID     the run ledger (--database URL or $HRBATCH_DATABASE)
    hrbatch audit list|verify         the audit trail; verify exits 1 naming a tampered record
    hrbatch flink up|status|down      a local Flink cluster, job server and SDK worker pool
    hrbatch template metadata|build|run  Dataflow Flex Templates (prints the commands; --execute runs them)
    hrbatch schedule --config FILE    launch the pipelines on their schedules (--once --at T: one instant;
                                      exec: one occurrence; export --target k8s|cloud-scheduler|airflow)
    hrbatch cancel RUN_ID             stop a running run (it polls the ledger); the ledger says cancelled
    hrbatch dashboard --ledger URL    a read-only web page of the runs (token or basic auth; 127.0.0.1)

Configuration errors print one line naming the option, the value and what is allowed, and exit 2.
"""
import argparse
import logging
import os
import sys

from pipelines import options as opts
from pipelines import registry
from transforms.errors import ConfigError
from transforms.errors import HrbatchError

_USAGE = __doc__.split('\n\n', 1)[1].split('\n\n')[0]


def _run_pipeline(name: str, argv: list[str]) -> int:
    module = registry.load(name)
    if '-h' in argv or '--help' in argv:
        print(opts.help_text(module.OPTIONS, prog=f'hrbatch run {name}'))
        return 0
    module.run(argv)
    return 0


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='hrbatch demo', description='Generate sample data and run matching.')
    parser.add_argument('--output', default='hrbatch-demo', help='Directory for the data and the results.')
    parser.add_argument('--candidates', type=int, default=20_000)
    parser.add_argument('--offers', type=int, default=200)
    parser.add_argument('--top_k', type=int, default=50)
    args, beam_args = parser.parse_known_args(argv)
    from pipelines import generate
    data_dir = os.path.join(args.output, 'input')
    generate.main(['--output', data_dir, '--candidates', str(args.candidates), '--offers', str(args.offers)])
    registry.load('matching').run([
        '--candidates', os.path.join(data_dir, 'candidates.parquet'),
        '--offers', os.path.join(data_dir, 'offers.parquet'),
        '--output', os.path.join(args.output, 'output'),
        '--top_k', str(args.top_k),
        # The demo always recomputes: rerunning it must show a run, not "already succeeded".
        '--force', *beam_args])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    if not argv or argv[0] in ('-h', '--help'):
        print(f'usage:\n{_USAGE}\n\npipelines: {", ".join(sorted(registry.PIPELINES))}')
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == 'generate':
            from pipelines import generate
            return generate.main(rest)
        if command == 'demo':
            return _demo(rest)
        if command == 'runs':
            from pipelines import runs_cli
            return runs_cli.runs_main(rest)
        if command == 'audit':
            from pipelines import runs_cli
            return runs_cli.audit_main(rest)
        if command == 'flink':
            from pipelines import flink
            return flink.main(rest)
        if command == 'template':
            from pipelines import templates
            return templates.main(rest)
        if command == 'schedule':
            from pipelines import scheduler
            return scheduler.main(rest)
        if command == 'cancel':
            from pipelines import cancel
            return cancel.main(rest)
        if command == 'dashboard':
            from pipelines import dashboard
            return dashboard.main(rest)
        if command == 'run':
            if not rest:
                raise ConfigError(f'hrbatch run needs a pipeline name: {", ".join(sorted(registry.PIPELINES))}')
            return _run_pipeline(rest[0], rest[1:])
        raise ConfigError(f'unknown command {command!r}; commands: demo, generate, run, runs, audit, flink, template, schedule, cancel, dashboard')
    except ConfigError as err:
        print(f'hrbatch: error: {err}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('hrbatch: interrupted', file=sys.stderr)
        return 130
    except HrbatchError as err:
        from pipelines.progress import RunCancelled
        if not isinstance(err, RunCancelled):
            raise
        # Ctrl-C or ``hrbatch cancel``: recorded as cancelled in the ledger and the audit trail.
        print(f'hrbatch: {err}', file=sys.stderr)
        return 130


def main_for(name: str) -> int:
    """Entry point of ``python -m pipelines.NAME``."""
    return main(['run', name, *sys.argv[1:]])


if __name__ == '__main__':
    sys.exit(main())

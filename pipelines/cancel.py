"""``hrbatch cancel RUN_ID``: ask a running run to stop, from any shell.

    hrbatch cancel RUN_ID [--ledger URL]      (or --database URL, or $HRBATCH_DATABASE)

The request is recorded in the run ledger (table ``hrbatch_run_progress``, ``cancel_requested_at``
and ``cancel_requested_by``) and in the audit trail (``run.cancel_requested``). The process running
the run looks for it every few seconds (``pipelines.progress``), stops the pipeline (a Flink or
Dataflow job through its runner), and records the run ``cancelled`` (``run.cancelled``). The command
returns at once; ``hrbatch runs show RUN_ID`` shows when the run has stopped.

Exit status: 0 the request is recorded; 1 the run is not running (it already ended); 2 a bad option,
an unreachable ledger or an unknown run id.
"""
import argparse
import os
import sys
import typing

from pipelines import progress
from transforms import audit
from transforms import ledger
from transforms.errors import ConfigError

DATABASE_ENV = 'HRBATCH_DATABASE'


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f'{self.prog}: {message}')


def main(argv: list[str] | None = None, out: typing.TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = _Parser(prog='hrbatch cancel', description='Ask a running run to stop.')
    parser.add_argument('run_id')
    parser.add_argument('--ledger', '--database', dest='ledger',
                        help=f'the run ledger: sqlite:///PATH or postgresql://...; default: ${DATABASE_ENV}')
    parser.add_argument('--operator', help='who asks, for the audit trail (default: $HRBATCH_OPERATOR, else the OS user)')
    try:
        args = parser.parse_args(list(sys.argv[2:] if argv is None else argv))
    except SystemExit as done:  # --help
        return done.code or 0
    url = args.ledger or os.environ.get(DATABASE_ENV)
    if not url:
        raise ConfigError(f'--ledger is required (or set {DATABASE_ENV}): the database the run records in, '
                          'e.g. --ledger sqlite:///hrbatch-demo/output/hrbatch.db')
    runs = ledger.RunLedger(url, create=False)
    run = runs.get(args.run_id)
    if run is None:
        raise ConfigError(f'run {args.run_id!r} is not in the run ledger of {ledger.redact_url(url)!r}: '
                          '"hrbatch runs list" shows the runs it holds')
    if run.state != ledger.RUNNING:
        print(f'run {run.run_id} is {run.state}, not running: nothing to cancel', file=out)
        return 1
    row = progress.request_cancel(url, run.run_id, args.operator)
    audit.AuditTrail(url).append('run.cancel_requested', operation=run.operation, run_key=run.run_key,
                                 run_id=run.run_id, operator=args.operator,
                                 record_refs={'requested_at': row.cancel_requested_at})
    print(f'cancel requested for run {run.run_id} at {row.cancel_requested_at} by {row.cancel_requested_by}; '
          f'it stops within a few seconds ("hrbatch runs show {run.run_id}" says when)', file=out)
    return 0

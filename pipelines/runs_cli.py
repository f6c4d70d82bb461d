"""``hrbatch runs`` and ``hrbatch audit``: read the run ledger, read and verify the audit trail.

    hrbatch runs list [--database URL] [--operation NAME] [--run_key KEY] [--limit N] [--json]
    hrbatch runs show RUN_ID [--database URL] [--json]
    hrbatch audit list [--database URL] [--limit N] [--json]
    hrbatch audit verify [--database URL]
    hrbatch audit retention [--database URL] [--days N]

``--database`` is the database the pipelines record their runs and audit trail in: ``sqlite:///PATH``
(a local run's default is ``sqlite:///OUTPUT/hrbatch.db``, e.g.
``sqlite:///hrbatch-demo/output/hrbatch.db``) or ``postgresql://user@host:port/db``. It is required
unless the environment variable ``HRBATCH_DATABASE`` is set: there is no default, because reading the
wrong database would quietly show no runs and an empty, "valid" audit trail. These commands only read
(except ``audit retention``) and never create a database or a table: a wrong URL is an error.

Exit status: 0 done; 1 ``audit verify`` found a bad record (the message names its seq and whether it
was modified, removed or reordered) or ``audit retention`` refused a chain that does not verify.
Bad options, an unreachable database or an unknown run id raise ``transforms.errors.ConfigError``
(``hrbatch`` prints it and exits 2).
"""
import argparse
import datetime
import json
import os
import sys
import typing

from transforms.audit import DEFAULT_RETENTION_DAYS
from transforms.audit import AuditIntegrityError
from transforms.audit import AuditTrail
from transforms.errors import ConfigError
from transforms.keyed_write import redact_url
from transforms.ledger import Run
from transforms.ledger import RunLedger
from transforms.ledger import parse_time

DATABASE_ENV = 'HRBATCH_DATABASE'
_MAX_LIMIT = 100_000


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting: one error path."""

    def error(self, message):
        raise ConfigError(f'{self.prog}: {message}')


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if not 1 <= value <= _MAX_LIMIT:
        raise argparse.ArgumentTypeError(f'{text!r} must be from 1 to {_MAX_LIMIT:_}')
    return value


def _add_database(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--database', help=f'sqlite:///PATH or postgresql://...; default: ${DATABASE_ENV}')


def _database(args) -> str:
    url = args.database or os.environ.get(DATABASE_ENV)
    if not url:
        raise ConfigError(
            f'--database is required (or set {DATABASE_ENV}): the database the pipelines recorded into, '
            'e.g. --database sqlite:///hrbatch-demo/output/hrbatch.db or postgresql://user@host:5432/hr')
    return url


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    try:
        return parser.parse_args(list(sys.argv[2:] if argv is None else argv))
    except SystemExit as done:  # --help printed; parse errors raise ConfigError instead
        return done.code or 0


# ------------------------------------------------------------------------------------------------
# hrbatch runs


def runs_main(argv: list[str] | None = None, out: typing.TextIO | None = None) -> int:
    """``hrbatch runs list|show``; ``argv`` excludes ``runs``."""
    out = out or sys.stdout
    parser = _Parser(prog='hrbatch runs', description='Runs recorded in the run ledger.')
    commands = parser.add_subparsers(dest='command', required=True, metavar='{list,show}')
    listing = commands.add_parser('list', help='the latest runs, newest first')
    _add_database(listing)
    listing.add_argument('--operation', help='only runs of this operation, e.g. matching')
    listing.add_argument('--run_key', help='only runs of this run key, e.g. matching:2026-12-03')
    listing.add_argument('--limit', type=_positive_int, default=50, help='at most N runs (default 50)')
    listing.add_argument('--json', action='store_true', help='one JSON object per line')
    show = commands.add_parser('show', help='one run: parameters, inputs, counts, outputs, times')
    show.add_argument('run_id')
    _add_database(show)
    show.add_argument('--json', action='store_true', help='the run as a JSON object')
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    ledger = RunLedger(_database(args), create=False)
    if args.command == 'list':
        runs = ledger.list(operation=args.operation, run_key=args.run_key, limit=args.limit)
        if args.json:
            for run in runs:
                print(json.dumps(run.to_dict(), ensure_ascii=False, sort_keys=True), file=out)
        else:
            print_runs(runs, out)
        return 0
    run = ledger.get(args.run_id)
    if run is None:
        raise ConfigError(f'run {args.run_id!r} is not in the run ledger of {redact_url(_database(args))!r}: '
                          '"hrbatch runs list" shows the runs it holds')
    if args.json:
        print(json.dumps(run.to_dict(), ensure_ascii=False, sort_keys=True, indent=2), file=out)
    else:
        print_run(run, out)
    return 0


def _time(text: str | None) -> str:
    # Seconds are enough on screen; the ledger keeps microseconds.
    return '-' if not text else text[:19].replace('T', ' ')


def _table(rows: list[tuple[str, ...]], out: typing.TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)


def print_runs(runs: typing.Sequence[Run], out: typing.TextIO) -> None:
    if not runs:
        print('no runs recorded', file=out)
        return
    rows = [('RUN ID', 'STATE', 'ATTEMPT', 'STARTED (UTC)', 'ENDED (UTC)', 'RUN KEY', 'OPERATOR')]
    rows += [(r.run_id, r.state, str(r.attempt), _time(r.started_at), _time(r.ended_at), r.run_key, r.operator)
             for r in runs]
    _table(rows, out)


def _duration(run: Run) -> str:
    if not run.ended_at:
        return '-'
    seconds = (parse_time(run.ended_at) - parse_time(run.started_at)).total_seconds()
    return str(datetime.timedelta(seconds=round(seconds)))


def _compact(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def print_run(run: Run, out: typing.TextIO) -> None:
    print(f'Run {run.run_id}', file=out)
    fields = [('run key', run.run_key), ('operation', run.operation), ('state', run.state),
              ('attempt', str(run.attempt)), ('operator', run.operator),
              ('started', f'{run.started_at}'), ('ended', run.ended_at or '-'), ('duration', _duration(run))]
    if run.error:
        fields.append(('error', run.error))
    for name, value in fields:
        print(f'  {name:<10} {value}', file=out)
    _print_mapping('Parameters', run.parameters, out)
    print('Inputs:', file=out)
    if not run.input_fingerprints:
        print('  (none recorded)', file=out)
    for item in run.input_fingerprints:
        if item.get('format') == 'parquet':
            detail = (f"parquet, {item['num_rows']:,} rows in {item['num_row_groups']} row groups, "
                      f"footer sha256 {item['footer_sha256'][:16]}...")
        else:
            detail = f"{item.get('method')} {str(item.get('sha256'))[:16]}..."
        print(f"  {item['path']}  {item['size']:,} bytes  {detail}", file=out)
    _print_mapping('Counts', run.counts, out)
    _print_mapping('Outputs', run.outputs, out)


def _print_mapping(title: str, values, out: typing.TextIO) -> None:
    print(f'{title}:', file=out)
    if not values:
        print('  (none recorded)', file=out)
    elif isinstance(values, dict):
        width = max(len(str(k)) for k in values)
        for key, value in values.items():
            shown = f'{value:,}' if isinstance(value, int) and not isinstance(value, bool) else _compact(value)
            print(f'  {str(key):<{width}}  {shown}', file=out)
    else:
        for value in values:
            print(f'  {_compact(value)}', file=out)


# ------------------------------------------------------------------------------------------------
# hrbatch audit


def audit_main(argv: list[str] | None = None, out: typing.TextIO | None = None) -> int:
    """``hrbatch audit list|verify|retention``; ``argv`` excludes ``audit``."""
    out = out or sys.stdout
    parser = _Parser(prog='hrbatch audit', description='The tamper-evident audit trail.')
    commands = parser.add_subparsers(dest='command', required=True, metavar='{list,verify,retention}')
    listing = commands.add_parser('list', help='the latest audit records, oldest first')
    _add_database(listing)
    listing.add_argument('--limit', type=_positive_int, default=50, help='the last N records (default 50)')
    listing.add_argument('--json', action='store_true', help='one JSON object per line, hashes included')
    verify = commands.add_parser('verify', help='recompute the hash chain; exit 1 naming the first bad record')
    _add_database(verify)
    retention = commands.add_parser(
        'retention', help='delete records older than --days, keeping the chain verifiable')
    _add_database(retention)
    retention.add_argument('--days', type=_positive_int, default=DEFAULT_RETENTION_DAYS,
                           help=f'keep this many days (default {DEFAULT_RETENTION_DAYS}; the CNIL recommends '
                                '6 months to 1 year for logs)')
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    trail = AuditTrail(_database(args), create=False)
    if args.command == 'list':
        records = trail.list(limit=args.limit)
        if args.json:
            for record in records:
                print(json.dumps(record.to_dict(), ensure_ascii=False, sort_keys=True), file=out)
        elif not records:
            print('no audit records', file=out)
        else:
            rows = [('SEQ', 'RECORDED (UTC)', 'OPERATOR', 'ACTION', 'RUN ID', 'DATA CATEGORIES', 'COUNTS')]
            rows += [(str(r.seq), _time(r.recorded_at), r.operator, r.action, r.run_id or r.run_key or '-',
                      ', '.join(r.data_categories) or '-', _compact(r.counts) if r.counts else '-')
                     for r in records]
            _table(rows, out)
        return 0
    if args.command == 'verify':
        result = trail.verify()
        if result.ok:
            head = f'; head hash {result.head_hash}' if result.head_hash else ''
            print(f'OK: {result.message}{head}', file=out)
            return 0
        print(f'FAILED: {result.message}', file=out)
        return 1
    try:
        anchor = trail.apply_retention(args.days)
    except AuditIntegrityError as error:
        print(f'FAILED: {error}', file=out)
        return 1
    if anchor is None:
        print(f'nothing to remove: no audit record is older than {args.days} days', file=out)
    else:
        refs = anchor.record_refs
        print(f"removed {refs['removed_count']:,} audit records (seq {refs['removed_from_seq']}.."
              f"{refs['removed_through_seq']}) recorded before {refs['cutoff']}; "
              f'retention anchor is seq {anchor.seq}', file=out)
    return 0

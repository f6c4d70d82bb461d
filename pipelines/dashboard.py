"""``hrbatch dashboard``: a read-only web page of the runs in a run ledger, across runners.

    hrbatch dashboard --ledger URL [--host 127.0.0.1] [--port 8765] [--token-file PATH] [--schedules CONFIG]

The page (``/``) and its JSON (``/api/runs``) show every recent run (``--limit``, 200 by default):
operation, run key, runner (FnApiRunner, FlinkRunner, DataflowRunner, with the runner's job id),
state, progress (processed of total, rate, as last recorded by the run), counts, dead letters,
duration, and any cancel request; the schedules of ``--schedules`` (the scheduler's configuration,
``pipelines/schedules.example.yaml``) with their next run and last run; and the audit trail's
verification (``transforms.audit``: OK with the head hash, or the first bad record).

Access
------
Read-only (GET and HEAD; anything else is 405) and never anonymous. Every request carries the token,
as ``Authorization: Bearer TOKEN``, or as the password of HTTP basic auth (any user name), or in the
session cookie that ``/login?token=TOKEN`` sets (HttpOnly, SameSite=Strict) before redirecting to
``/``: a browser, which cannot send a header from a bookmark, logs in once. Tokens are compared with
``hmac.compare_digest``; the cookie holds an HMAC of the token, not the token. A request without a
valid one gets 401 with ``WWW-Authenticate``. The token comes from ``--token-file`` or the
environment variable ``HRBATCH_DASHBOARD_TOKEN`` (at least 16 characters: ``python -c "import
secrets; print(secrets.token_urlsafe(32))"``); the dashboard refuses to start without one. The
access log never shows a query string (the login token) or a header.

It listens on 127.0.0.1 by default; ``--host 0.0.0.0`` exposes it on every interface over plain HTTP:
put it behind a TLS reverse proxy. The page loads nothing from the network (inline CSS, SVG and
script; a Content-Security-Policy forbids any other source).
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import hashlib
import hmac
import http.server
import json
import logging
import os
import sys
import typing
import urllib.parse

from transforms import audit
from transforms import ledger
from transforms import report_html as rh
from transforms.errors import ConfigError
from transforms.keyed_write import redact_url

_LOGGER = logging.getLogger(__name__)

TOKEN_ENV = 'HRBATCH_DASHBOARD_TOKEN'
DATABASE_ENV = 'HRBATCH_DATABASE'
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_LIMIT = '127.0.0.1', 8765, 200
MIN_TOKEN_CHARS = 16
COOKIE = 'hrbatch_session'
_SESSION_CONTEXT = b'hrbatch-dashboard-session'
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; form-action 'none'; frame-ancestors 'none'"


# ------------------------------------------------------------------------------------------------
# Access


def session_value(token: str) -> str:
    return hmac.new(token.encode(), _SESSION_CONTEXT, hashlib.sha256).hexdigest()


def _same(given: str | None, expected: str) -> bool:
    # compare_digest on bytes: constant time in the length of the expected value.
    return given is not None and hmac.compare_digest(given.encode('utf-8', 'surrogateescape'), expected.encode())


def authorized(headers: typing.Mapping[str, str], token: str) -> bool:
    """True if the request headers carry ``token`` (bearer, basic auth password or session cookie)."""
    header = headers.get('Authorization') or ''
    scheme, _, value = header.partition(' ')
    if scheme.lower() == 'bearer' and _same(value.strip(), token):
        return True
    if scheme.lower() == 'basic':
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode('utf-8').partition(':')
        except (ValueError, UnicodeDecodeError):
            password = None
        if _same(password, token):
            return True
    for part in (headers.get('Cookie') or '').split(';'):
        name, _, value = part.strip().partition('=')
        if name == COOKIE and _same(value, session_value(token)):
            return True
    return False


def read_token(token_file: str | None, environ: typing.Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    if token_file:
        try:
            with open(token_file, encoding='utf-8') as handle:
                token = handle.read().strip()
        except OSError as error:
            raise ConfigError(f'--token-file={token_file!r}: cannot read it ({error.strerror})') from None
        where = f'--token-file {token_file!r}'
    else:
        token = (environ.get(TOKEN_ENV) or '').strip()
        where = f'${TOKEN_ENV}'
    if not token:
        raise ConfigError(f'the dashboard needs a token: give --token-file PATH or set {TOKEN_ENV} (it refuses '
                          'anonymous access); make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"')
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f'the token of {where} has {len(token)} characters; at least {MIN_TOKEN_CHARS} are required')
    return token


# ------------------------------------------------------------------------------------------------
# What the page shows


def _runner_of(run: ledger.Run, progress: ledger.RunProgressRow | None) -> str:
    if progress is not None and progress.runner:
        return progress.runner
    args = (run.parameters or {}).get('beam_args') or []
    for index, arg in enumerate(args):
        if isinstance(arg, str) and arg.startswith('--runner'):
            name = arg.partition('=')[2] if '=' in arg else (args[index + 1] if index + 1 < len(args) else '')
            from pipelines.runner import resolve_runner
            return resolve_runner(name)
    from pipelines.runner import LOCAL_RUNNER
    return LOCAL_RUNNER


def _seconds(start: str | None, end: str | None, now: datetime.datetime) -> float | None:
    if not start:
        return None
    finish = ledger.parse_time(end) if end else now
    return max(0.0, (finish - ledger.parse_time(start)).total_seconds())


def _schedules(path: str | None, now: datetime.datetime) -> tuple[list[dict], str | None]:
    """The schedules of the scheduler's configuration with their next run; (rows, note)."""
    if not path:
        return [], 'no --schedules configuration given'
    try:
        from pipelines import scheduler
    except ImportError as error:  # the scheduler and croniter are optional here
        return [], f'schedules not available: {error}'
    config = scheduler.load_config(path)
    import croniter
    rows = []
    for schedule in config.schedules:
        local_now = now.astimezone(schedule.tz).replace(tzinfo=None)
        wall = croniter.croniter(schedule.cron, local_now).get_next(datetime.datetime)
        rows.append({'name': schedule.name, 'pipeline': schedule.pipeline, 'cron': schedule.cron,
                     'timezone': schedule.timezone, 'company': schedule.company, 'runner': schedule.runner,
                     'next_run': wall.strftime('%Y-%m-%d %H:%M'),
                     'next_run_utc': ledger.format_time(wall.replace(tzinfo=schedule.tz))})
    return rows, ('next run: the next local time of the cron expression; a maintenance window may still defer it')


def collect(ledger_url: str, *, schedules: str | None = None, limit: int = DEFAULT_LIMIT,
            now: datetime.datetime | None = None) -> dict:
    """Everything the page shows, as JSON-ready data (``/api/runs``)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    runs = ledger.RunLedger(ledger_url, create=False).list(limit=limit)
    progress = ledger.RunProgress(ledger_url, create=False).get_many(r.run_id for r in runs)
    schedule_rows, schedule_note = _schedules(schedules, now)
    by_name = {s['name']: s for s in schedule_rows}
    items = []
    for run in runs:
        row = progress.get(run.run_id)
        counts = run.counts or {}
        total = row.total if row else None
        processed = row.processed if row else None
        schedule = run.run_key.split(':', 1)[0] if run.run_key.split(':', 1)[0] in by_name else None
        items.append({
            'run_id': run.run_id, 'operation': run.operation, 'run_key': run.run_key, 'state': run.state,
            'attempt': run.attempt, 'operator': run.operator, 'runner': _runner_of(run, row),
            'runner_job_id': row.runner_job_id if row else None,
            'started_at': run.started_at, 'ended_at': run.ended_at,
            'duration_seconds': _seconds(run.started_at, run.ended_at, now),
            'progress': None if row is None else {
                'counter': row.counter, 'processed': processed, 'total': total, 'rate': row.rate,
                'fraction': (min(1.0, processed / total) if total and processed is not None else None),
                'updated_at': row.updated_at},
            'cancel_requested_at': row.cancel_requested_at if row else None,
            'counts': counts, 'dead_letters': counts.get('dead_letters'), 'error': run.error,
            'schedule': schedule,
        })
    for schedule in schedule_rows:
        last = next((i for i in items if i['schedule'] == schedule['name']), None)
        schedule['last_run'] = None if last is None else {'run_id': last['run_id'], 'state': last['state'],
                                                            'started_at': last['started_at']}
    try:
        verified = audit.AuditTrail(ledger_url, create=False).verify()
        audit_status = {'ok': verified.ok, 'message': verified.message, 'head_hash': verified.head_hash}
    except ConfigError as error:
        audit_status = {'ok': None, 'message': str(error), 'head_hash': None}
    states = {state: sum(1 for i in items if i['state'] == state) for state in ledger.STATES}
    return {'generated_at': ledger.format_time(now), 'ledger': redact_url(ledger_url), 'runs': items,
            'states': states, 'runners': sorted({i['runner'] for i in items}), 'schedules': schedule_rows,
            'schedules_note': schedule_note, 'audit': audit_status}


# ------------------------------------------------------------------------------------------------
# The page


def _duration(seconds: float | None) -> str:
    return '–' if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


_STATE_COLOURS = {'running': '#1c7ed6', 'succeeded': '#2b8a3e', 'failed': '#c92a2a', 'cancelled': '#e67700'}
_EXTRA_CSS = """
.state { display: inline-block; padding: 1px 8px; border-radius: 9px; color: #fff; font-size: 11.5px; font-weight: 600; }
.progress { display: inline-block; width: 120px; height: 9px; background: #e9ecef; border-radius: 5px; vertical-align: middle;
            margin-right: 6px; overflow: hidden; }
.progress > span { display: block; height: 100%; background: #3b5bdb; }
.ok { color: #2b8a3e; font-weight: 700; } .bad { color: #c92a2a; font-weight: 700; }
td.wrap { white-space: normal; max-width: 340px; font-size: 11.5px; color: #52606d; }
"""


def _cell(text: str, sort, numeric: bool = False, cls: str = '', raw: bool = False) -> str:
    classes = ' '.join(c for c in ('num' if numeric else '', cls) if c)
    return (f'<td class="{classes}" data-sort="{rh.esc("" if sort is None else sort)}">'
            f'{text if raw else rh.esc(text)}</td>')


def _progress_cell(item: dict) -> str:
    progress = item['progress']
    if not progress or progress['processed'] is None:
        return _cell('–', None)
    fraction = progress['fraction']
    figures = rh.fmt_int(progress['processed'])
    if progress['total'] is not None:
        figures += f' / {rh.fmt_int(progress["total"])}'
    if progress['rate']:
        figures += f' · {rh.fmt_int(progress["rate"])}/s'
    bar = ''
    if fraction is not None:
        bar = (f'<span class="progress" role="progressbar" aria-valuenow="{fraction * 100:.0f}" aria-valuemin="0" '
               f'aria-valuemax="100"><span style="width:{fraction * 100:.1f}%"></span></span>')
    return _cell(bar + rh.esc(figures), fraction if fraction is not None else progress['processed'], raw=True)


def _runs_table(items: list[dict]) -> str:
    head = [('Run', ''), ('Operation', ''), ('Runner', ''), ('State', ''), ('Progress', 'num'), ('Counts', ''),
            ('Dead letters', 'num'), ('Started (UTC)', ''), ('Duration', 'num'), ('Schedule', '')]
    header = ''.join(f'<th class="{cls}" title="Sort">{rh.esc(name)}</th>' for name, cls in head)
    rows = []
    for item in items:
        colour = _STATE_COLOURS.get(item['state'], '#495057')
        state = f'<span class="state" style="background:{colour}">{rh.esc(item["state"])}</span>'
        if item['cancel_requested_at'] and item['state'] == ledger.RUNNING:
            state += ' <small>cancel requested</small>'
        counts = ', '.join(f'{k} {v:,}' if isinstance(v, int) and not isinstance(v, bool) else f'{k} {v}'
                           for k, v in sorted(item['counts'].items()) if k != 'dead_letters')
        if item['error']:
            counts = (counts + ' — ' if counts else '') + item['error']
        runner = item['runner'] + (f' ({item["runner_job_id"]})' if item['runner_job_id'] else '')
        rows.append(
            f'<tr data-run-id="{rh.esc(item["run_id"])}" data-state="{rh.esc(item["state"])}">'
            + _cell(item['run_id'], item['run_id'])
            + _cell(f'{item["operation"]} · {item["run_key"]}', item['operation'])
            + _cell(runner, item['runner'])
            + _cell(state, item['state'], raw=True)
            + _progress_cell(item)
            + _cell(counts or '–', counts, cls='wrap')
            + _cell(rh.fmt_int(item['dead_letters']), item['dead_letters'], numeric=True)
            + _cell((item['started_at'] or '')[:19].replace('T', ' '), item['started_at'])
            + _cell(_duration(item['duration_seconds']), item['duration_seconds'], numeric=True)
            + _cell(item['schedule'] or '–', item['schedule'])
            + '</tr>')
    if not rows:
        return '<div class="card empty">No runs recorded.</div>'
    return (f'<div class="table-wrap card"><table class="sortable" id="runs-table"><thead><tr>{header}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _schedules_table(data: dict) -> str:
    if not data['schedules']:
        return f'<div class="card empty">{rh.esc(data["schedules_note"] or "No schedules.")}</div>'
    columns = [rh.Column('Schedule', str), rh.Column('Pipeline', str), rh.Column('Cron', str),
               rh.Column('Time zone', str), rh.Column('Company', lambda v: v or '–'), rh.Column('Runner', str),
               rh.Column('Next run (local)', str), rh.Column('Last run', lambda v: v or '–')]
    rows = [(s['name'], s['pipeline'], s['cron'], s['timezone'], s['company'], s['runner'], s['next_run'],
             None if not s['last_run'] else f"{s['last_run']['state']} {s['last_run']['started_at'][:16]}")
            for s in data['schedules']]
    return rh.table(columns, rows) + f'<p class="note">{rh.esc(data["schedules_note"])}</p>'


def _audit_block(status: dict) -> str:
    if status['ok'] is None:
        return f'<div class="card empty" id="audit-status" data-ok="unknown">{rh.esc(status["message"])}</div>'
    verdict = '<span class="ok">verified</span>' if status['ok'] else '<span class="bad">FAILED</span>'
    head = f'<br><small>head hash {rh.esc(status["head_hash"])}</small>' if status['head_hash'] else ''
    return (f'<div class="card empty" id="audit-status" data-ok="{str(status["ok"]).lower()}">'
            f'Audit trail {verdict}: {rh.esc(status["message"])}{head}</div>')


def render(data: dict) -> str:
    """The dashboard page for ``collect``'s data."""
    states = data['states']
    tiles = rh.kpis([
        ('Runs', rh.fmt_int(len(data['runs'])), f'latest, from {data["ledger"]}'),
        ('Running', rh.fmt_int(states.get('running')), 'now'),
        ('Failed', rh.fmt_int(states.get('failed')), f'{rh.fmt_int(states.get("cancelled"))} cancelled'),
        ('Runners', rh.fmt_int(len(data['runners'])), ', '.join(data['runners']) or '–'),
        ('Audit trail', 'OK' if data['audit']['ok'] else ('–' if data['audit']['ok'] is None else 'FAILED'),
         'hash chain verified' if data['audit']['ok'] else data['audit']['message'][:60]),
    ])
    body = (f'<div id="summary">{tiles}</div>'
            + f'<div id="runs">{rh.section("Runs", _runs_table(data["runs"]), "Newest first. Progress is the last one each run recorded; click a header to sort.")}</div>'
            + f'<div id="schedules">{rh.section("Schedules", _schedules_table(data))}</div>'
            + f'<div id="audit">{rh.section("Audit trail", _audit_block(data["audit"]))}</div>')
    html = rh.page(title='hrbatch runs', subtitle='Run ledger across runners: read-only',
                   meta=f'generated {data["generated_at"][:19].replace("T", " ")} UTC', body=body,
                   footer='hrbatch dashboard · reload the page to refresh')
    return html.replace('</style>', _EXTRA_CSS + '</style>', 1)


# ------------------------------------------------------------------------------------------------
# The server


@dataclasses.dataclass
class DashboardConfig:
    ledger_url: str
    token: str
    schedules: str | None = None
    limit: int = DEFAULT_LIMIT
    now: typing.Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc)
    log: typing.Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = 'hrbatch-dashboard'
    sys_version = ''
    config: DashboardConfig

    def _log(self, status) -> None:
        # Never the query string (the login token), the request line nor any header.
        path = urllib.parse.urlsplit(getattr(self, 'path', '') or '').path
        self.config.log(f'{self.address_string()} "{getattr(self, "command", None) or "-"} {path}" {status}')

    def log_request(self, code='-', size='-'):
        self._log(getattr(code, 'value', code))

    def log_message(self, format, *args):  # noqa: A002 - the base class's name; log_error's messages quote the request line
        self._log(args[0] if args and isinstance(args[0], int) else 'error')

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        headers = {'Content-Type': content_type, 'Content-Length': str(len(body)), 'Cache-Control': 'no-store',
                   'X-Content-Type-Options': 'nosniff', 'X-Frame-Options': 'DENY', 'Referrer-Policy': 'no-referrer',
                   'Content-Security-Policy': _CSP, **(extra or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def _unauthorized(self) -> None:
        self._send(401, b'authentication required: Authorization: Bearer TOKEN, basic auth, or /login?token=TOKEN\n',
                   'text/plain; charset=utf-8',
                   {'WWW-Authenticate': 'Basic realm="hrbatch dashboard", charset="UTF-8"'})

    def do_GET(self):  # noqa: N802 - http.server's naming
        url = urllib.parse.urlsplit(self.path)
        config = self.config
        if url.path == '/login':
            given = urllib.parse.parse_qs(url.query).get('token', [None])[0]
            if not _same(given, config.token):
                return self._unauthorized()
            cookie = f'{COOKIE}={session_value(config.token)}; HttpOnly; SameSite=Strict; Path=/'
            return self._send(303, b'', 'text/plain', {'Location': '/', 'Set-Cookie': cookie})
        if not authorized(self.headers, config.token):
            return self._unauthorized()
        if url.path not in ('/', '/api/runs'):
            return self._send(404, b'not found\n', 'text/plain; charset=utf-8')
        try:
            data = collect(config.ledger_url, schedules=config.schedules, limit=config.limit, now=config.now())
        except ConfigError as error:
            return self._send(503, f'ledger not readable: {error}\n'.encode(), 'text/plain; charset=utf-8')
        if url.path == '/api/runs':
            return self._send(200, json.dumps(data, ensure_ascii=False, sort_keys=True).encode(),
                              'application/json; charset=utf-8')
        return self._send(200, render(data).encode(), 'text/html; charset=utf-8')

    do_HEAD = do_GET

    def _read_only(self):
        self._send(405, b'read-only\n', 'text/plain; charset=utf-8', {'Allow': 'GET, HEAD'})

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only


def make_server(config: DashboardConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
    """A ThreadingHTTPServer bound to ``host:port`` (port 0: any free port), not yet serving."""
    handler = type('Handler', (_Handler,), {'config': config})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f'{self.prog}: {message}')


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog='hrbatch dashboard', description='A read-only web page of the runs.')
    parser.add_argument('--ledger', '--database', dest='ledger', help=f'the run ledger; default: ${DATABASE_ENV}')
    parser.add_argument('--host', default=DEFAULT_HOST, help='address to listen on (default 127.0.0.1)')
    parser.add_argument('--port', type=int, default=DEFAULT_PORT, help='port (default 8765; 0: any free port)')
    parser.add_argument('--token-file', help=f'file holding the access token (default: ${TOKEN_ENV})')
    parser.add_argument('--schedules', help="the scheduler's configuration, for the schedules and their next run")
    parser.add_argument('--limit', type=int, default=DEFAULT_LIMIT, help='runs shown (default 200)')
    try:
        args = parser.parse_args(list(sys.argv[2:] if argv is None else argv))
    except SystemExit as done:
        return done.code or 0
    url = args.ledger or os.environ.get(DATABASE_ENV)
    if not url:
        raise ConfigError(f'--ledger is required (or set {DATABASE_ENV})')
    token = read_token(args.token_file)
    ledger.RunLedger(url, create=False)  # a wrong URL fails now, not at the first request
    if args.schedules:
        _schedules(args.schedules, datetime.datetime.now(datetime.timezone.utc))  # a bad config fails now
    server = make_server(DashboardConfig(ledger_url=url, token=token, schedules=args.schedules, limit=args.limit),
                         args.host, args.port)
    host, port = server.server_address[:2]
    if args.host not in ('127.0.0.1', 'localhost', '::1'):
        print(f'warning: listening on {host}, beyond this machine, over plain HTTP: put it behind TLS', file=sys.stderr)
    print(f'hrbatch dashboard of {redact_url(url)} on http://{host}:{port}/ '
          f'(log in once at http://{host}:{port}/login?token=... or send Authorization: Bearer ...); Ctrl-C stops it',
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

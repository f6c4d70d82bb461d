"""``hrbatch dashboard``: requests with no, wrong and right credentials (bearer, basic auth, login
cookie), read-only, the token never in the log, and the page in headless Chromium (the Debian
package, ``.ci/install_chromium.sh``): every section there, no script error, a screenshot saved to
``tests/.screenshots/dashboard.png``."""
import base64
import datetime
import json
import pathlib
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from pipelines import dashboard
from tests.transforms.test_ledger import isolated_database
from transforms import audit
from transforms import ledger
from transforms.errors import ConfigError

TOKEN = 'test-token-0123456789abcdef'
SCREENSHOTS = pathlib.Path(__file__).resolve().parents[1] / '.screenshots'
# The dashboard's clock: fixed, and after every run the tests record with the real clock (the
# durations of running runs are counted up to it).
NOW = datetime.datetime(2030, 1, 4, 10, 0, tzinfo=datetime.timezone.utc)
SCHEDULES = """
ledger: sqlite:////tmp/unused.db
schedules:
  - name: payroll-acme
    pipeline: payroll
    cron: '0 6 1 * *'
    timezone: Europe/Paris
  - name: nightly-matching
    pipeline: matching
    cron: '30 2 * * *'
    timezone: Europe/Paris
"""


def _populate(url: str) -> None:
    runs, progress, trail = ledger.RunLedger(url), ledger.RunProgress(url), audit.AuditTrail(url)
    runs.begin('nightly-matching:2026-12-03T02:30', 'matching', {'beam_args': []}, run_id='matching-ok')
    progress.start('matching-ok', runner='FnApiRunner', counter='candidates_read', total=20_000)
    progress.record('matching-ok', 20_000, 20_000, 4_000.0)
    runs.succeed('matching-ok', {'candidates_read': 20_000, 'matches_written': 447, 'dead_letters': 3}, {})
    runs.begin('payroll:2026-11', 'payroll', {'beam_args': ['--runner=FlinkRunner']}, run_id='payroll-flink')
    progress.start('payroll-flink', runner='FlinkRunner', counter='employees_read', total=100_000,
                   runner_job_id='4f1c2a')
    progress.record('payroll-flink', 42_000, 100_000, 1_200.0)
    progress.request_cancel('payroll-flink', 'ops')
    runs.begin('etl:2026-12-01', 'etl', {'beam_args': ['--runner', 'DataflowRunner']}, run_id='etl-failed')
    runs.fail('etl-failed', 'ValueError: bad mapping')
    runs.begin('cpf:2026', 'cpf', {'beam_args': []}, run_id='cpf-cancelled')
    runs.cancel('cpf-cancelled')
    for run_id, action in (('matching-ok', audit.RUN_STARTED), ('matching-ok', audit.RUN_SUCCEEDED),
                           ('cpf-cancelled', audit.RUN_CANCELLED)):
        trail.append(action, run_id=run_id, operation=run_id.split('-')[0])


@pytest.fixture
def served(tmp_path):
    url = f'sqlite:///{tmp_path}/hrbatch.db'
    _populate(url)
    config_path = tmp_path / 'schedules.yaml'
    config_path.write_text(SCHEDULES)
    log: list[str] = []
    config = dashboard.DashboardConfig(ledger_url=url, token=TOKEN, schedules=str(config_path), now=lambda: NOW,
                                       log=log.append)
    server = dashboard.make_server(config, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f'http://{host}:{port}', log
    server.shutdown()
    server.server_close()


def _get(url: str, headers: dict | None = None, method: str = 'GET'):
    request = urllib.request.Request(url, headers=headers or {}, method=method)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _basic(user: str, password: str) -> dict:
    return {'Authorization': 'Basic ' + base64.b64encode(f'{user}:{password}'.encode()).decode()}


def test_it_binds_loopback_by_default_and_refuses_to_start_without_a_token(tmp_path):
    server = dashboard.make_server(dashboard.DashboardConfig(ledger_url='sqlite:///x.db', token=TOKEN), port=0)
    try:
        assert server.server_address[0] == '127.0.0.1'
    finally:
        server.server_close()
    with pytest.raises(ConfigError, match='needs a token'):
        dashboard.read_token(None, environ={})
    with pytest.raises(ConfigError, match='at least 16'):
        dashboard.read_token(None, environ={dashboard.TOKEN_ENV: 'short'})
    token_file = tmp_path / 'token'
    token_file.write_text(TOKEN + '\n')
    assert dashboard.read_token(str(token_file), environ={}) == TOKEN
    with pytest.raises(ConfigError, match='needs a token'):
        import os
        saved = os.environ.pop(dashboard.TOKEN_ENV, None)
        try:
            dashboard.main(['--ledger', f'sqlite:///{tmp_path}/none.db'])
        finally:
            if saved is not None:
                os.environ[dashboard.TOKEN_ENV] = saved


@pytest.mark.parametrize('headers', [
    {},
    {'Authorization': 'Bearer wrong-token-0123456789abcdef'},
    {'Authorization': 'Bearer ' + TOKEN[:-1]},
    {'Authorization': 'Basic !!!not-base64'},
    _basic('hrbatch', 'wrong'),
    {'Authorization': TOKEN},
    {'Cookie': f'{dashboard.COOKIE}={TOKEN}'},        # the cookie holds an HMAC of the token, not the token
    {'Cookie': f'{dashboard.COOKIE}=0000'},
], ids=['none', 'wrong-bearer', 'truncated-bearer', 'bad-basic', 'wrong-basic', 'no-scheme', 'raw-cookie',
        'wrong-cookie'])
@pytest.mark.parametrize('path', ['/', '/api/runs', '/nothing'])
def test_requests_without_the_right_credentials_get_401(served, headers, path):
    base, _ = served
    status, response_headers, body = _get(base + path, headers)
    assert status == 401 and response_headers['WWW-Authenticate'].startswith('Basic realm="hrbatch dashboard"')
    assert b'run_id' not in body and b'<html' not in body


@pytest.mark.parametrize('headers', [{'Authorization': 'Bearer ' + TOKEN}, _basic('anyone', TOKEN),
                                     {'Cookie': f'{dashboard.COOKIE}={dashboard.session_value(TOKEN)}'}],
                         ids=['bearer', 'basic', 'cookie'])
def test_the_right_credentials_get_the_runs(served, headers):
    base, _ = served
    status, response_headers, body = _get(base + '/api/runs', headers)
    assert status == 200 and response_headers['Cache-Control'] == 'no-store'
    data = json.loads(body)
    by_id = {run['run_id']: run for run in data['runs']}
    assert {run['state'] for run in data['runs']} == set(ledger.STATES)
    assert data['runners'] == ['DataflowRunner', 'FlinkRunner', 'FnApiRunner']
    flink = by_id['payroll-flink']
    assert flink['progress']['fraction'] == 0.42 and flink['runner_job_id'] == '4f1c2a'
    assert flink['cancel_requested_at'] and flink['duration_seconds'] > 0
    assert by_id['matching-ok']['dead_letters'] == 3 and by_id['matching-ok']['schedule'] == 'nightly-matching'
    assert data['audit']['ok'] is True and len(data['audit']['head_hash']) == 64
    schedules = {s['name']: s for s in data['schedules']}
    assert schedules['nightly-matching']['next_run'] == '2030-01-05 02:30'      # 10:00 UTC is 11:00 in Paris
    assert schedules['payroll-acme']['next_run'] == '2030-02-01 06:00'
    assert schedules['nightly-matching']['last_run']['run_id'] == 'matching-ok'


def test_it_is_read_only_and_login_sets_an_httponly_cookie(served):
    base, log = served
    auth = {'Authorization': 'Bearer ' + TOKEN}
    for method in ('POST', 'PUT', 'DELETE', 'PATCH'):
        assert _get(base + '/api/runs', auth, method=method)[0] == 405
    assert _get(base + '/login?token=wrong')[0] == 401
    status, headers, _ = _get(base + '/login?token=' + TOKEN)
    assert status == 303 and headers['Location'] == '/'
    cookie = headers['Set-Cookie']
    assert 'HttpOnly' in cookie and 'SameSite=Strict' in cookie and TOKEN not in cookie
    assert _get(base + '/', {'Cookie': cookie.split(';')[0]})[0] == 200
    assert log and not any(TOKEN in line or 'token=' in line for line in log)
    assert any('"GET /login" 303' in line for line in log)


def test_a_tampered_audit_trail_shows_failed(served, tmp_path):
    base, _ = served
    url = f'sqlite:///{tmp_path}/hrbatch.db'
    from tests.transforms.test_ledger import run_sql
    run_sql(url, "UPDATE hrbatch_audit SET operator = 'mallory' WHERE seq = 2")
    data = json.loads(_get(base + '/api/runs', {'Authorization': 'Bearer ' + TOKEN})[2])
    assert data['audit']['ok'] is False and 'seq 2' in data['audit']['message']
    page = _get(base + '/', {'Authorization': 'Bearer ' + TOKEN})[2].decode()
    assert 'data-ok="false"' in page and 'FAILED' in page


@pytest.mark.parametrize('kind', ['sqlite', 'postgresql'])
def test_collect_reads_both_databases(kind, request, tmp_path):
    url = isolated_database(kind, request, tmp_path)
    _populate(url)
    data = dashboard.collect(url, now=NOW)
    assert len(data['runs']) == 4 and data['audit']['ok'] and data['schedules'] == []
    assert data['schedules_note'] == 'no --schedules configuration given'


def _chromium() -> str:
    path = shutil.which('chromium')
    if not path:
        pytest.fail('chromium is not installed: run `bash .ci/install_chromium.sh` (Debian package, headless)')
    return path


def test_the_page_in_headless_chromium(served, tmp_path):
    base, log = served
    shot = tmp_path / 'dashboard.png'
    common = [_chromium(), '--headless', '--no-sandbox', '--disable-gpu', '--window-size=1700,1100',
              '--hide-scrollbars', '--user-data-dir=' + str(tmp_path / 'profile')]
    # Chromium sends no header from the command line: it logs in through /login, which sets the
    # session cookie and redirects to the page.
    login = f'{base}/login?token={TOKEN}'
    dom = subprocess.run([*common, '--virtual-time-budget=5000', '--dump-dom', login], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    subprocess.run([*common, '--virtual-time-budget=5000', f'--screenshot={shot}', login], capture_output=True,
                   timeout=120, check=True)
    assert 'data-ready="true"' in dom, dom[:2000]
    errors = re.search(r'<div id="script-errors">(.*?)</div>', dom, re.S)
    assert errors is not None and errors.group(1).strip() == '', errors
    for section in ('summary', 'runs', 'schedules', 'audit'):
        assert f'id="{section}"' in dom, section
    for state in ledger.STATES:
        assert f'data-state="{state}"' in dom
    for text in ('FlinkRunner (4f1c2a)', 'DataflowRunner', 'cancel requested', '2030-01-05 02:30', 'verified',
                 'role="progressbar"'):
        assert text in dom, text
    assert TOKEN not in dom
    assert shot.exists() and shot.stat().st_size > 10_000
    SCREENSHOTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, SCREENSHOTS / 'dashboard.png')
    assert not any(TOKEN in line for line in log)

"""Cancellation: ``hrbatch cancel`` records a request; a real local matching run stopped midway by
Ctrl-C (SIGINT) or by that request is recorded cancelled and audited, exits 130, and a rerun of the
key ends with exactly the result of an uninterrupted run. No sleeping on the wall clock: the tests
wait on the run's own progress lines and on the ledger, with a deadline."""
import io
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipelines import cancel
from pipelines import generate
from tests.crash_runs import matching_result
from transforms import audit
from transforms import ledger
from transforms.errors import ConfigError


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp('data')
    # 60 read tasks (row groups of 2,000): the run commits them one by one for several seconds.
    generate.generate(str(directory), candidates=120_000, offers=300, seed=5, chunk_rows=2000)
    return directory


def _command(data, output: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, '-m', 'pipelines.matching', '--candidates', str(data / 'candidates.parquet'),
            '--offers', str(data / 'offers.parquet'), '--output', str(output), '--run_key', 'matching:cancel',
            '--top_k', '5', *extra]


class _Run:
    """A run in a subprocess whose output lines are read as they come."""

    def __init__(self, command):
        env = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'HRBATCH_PROGRESS_INTERVAL': '0', 'HRBATCH_CANCEL_POLL_SECONDS': '0.1'}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip('\n'))
        self.lines.put(None)

    def wait_for(self, predicate, timeout: float = 120.0) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                return None
            self.seen.append(line)
            if predicate(line):
                return line
        return None

    def finish(self, timeout: float = 120.0) -> int:
        code = self.process.wait(timeout)
        self.wait_for(lambda line: False, timeout=5)
        return code


def _started(line: str) -> bool:
    """A progress line showing committed work: ``matching RUN: 6,000 of 120,000 candidates_read ...``."""
    if 'candidates_read' not in line or ': ' not in line:
        return False
    figure = line.split(': ', 1)[1].split(' ', 1)[0].replace(',', '')
    return figure.isdigit() and 0 < int(figure) < 120_000


def _run_id(run: _Run) -> str:
    line = run.wait_for(lambda text: text.startswith('start run '), timeout=60)
    assert line, run.seen
    return line.split()[2]


@pytest.fixture(scope='module')
def clean(data, tmp_path_factory):
    output = tmp_path_factory.mktemp('clean')
    assert subprocess.run(_command(data, output), capture_output=True).returncode == 0
    return matching_result(output)


def _check_cancelled_then_resumed(data, output, run_id, clean, reason):
    url = f'sqlite:///{output}/hrbatch.db'
    run = ledger.RunLedger(url, create=False).get(run_id)
    assert run.state == ledger.CANCELLED and run.ended_at
    records = [r for r in audit.AuditTrail(url, create=False).list() if r.run_id == run_id]
    assert records[-1].action == audit.RUN_CANCELLED and records[-1].record_refs == {'reason': reason}
    assert audit.AuditTrail(url, create=False).verify().ok
    last = ledger.RunProgress(url, create=False).get(run_id)
    assert last.runner == 'FnApiRunner' and last.total == 120_000 and 0 < last.processed < 120_000
    # Committed tasks stayed: the rerun of the key (a new attempt, no flag needed) reuses them.
    rerun = subprocess.run(_command(data, output), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert 'attempt 2' in rerun.stdout and 'resumed:' in rerun.stdout
    assert matching_result(output) == clean       # same files, byte for byte, and no duplicate row


def test_ctrl_c_cancels_a_local_run_and_a_rerun_resumes_without_duplicates(data, tmp_path, clean):
    output = tmp_path / 'out'
    run = _Run(_command(data, output))
    run_id = _run_id(run)
    assert run.wait_for(_started), run.seen
    run.process.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.seen
    assert any(f'run {run_id} cancelled: interrupted (Ctrl-C)' in line for line in run.seen)
    _check_cancelled_then_resumed(data, output, run_id, clean, 'interrupted (Ctrl-C)')


def test_hrbatch_cancel_from_another_shell_stops_the_run(data, tmp_path, clean):
    output = tmp_path / 'out'
    run = _Run(_command(data, output))
    run_id = _run_id(run)
    assert run.wait_for(_started), run.seen
    url = f'sqlite:///{output}/hrbatch.db'
    asked = io.StringIO()
    assert cancel.main([run_id, '--ledger', url], out=asked) == 0          # what `hrbatch cancel` runs
    assert f'cancel requested for run {run_id}' in asked.getvalue()
    assert run.finish() == 130, run.seen
    records = audit.AuditTrail(url, create=False).list()
    assert [r.action for r in records if r.run_id == run_id][-2:] == ['run.cancel_requested', audit.RUN_CANCELLED]
    _check_cancelled_then_resumed(data, output, run_id, clean, 'cancel requested (hrbatch cancel)')


def test_cancel_command_refuses_unknown_and_finished_runs(tmp_path):
    url = f'sqlite:///{tmp_path}/hrbatch.db'
    runs = ledger.RunLedger(url)
    runs.begin('etl:x', 'etl', {}, run_id='etl-1')
    out = io.StringIO()
    with pytest.raises(ConfigError, match='not in the run ledger'):
        cancel.main(['nope', '--ledger', url], out=out)
    from pipelines import cli
    assert cli.main(['cancel', 'nope', '--ledger', url]) == 2
    assert cancel.main(['etl-1', '--ledger', url, '--operator', 'ops'], out=out) == 0
    assert ledger.RunProgress(url).get('etl-1').cancel_requested_by == 'ops'
    runs.cancel('etl-1')
    assert cancel.main(['etl-1', '--ledger', url], out=out) == 1
    assert 'is cancelled, not running' in out.getvalue()
    environ = dict(os.environ)
    os.environ.pop('HRBATCH_DATABASE', None)
    try:
        with pytest.raises(ConfigError, match='--ledger is required'):
            cancel.main(['etl-1'], out=out)
    finally:
        os.environ.clear()
        os.environ.update(environ)

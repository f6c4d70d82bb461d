"""Progress: the meter and its lines, the watch loop (injected clock, no sleeping), the ledger's last
progress (SQLite and PostgreSQL), and the local runner's counters read while it runs."""
import io
import threading
import time

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from pipelines import progress
from tests.transforms.test_ledger import isolated_database
from transforms import ledger


@pytest.fixture(params=['sqlite', 'postgresql'])
def ledger_url(request, tmp_path) -> str:
    return isolated_database(request.param, request, tmp_path)


def _running(url: str, run_id: str = 'matching-1') -> str:
    ledger.RunLedger(url).begin('matching:progress', 'matching', {}, run_id=run_id)
    return run_id


# ------------------------------------------------------------------------------------------------
# Meter and lines


def test_meter_gives_rate_and_time_left_and_lines_say_them():
    meter = progress.ProgressMeter(total=20_000, start=100.0, counter='candidates_read')
    snap = meter.update(5_000, 110.0)
    assert (snap.rate, snap.eta, snap.fraction) == (500.0, 30.0, 0.25)
    assert progress.format_line(snap) == (
        'progress: 5,000 of 20,000 candidates_read (25%), 500/s, 0:00:30 left, 0:00:10 elapsed')
    bar = progress.format_bar(snap, width=20)
    assert bar.startswith('[#####...............]  5,000 / 20,000 candidates_read  25%  500/s  0:00:30 left')


def test_without_a_total_there_is_a_count_and_a_rate_but_no_time_left():
    meter = progress.ProgressMeter(total=None, start=0.0, counter='export_rows_read')
    line = progress.format_line(meter.update(300, 3.0))
    assert line == 'progress: 300 export_rows_read, 100/s, 0:00:03 elapsed'
    assert 'left' not in line and progress.format_bar(meter.last).startswith('[???')


def test_without_a_counter_only_the_elapsed_time_is_shown():
    meter = progress.ProgressMeter(total=None, start=0.0, counter=None)
    assert 'no progress counter' in progress.format_line(meter.update(None, 65.0))


def test_without_a_terminal_a_line_comes_every_interval_of_the_clock():
    out = io.StringIO()
    reporter = progress.ConsoleReporter(out, tty=False, interval=10.0)
    meter = progress.ProgressMeter(total=100, start=0.0, counter='rows')
    for now in range(0, 31):  # one report per second of the fake clock
        reporter.report(meter.update(now, float(now)), float(now))
    reporter.finish(meter.update(100, 31.0), 'done')
    lines = out.getvalue().splitlines()
    assert [line.split(':')[1].split(' of')[0].strip() for line in lines[:-1]] == ['0', '10', '20', '30']
    assert lines[-1].endswith('(done)') and '100 of 100 rows (100%)' in lines[-1]


def test_on_a_terminal_the_bar_is_redrawn_in_place():
    out = io.StringIO()
    reporter = progress.ConsoleReporter(out, tty=True)
    meter = progress.ProgressMeter(total=10, start=0.0, counter='rows')
    reporter.report(meter.update(5, 1.0), 1.0)
    reporter.report(meter.update(8, 2.0), 2.0)
    reporter.finish(meter.update(10, 3.0), 'done')
    text = out.getvalue()
    assert text.count('\r') == 3 and text.endswith('done\n') and '\n' not in text[:-1]
    assert '[' + '#' * 30 + ']' in text


# ------------------------------------------------------------------------------------------------
# The watch loop, with a scripted job and a fake clock


class _Result:
    def __init__(self, processed):
        self.processed = processed

    def metrics(self):
        value = self.processed

        class _Metrics:
            def query(self, _filter):
                class _R:
                    committed = attempted = value
                return {'counters': [_R()]}
        return _Metrics()


class ScriptedJob:
    """A job whose counter follows ``values``, one per wait; it ends after the last one."""

    def __init__(self, clock, values, job_id=None, interrupt_at=None):
        self.clock, self.values, self.job_id, self.interrupt_at = clock, list(values), job_id, interrupt_at
        self.index = -1
        self.cancelled = self.started = False

    def start(self):
        self.started = True

    def wait(self, seconds):
        self.clock.wait(None, seconds)
        self.index += 1
        if self.interrupt_at is not None and self.index == self.interrupt_at:
            raise KeyboardInterrupt
        return self.index >= len(self.values) - 1

    def processed(self, counter):
        return self.values[min(max(self.index, 0), len(self.values) - 1)]

    def cancel(self):
        self.cancelled = True

    def stop(self, grace):
        return True

    def result(self):
        return _Result(self.values[-1])


def test_watch_reports_progress_and_records_the_last_one_in_the_ledger(ledger_url):
    run_id = _running(ledger_url)
    store = ledger.RunProgress(ledger_url)
    store.start(run_id, runner='FnApiRunner', counter='candidates_read', total=1000)
    clock = progress.FakeClock()
    out = io.StringIO()
    how = progress.Watch(clock=clock, reporter=progress.ConsoleReporter(out, tty=False, interval=2.0),
                         poll=0.5, ledger_every=5.0, cancel_every=2.0)
    job = ScriptedJob(clock, [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 980, 1000], job_id='job-7')
    written = []
    original = store.record
    store.record = lambda *a, **k: (written.append(a[1]), original(*a, **k))
    result = progress.watch(job, run_id=run_id, counter='candidates_read', total=1000, store=store, how=how)
    assert result.processed == 1000
    assert clock.waits == [0.5] * 13 and clock.now == 6.5           # no wall-clock time passed
    assert written == [0, 950, 1000]                                 # at 0.5 s, at 5.5 s, and at the end
    row = store.get(run_id)
    assert (row.processed, row.total, row.runner, row.runner_job_id) == (1000, 1000, 'FnApiRunner', 'job-7')
    assert row.rate == pytest.approx(1000 / 6.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].endswith('(done)')


def test_a_cancel_request_in_the_ledger_stops_the_job(ledger_url):
    run_id = _running(ledger_url)
    store = ledger.RunProgress(ledger_url)
    clock = progress.FakeClock()
    job = ScriptedJob(clock, list(range(0, 10_000, 10)))
    polls = []
    original = store.cancel_requested

    def cancel_requested(rid):
        polls.append(clock.now)
        if clock.now >= 3.0:
            store.request_cancel(rid, 'ops')
        return original(rid)
    store.cancel_requested = cancel_requested
    how = progress.Watch(clock=clock, reporter=progress.NullReporter(), poll=0.5, cancel_every=2.0)
    with pytest.raises(progress.RunCancelled) as cancelled:
        progress.watch(job, run_id=run_id, counter='rows', total=None, store=store, how=how)
    assert cancelled.value.reason == 'cancel requested (hrbatch cancel)'
    assert job.cancelled and polls == [0.5, 2.5, 4.5]                # throttled to every 2 s of the clock
    assert store.get(run_id).cancel_requested_by == 'ops'


def test_ctrl_c_cancels_the_job():
    clock = progress.FakeClock()
    job = ScriptedJob(clock, list(range(100)), interrupt_at=4)
    with pytest.raises(progress.RunCancelled) as cancelled:
        progress.watch(job, run_id='r', counter='rows', total=100, store=None,
                       how=progress.Watch(clock=clock, reporter=progress.NullReporter()))
    assert cancelled.value.reason == 'interrupted (Ctrl-C)' and job.cancelled


class FakeRunnerResult:
    """A PipelineResult of a remote runner: RUNNING for ``steps`` looks, metrics growing."""

    def __init__(self, steps):
        self.steps, self.looks, self.cancelled = steps, 0, False

    def job_id(self):
        return 'flink-job-42'

    @property
    def state(self):
        if self.cancelled:
            return PipelineState.CANCELLED
        self.looks += 1
        return PipelineState.DONE if self.looks > self.steps else PipelineState.RUNNING

    def metrics(self):
        return _Result(self.looks * 10).metrics()

    def cancel(self):
        self.cancelled = True

    def wait_until_finish(self, duration=None):
        return self.state


class FakePipeline:
    def __init__(self, result):
        self.result = result

    def run(self):
        return self.result


def test_a_remote_runner_is_polled_for_metrics_and_cancelled_through_it(ledger_url):
    run_id = _running(ledger_url)
    store = ledger.RunProgress(ledger_url)
    clock = progress.FakeClock()
    job = progress.RunnerJob(FakePipeline(FakeRunnerResult(steps=6)), clock)
    result = progress.watch(job, run_id=run_id, counter='rows', total=None, store=store,
                            how=progress.Watch(clock=clock, reporter=progress.NullReporter()))
    assert isinstance(result, FakeRunnerResult) and store.get(run_id).runner_job_id == 'flink-job-42'

    clock = progress.FakeClock()
    remote = FakeRunnerResult(steps=10_000)
    job = progress.RunnerJob(FakePipeline(remote), clock)
    with pytest.raises(progress.RunCancelled):
        progress.watch(ScriptedInterrupt(job, at=3), run_id=run_id, counter='rows', total=None, store=None,
                       how=progress.Watch(clock=clock, reporter=progress.NullReporter()))
    assert remote.cancelled   # PipelineResult.cancel(): the job service's CancelJob, Dataflow's cancel


class ScriptedInterrupt:
    """Wraps a job: Ctrl-C arrives during the ``at``-th wait."""

    def __init__(self, job, at):
        self._job, self._at, self._waits = job, at, 0
        self.job_id = None

    def __getattr__(self, name):
        return getattr(self._job, name)

    def start(self):
        self._job.start()
        self.job_id = self._job.job_id

    def wait(self, seconds):
        self._waits += 1
        if self._waits == self._at:
            raise KeyboardInterrupt
        return self._job.wait(seconds)


# ------------------------------------------------------------------------------------------------
# The ledger's progress table


def test_progress_rows_upsert_and_the_first_cancel_request_is_kept(ledger_url):
    store = ledger.RunProgress(ledger_url)
    store.start('r1', runner='FlinkRunner', counter='employees_read', total=None)
    store.set_job_id('r1', 'job-1')
    store.record('r1', 50, 200, 12.5)
    assert store.get('r1').to_dict() | {'updated_at': None} == {
        'run_id': 'r1', 'counter': 'employees_read', 'processed': 50, 'total': 200, 'rate': 12.5,
        'updated_at': None, 'runner': 'FlinkRunner', 'runner_job_id': 'job-1', 'cancel_requested_at': None,
        'cancel_requested_by': None}
    first = store.request_cancel('r1', 'alice')
    assert store.request_cancel('r1', 'bob').cancel_requested_at == first.cancel_requested_at
    assert store.get('r1').cancel_requested_by == 'alice' and store.cancel_requested('r1')
    assert not store.cancel_requested('r2') and set(store.get_many(['r1', 'r2'])) == {'r1'}


def test_reading_progress_of_a_ledger_without_the_table_creates_nothing(tmp_path):
    url = f'sqlite:///{tmp_path}/old.db'
    ledger.RunLedger(url)  # a ledger from before progress existed
    reader = ledger.RunProgress(url, create=False)
    assert reader.get('x') is None and reader.get_many(['x']) == {}
    from transforms.keyed_write import connect, parse_sql_target
    conn = connect(parse_sql_target(url))
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert ledger.PROGRESS_TABLE not in tables


# ------------------------------------------------------------------------------------------------
# What is counted, and the total


def test_each_operation_counts_its_main_input():
    assert progress.progress_spec('matching', {}) == progress.ProgressSpec('candidates_read', 'candidates',
                                                                           'candidates_read')
    assert progress.progress_spec('reports', {'kind': 'payroll'}).counter == 'payslips_read'
    assert progress.progress_spec('unknown', {}) == progress.ProgressSpec()


def test_the_total_comes_from_parquet_footers_and_is_unknown_for_other_formats(tmp_path):
    for index in range(3):
        pq.write_table(pa.table({'x': list(range(10 * (index + 1)))}), tmp_path / f'part-{index}.parquet')
    (tmp_path / 'rows.csv').write_text('x\n1\n')
    assert progress.parquet_total(str(tmp_path / 'part-*.parquet')) == 60
    assert progress.parquet_total(str(tmp_path / '*')) is None
    assert progress.parquet_total(str(tmp_path / 'missing-*.parquet')) is None


def test_committed_checkpoints_count_while_the_tasks_run(tmp_path):
    from transforms.checkpoints import CheckpointStore
    store = CheckpointStore(str(tmp_path / 'ck'))
    clock = progress.FakeClock()
    counts = progress.CheckpointCounts(store.root, 'candidates_read', clock, every=2.0)
    assert counts.value() == 0
    store.commit('task-1', pa.table({'x': [1]}), [], {'candidates_read': 250})
    assert counts.value() == 0            # listed at most every 2 s of the clock
    clock.advance(2.0)
    assert counts.value() == 250
    store.commit('task-2', pa.table({'x': [1]}), [], {'candidates_read': 100})
    clock.advance(2.0)
    assert counts.value() == 350


# ------------------------------------------------------------------------------------------------
# The local runner's counters, read while the pipeline runs

RELEASE = threading.Event()


class _HoldAfterHalf(beam.DoFn):
    """Counts every element; after half of them, waits for the test to have seen the count move."""

    def __init__(self):
        self._read = Metrics.counter('hrbatch', 'rows_read')

    def process(self, element):
        self._read.inc()
        if element == 50:
            RELEASE.wait(60)
        yield element


@pytest.mark.parametrize('mode', ['multi_threading', 'in_memory'])
def test_the_local_runner_counters_move_while_it_runs(mode):
    # in_memory: nothing to hold for, the count cannot move before the bundle ends.
    RELEASE.clear() if mode == 'multi_threading' else RELEASE.set()
    runner = progress.LiveFnApiRunner(progress_request_frequency=0.05)
    pipeline = beam.Pipeline(runner=runner, options=PipelineOptions(['--direct_running_mode', mode]))
    _ = pipeline | beam.Create(list(range(100))) | beam.Reshuffle() | beam.ParDo(_HoldAfterHalf())
    job = progress.LocalJob(pipeline, progress.SystemClock())
    job.start()
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not job.wait(0.05):
        seen.append(job.processed('rows_read'))
        if seen[-1]:
            break
    RELEASE.set()
    while not job.wait(0.1):
        seen.append(job.processed('rows_read'))
    assert job.processed('rows_read') == 100 and progress._final_count(job.result(), 'rows_read') == 100
    if mode == 'multi_threading':
        assert any(0 < value < 100 for value in seen)   # read while the bundle was still running
    else:
        # Documented limit: the in_memory worker runs in the runner's thread and cannot answer
        # progress requests, so counts arrive as bundles finish.
        assert set(seen) <= {0, 100}

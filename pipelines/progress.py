"""Progress of a running pipeline, live, and its cancellation (Ctrl-C or ``hrbatch cancel RUN_ID``).

What "progress" is
------------------
Each operation counts its main input with a Beam counter of the ``hrbatch`` namespace
(``PROGRESS_COUNTERS``: ``candidates_read`` for matching, ``employees_read`` for payroll and cpf,
``export_rows_read`` for etl, ...): *processed* is that counter. *Total* is what it will reach, known at
launch when the main input is Parquet (the footers' row counts, a few KB read per file); otherwise it
is unknown and progress shows the count and the rate without a time left.

How it is observed
------------------
* Every runner exposes the counters as Beam metrics. Runners whose ``pipeline.run()`` returns at once
  (Flink through the job server, Dataflow) are polled through their job service while the job runs.
* The local engine (``FnApiRunner``) runs the whole pipeline inside ``pipeline.run()`` and reports
  metrics only at the end. ``LiveFnApiRunner`` is that runner with Beam's own bundle progress requests
  switched on (``progress_request_frequency``): the SDK workers answer with the metrics of the bundle
  in flight, and the runner adds those of every finished bundle, so ``processed`` moves during a
  stage. The pipeline runs in a thread; the launching thread watches it. Limit: with
  ``--direct_running_mode in_memory`` (Beam's default for one worker) the worker runs in the runner's
  own thread and cannot answer while it works, so the count moves only as bundles finish; with
  ``multi_threading`` or ``multi_processing`` it moves continuously.

Where it goes
-------------
* On a terminal: one live line, ``[#####.....]  12,000 / 20,000 candidates_read  60%  3,100/s  0:00:02 left``.
  Without a terminal (a log, CI): one plain line every ``interval`` seconds (``--progress_interval``
  is not an option: ``HRBATCH_PROGRESS_INTERVAL``, 30 s by default) and one at the end.
* The run ledger: table ``hrbatch_run_progress`` (``transforms.ledger.RunProgress``) holds the last
  progress of each run (at most every ``ledger_every`` seconds, and at the end), its runner and the
  runner's job id, and any cancel request.

Cancellation
------------
Ctrl-C (SIGINT) in the launching process, or a cancel request that ``hrbatch cancel RUN_ID`` records
in the ledger (polled every ``cancel_every`` seconds: 2, or ``HRBATCH_CANCEL_POLL_SECONDS``), stops the run: a Flink or Dataflow job is
cancelled through its runner (``PipelineResult.cancel()``: the job service's CancelJob, Dataflow's
cancel); a local run is stopped by raising ``PipelineCancelled`` in the thread that runs the
pipeline, whose ``finally`` blocks shut the SDK workers down. ``run_watched`` then raises
``RunCancelled``: the lifecycle marks the run ``cancelled`` and audits it, and ``hrbatch`` exits 130.
Nothing a cancelled run wrote is wrong: its writes are keyed upserts or published by rename, and the
work it committed (matching's and migration's per-task checkpoints) is reused by the next run of the
key, which ends with exactly the result of an uninterrupted run.

Time is injected (``Clock``): tests drive the watch loop without sleeping on the wall clock.
"""
from __future__ import annotations

import ctypes
import json
import dataclasses
import datetime
import logging
import math
import os
import sys
import threading
import time
import typing

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.portability import portable_metrics
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.runner import PipelineState

from pipelines.runner import LOCAL_RUNNER
from pipelines.runner import pipeline_options
from transforms import ledger
from transforms.checkpoints import CheckpointStore
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.errors import HrbatchError

_LOGGER = logging.getLogger(__name__)

INTERVAL_ENV = 'HRBATCH_PROGRESS_INTERVAL'
DEFAULT_INTERVAL = 30.0       # seconds between two progress lines without a terminal
POLL_SECONDS = 0.5            # how often the watcher looks at the job
LEDGER_EVERY = 5.0            # seconds between two progress writes to the ledger
CANCEL_EVERY = 2.0            # seconds between two looks for a cancel request in the ledger
CANCEL_EVERY_ENV = 'HRBATCH_CANCEL_POLL_SECONDS'
CANCEL_GRACE = 60.0           # seconds a cancelled local pipeline has to stop before it is abandoned
WORKER_PROGRESS_SECONDS = 0.5  # Beam's bundle progress request period for the local runner

@dataclasses.dataclass(frozen=True)
class ProgressSpec:
    """What measures an operation's progress: ``counter`` (a Beam counter of the ``hrbatch``
    namespace), ``total_option`` (the option naming the input it counts, for the total) and, for
    operations that commit per-task checkpoints, ``checkpoint_count`` (the key of the committed
    counts holding the same figure: their counters are only incremented once every task has
    committed, so while the tasks run the committed checkpoints are what moves)."""
    counter: str | None = None
    total_option: str | None = None
    checkpoint_count: str | None = None


PROGRESS_COUNTERS: dict[str, typing.Any] = {
    'matching': ProgressSpec('candidates_read', 'candidates', 'candidates_read'),
    'payroll': ProgressSpec('employees_read', 'employees'),
    'cpf': ProgressSpec('employees_read', 'employees'),
    'dsn': ProgressSpec('payslips_read', 'payslips'),
    'etl': ProgressSpec('export_rows_read', 'input'),
    'migration': ProgressSpec('migration_rows_read', None, 'rows_read'),
    'subject_access': ProgressSpec('requests_read'),
    'reports': lambda values: {'matching': ProgressSpec('matches_read', 'matches'),
                               'payroll': ProgressSpec('payslips_read', 'payslips'),
                               'quality': ProgressSpec('dead_letter_records_read')}.get(values.get('kind'),
                                                                                         ProgressSpec()),
}


class RunCancelled(HrbatchError):
    """The run was cancelled (Ctrl-C or ``hrbatch cancel``) and stopped; ``reason`` says which."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


class PipelineCancelled(BaseException):
    """Raised inside the thread running a local pipeline to stop it. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` in a transform swallows it."""


class _CancelRequested(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Time


class Clock(typing.Protocol):
    def monotonic(self) -> float: ...
    def wait(self, event: threading.Event | None, seconds: float) -> bool: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event | None, seconds: float) -> bool:
        """Waits up to ``seconds`` for ``event`` (or just waits); True if it is set."""
        if event is None:
            time.sleep(seconds)
            return False
        return event.wait(seconds)


class FakeClock:
    """A clock that only moves when waited on (or ``advance``d): no wall-clock time passes."""

    def __init__(self, start: float = 0.0):
        self.now = start
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, event: threading.Event | None, seconds: float) -> bool:
        self.waits.append(seconds)
        if event is not None and event.is_set():
            return True
        self.now += seconds
        return event is not None and event.is_set()


# ------------------------------------------------------------------------------------------------
# What a run counts, and how much there is


def progress_spec(operation: str, values: typing.Mapping) -> ProgressSpec:
    """What measures ``operation``'s progress (``ProgressSpec()``, nothing, if unknown)."""
    spec = PROGRESS_COUNTERS.get(operation, ProgressSpec())
    return spec(values) if callable(spec) else spec


class CheckpointCounts:
    """The sum of ``count`` over the units committed under a checkpoint ``root`` (local or gs://);
    each marker is read once, the directory listed at most every ``every`` seconds."""

    def __init__(self, root: str, count: str, clock: 'Clock', every: float = 2.0):
        self._store = CheckpointStore(root)
        self._count, self._clock, self._every = count, clock, every
        self._seen: dict[str, int] = {}
        self._listed = -math.inf

    def value(self) -> int:
        now = self._clock.monotonic()
        if now - self._listed >= self._every:
            self._listed = now
            try:
                for unit in self._store.committed() - self._seen.keys():
                    with FileSystems.open(FileSystems.join(self._store.root, unit + '.done.json'),
                                          compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                        self._seen[unit] = int(json.loads(handle.read())['counts'].get(self._count, 0))
            except Exception as error:  # noqa: BLE001 - progress must never fail the run
                _LOGGER.debug('checkpoint progress not readable: %s', error)
        return sum(self._seen.values())


def parquet_total(pattern: str | None) -> int | None:
    """The rows of the files matching ``pattern`` if all are Parquet (read from their footers), else
    None: other formats would have to be read to be counted."""
    if not pattern:
        return None
    try:
        found = ledger.fingerprint_inputs([pattern])
    except Exception as error:  # a missing input fails the launch elsewhere, with its own message
        _LOGGER.debug('no total for %s: %s', pattern, error)
        return None
    if not found or any(item.get('format') != 'parquet' for item in found):
        return None
    return sum(int(item['num_rows']) for item in found)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    processed: int | None
    total: int | None
    elapsed: float
    rate: float | None          # items per second since the start
    eta: float | None           # seconds left, when the total is known and the rate is not zero
    counter: str | None = None

    @property
    def fraction(self) -> float | None:
        if self.total is None or self.processed is None:
            return None
        return 1.0 if self.total <= 0 else min(1.0, self.processed / self.total)


class ProgressMeter:
    """Turns counter values read at moments of a clock into snapshots (rate, time left)."""

    def __init__(self, *, total: int | None, start: float, counter: str | None = None):
        self.total, self.start, self.counter = total, start, counter
        self.last = Snapshot(None if counter is None else 0, total, 0.0, None, None, counter)

    def update(self, processed: int | None, now: float) -> Snapshot:
        elapsed = max(0.0, now - self.start)
        if processed is None:
            processed = self.last.processed
        rate = processed / elapsed if processed is not None and elapsed > 0 else None
        eta = None
        if self.total is not None and processed is not None and rate:
            eta = max(0.0, (self.total - processed) / rate)
        self.last = Snapshot(processed, self.total, elapsed, rate, eta, self.counter)
        return self.last


def _duration(seconds: float | None) -> str:
    if seconds is None or math.isinf(seconds) or math.isnan(seconds):
        return '-'
    return str(datetime.timedelta(seconds=round(seconds)))


def format_bar(snap: Snapshot, width: int = 30) -> str:
    """``[#########.....................]  6,000 / 20,000 candidates_read  30%  1,500/s  0:00:09 left``"""
    fraction = snap.fraction
    if fraction is None:
        bar = '[' + '?' * width + ']'
    else:
        filled = int(round(fraction * width))
        bar = '[' + '#' * filled + '.' * (width - filled) + ']'
    return f'{bar}  {_figures(snap)}'


def format_line(snap: Snapshot, label: str = 'progress') -> str:
    """One plain line for logs: ``progress: 6,000 of 20,000 candidates_read (30%), 1,500/s, 0:00:09 left, 0:00:04 elapsed``"""
    return f'{label}: {_figures(snap, plain=True)}'


def _figures(snap: Snapshot, plain: bool = False) -> str:
    what = snap.counter or 'items'
    if snap.processed is None:
        return f'running, {_duration(snap.elapsed)} elapsed (no progress counter for this operation)'
    parts = []
    if snap.total is not None:
        of = ' of ' if plain else ' / '
        parts.append(f'{snap.processed:,}{of}{snap.total:,} {what}')
        parts.append(f'({snap.fraction:.0%})' if plain else f'{snap.fraction:.0%}')
    else:
        parts.append(f'{snap.processed:,} {what}')
    parts.append(f'{snap.rate:,.0f}/s' if snap.rate is not None else '-/s')
    if snap.total is not None:
        parts.append(f'{_duration(snap.eta)} left')
    parts.append(f'{_duration(snap.elapsed)} elapsed')
    return (', ' if plain else '  ').join(parts).replace(', (', ' (')


class ConsoleReporter:
    """Shows snapshots on ``stream``: a live bar redrawn in place on a terminal, else one line every
    ``interval`` seconds (of the injected clock's time), and always one at the end."""

    def __init__(self, stream: typing.TextIO | None = None, *, tty: bool | None = None,
                 interval: float | None = None, label: str = 'progress'):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        if interval is None:
            interval = float(os.environ.get(INTERVAL_ENV) or DEFAULT_INTERVAL)
        self.interval = interval
        self.label = label
        self._last_line: float | None = None
        self._drawn = 0

    def report(self, snap: Snapshot, now: float) -> None:
        if self.tty:
            text = format_bar(snap)
            self.stream.write('\r' + text.ljust(self._drawn))
            self._drawn = len(text)
            self.stream.flush()
        elif self._last_line is None or now - self._last_line >= self.interval:
            self._last_line = now
            print(format_line(snap, self.label), file=self.stream, flush=True)

    def finish(self, snap: Snapshot, state: str) -> None:
        if self.tty:
            self.stream.write('\r' + format_bar(snap).ljust(self._drawn) + f'  {state}\n')
            self.stream.flush()
        else:
            print(f'{format_line(snap, self.label)} ({state})', file=self.stream, flush=True)


class NullReporter:
    def report(self, snap: Snapshot, now: float) -> None:
        pass

    def finish(self, snap: Snapshot, state: str) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# Live metrics of the local runner


def _user_counters(monitoring_infos) -> dict[str, int]:
    counters = portable_metrics.from_monitoring_infos(monitoring_infos, True)[0]
    summed: dict[str, int] = {}
    for key, value in counters.items():
        if key.metric.namespace == METRICS_NAMESPACE:
            summed[key.metric.name] = summed.get(key.metric.name, 0) + int(value or 0)
    return summed


class LiveCounters:
    """Counters of the finished bundles plus the latest report of each bundle in flight."""

    def __init__(self):
        self._lock = threading.Lock()
        self._finished: dict[str, int] = {}
        self._in_flight: dict[str, dict[str, int]] = {}

    def bundle_progress(self, instruction_id: str, monitoring_infos) -> None:
        counters = _user_counters(monitoring_infos)
        with self._lock:
            self._in_flight[instruction_id] = counters

    def bundles_finished(self, monitoring_infos) -> None:
        counters = _user_counters(monitoring_infos)
        with self._lock:
            # The finished result replaces every in-flight report of the bundles it merges.
            self._in_flight.clear()
            for name, value in counters.items():
                self._finished[name] = self._finished.get(name, 0) + value

    def value(self, name: str) -> int:
        with self._lock:
            return self._finished.get(name, 0) + sum(c.get(name, 0) for c in self._in_flight.values())


_ACTIVE: list[LiveCounters] = []   # the live run of this process (one at a time)
_ACTIVE_LOCK = threading.Lock()


class _ReportingProgressRequester(fn_runner.ProgressRequester):
    """Beam's progress requester, forwarding each answer to the live run's counters."""

    def __init__(self, worker_handler, instruction_id, frequency, callback=None):
        def forward(progress):
            with _ACTIVE_LOCK:
                live = _ACTIVE[0] if _ACTIVE else None
            if live is not None:
                live.bundle_progress(instruction_id, progress.monitoring_infos)
            if callback is not None:
                callback(progress)
        super().__init__(worker_handler, instruction_id, frequency, forward)


# Beam's BundleManager looks the requester up in its module at each bundle. Forwarding only happens
# while a LiveFnApiRunner runs, and only when progress requests are switched on.
fn_runner.ProgressRequester = _ReportingProgressRequester


class LiveFnApiRunner(fn_runner.FnApiRunner):
    """The local engine, whose counters can be read while it runs (``live``)."""

    def __init__(self, progress_request_frequency: float = WORKER_PROGRESS_SECONDS, **kwargs):
        super().__init__(progress_request_frequency=progress_request_frequency, **kwargs)
        self.live = LiveCounters()

    def run_stages(self, stage_context, stages):
        with _ACTIVE_LOCK:
            registered = not _ACTIVE
            if registered:
                _ACTIVE.append(self.live)
        try:
            return super().run_stages(stage_context, stages)
        finally:
            if registered:
                with _ACTIVE_LOCK:
                    _ACTIVE.remove(self.live)

    def _execute_bundle(self, *args, **kwargs):
        results = super()._execute_bundle(*args, **kwargs)
        self.live.bundles_finished(results.process_bundle.monitoring_infos)
        return results


def runner_name(beam_args: list[str]) -> str:
    return pipeline_options(beam_args).view_as(StandardOptions).runner


def local_runner(beam_args: list[str]):
    """A ``LiveFnApiRunner`` when the options resolve to the local engine, else None (Beam builds
    the runner the options name)."""
    return LiveFnApiRunner() if runner_name(beam_args) == LOCAL_RUNNER else None


# ------------------------------------------------------------------------------------------------
# Jobs: a local pipeline in a thread, or a job of a remote runner


class _DropCancellation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, PipelineCancelled) or 'PipelineCancelled' in record.getMessage())


def _quiet_cancellation_tracebacks() -> None:
    """Beam logs the exception that stops a bundle with its traceback: not an error here."""
    for name in ('apache_beam.runners.common', 'apache_beam.runners.worker.sdk_worker',
                 'apache_beam.runners.worker.bundle_processor', 'apache_beam.runners.portability.fn_api_runner.fn_runner'):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropCancellation) for f in target.filters):
            target.addFilter(_DropCancellation())


class LocalJob:
    """``pipeline.run()`` of the local engine, in a thread of its own."""

    def __init__(self, pipeline, clock: Clock):
        self._pipeline = pipeline
        self._clock = clock
        self._done = threading.Event()
        self._result = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name='hrbatch-pipeline', daemon=True)
        runner = getattr(pipeline, 'runner', None)
        self._live = getattr(runner, 'live', None)
        self.job_id = None

    def _run(self):
        try:
            self._result = self._pipeline.run()
            self._result.wait_until_finish()
        except BaseException as error:  # handed to the watching thread
            self._error = error
        finally:
            self._done.set()

    def start(self) -> None:
        self._thread.start()

    def wait(self, seconds: float) -> bool:
        return self._clock.wait(self._done, seconds)

    def processed(self, counter: str | None) -> int | None:
        if counter is None or self._live is None:
            return None
        return self._live.value(counter)

    def cancel(self) -> None:
        if self._done.is_set() or self._thread.ident is None:
            return
        _quiet_cancellation_tracebacks()
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread.ident),
                                                   ctypes.py_object(PipelineCancelled))

    def stop(self, grace: float) -> bool:
        """After ``cancel``: waits for the thread to end (repeating the request, in case code in the
        pipeline caught it); False if it is still running after ``grace`` seconds."""
        deadline = time.monotonic() + grace
        while not self._done.wait(0.5):
            if time.monotonic() >= deadline:
                return False
            self.cancel()
        return True

    def result(self):
        if self._error is not None:
            raise self._error
        return self._result


class RunnerJob:
    """A job of a runner whose ``pipeline.run()`` returns while the job runs (Flink, Dataflow)."""

    def __init__(self, pipeline, clock: Clock):
        self._pipeline = pipeline
        self._clock = clock
        self._result = None
        self.job_id = None

    def start(self) -> None:
        self._result = self._pipeline.run()
        job_id = getattr(self._result, 'job_id', None)
        try:
            self.job_id = job_id() if callable(job_id) else (job_id or getattr(self._result, '_job_id', None))
        except Exception:  # noqa: BLE001 - a job id is informative only
            self.job_id = getattr(self._result, '_job_id', None)

    def _terminal(self) -> bool:
        return PipelineState.is_terminal(self._result.state)

    def wait(self, seconds: float) -> bool:
        if self._terminal():
            return True
        self._clock.wait(None, seconds)
        return self._terminal()

    def _live_metrics(self):
        # A portable result caches the first answer of metrics(): ask its job service directly so the
        # final metrics read by the pipeline's summary are not an early snapshot.
        service, job_id = getattr(self._result, '_job_service', None), getattr(self._result, '_job_id', None)
        if service is not None and job_id is not None:
            from apache_beam.portability.api import beam_job_api_pb2
            from apache_beam.runners.portability.portable_runner import PortableMetrics
            return PortableMetrics(service.GetJobMetrics(beam_job_api_pb2.GetJobMetricsRequest(job_id=job_id)))
        return self._result.metrics()

    def processed(self, counter: str | None) -> int | None:
        if counter is None:
            return None
        try:
            found = self._live_metrics().query(
                MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(counter))['counters']
        except Exception as error:  # noqa: BLE001 - progress must never fail the run
            _LOGGER.debug('metrics not available yet: %s', error)
            return None
        return sum(int((r.attempted if r.attempted is not None else r.committed) or 0) for r in found)

    def cancel(self) -> None:
        if not self._terminal():
            self._result.cancel()

    def stop(self, grace: float) -> bool:
        try:
            self._result.wait_until_finish()
        except Exception as error:  # noqa: BLE001 - a cancelled job may report itself failed
            _LOGGER.debug('cancelled job ended with %s', error)
        return True

    def result(self):
        self._result.wait_until_finish()
        return self._result


# ------------------------------------------------------------------------------------------------
# Watching a run


@dataclasses.dataclass
class Watch:
    """How ``run_watched`` observes a run; every field has a production default."""
    clock: Clock = dataclasses.field(default_factory=SystemClock)
    reporter: typing.Any = None
    poll: float = POLL_SECONDS
    ledger_every: float = LEDGER_EVERY
    cancel_every: float = dataclasses.field(
        default_factory=lambda: float(os.environ.get(CANCEL_EVERY_ENV) or CANCEL_EVERY))
    cancel_grace: float = CANCEL_GRACE


def _final_count(result, counter: str | None) -> int | None:
    if counter is None or result is None:
        return None
    query = MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(counter)
    return sum(int((r.committed if r.committed is not None else r.attempted) or 0)
               for r in result.metrics().query(query)['counters'])


def watch(job, *, run_id: str, counter: str | None, total: int | None, store: ledger.RunProgress | None,
          how: Watch | None = None, committed: CheckpointCounts | None = None):
    """Starts ``job`` and watches it to its end: progress to the reporter and the ledger, cancel
    requests from the ledger, Ctrl-C. Returns the job's result; raises RunCancelled if cancelled, or
    the job's own error."""
    how = how or Watch()
    clock = how.clock
    reporter = how.reporter or NullReporter()
    meter = ProgressMeter(total=total, start=clock.monotonic(), counter=counter)

    def processed() -> int | None:
        live = job.processed(counter)
        if committed is None:
            return live
        return max(live or 0, committed.value())
    last_ledger = last_cancel = -math.inf
    snap = meter.last
    try:
        job.start()
        if store is not None and job.job_id:
            store.set_job_id(run_id, str(job.job_id))
        while True:
            finished = job.wait(how.poll)
            now = clock.monotonic()
            snap = meter.update(processed(), now)
            if finished:
                break
            reporter.report(snap, now)
            if store is not None and now - last_ledger >= how.ledger_every:
                last_ledger = now
                store.record(run_id, snap.processed or 0, total, snap.rate)
            if store is not None and now - last_cancel >= how.cancel_every:
                last_cancel = now
                if store.cancel_requested(run_id):
                    raise _CancelRequested()
    except (KeyboardInterrupt, _CancelRequested) as why:
        reason = 'interrupted (Ctrl-C)' if isinstance(why, KeyboardInterrupt) else 'cancel requested (hrbatch cancel)'
        job.cancel()
        stopped = job.stop(how.cancel_grace)
        snap = meter.update(processed(), clock.monotonic())
        if store is not None:
            store.record(run_id, snap.processed or 0, total, snap.rate)
        reporter.finish(snap, 'cancelled')
        detail = '' if stopped else f'; the local pipeline did not stop within {how.cancel_grace:.0f} s and was abandoned'
        raise RunCancelled(f'run {run_id} cancelled: {reason}{detail}', reason=reason) from None
    try:
        result = job.result()
    except BaseException:
        if store is not None:
            store.record(run_id, snap.processed or 0, total, snap.rate)
        reporter.finish(snap, 'failed')
        raise
    final = _final_count(result, counter)
    snap = meter.update(final if final is not None else snap.processed, clock.monotonic())
    if store is not None:
        store.record(run_id, snap.processed or 0, total, snap.rate)
    reporter.finish(snap, 'done')
    return result


def run_watched(pipeline, *, operation: str, values: typing.Mapping, run_id: str, ledger_url: str | None,
                beam_args: list[str], checkpoints: str | None = None, how: Watch | None = None):
    """Runs ``pipeline`` (built with ``local_runner(beam_args)`` for live local progress) under
    ``watch``: what ``lifecycle.run_pipeline`` calls instead of ``pipeline.run().wait_until_finish()``.
    ``checkpoints``: the run's checkpoint directory, for operations that count committed tasks."""
    spec = progress_spec(operation, values)
    counter = spec.counter
    total = parquet_total(values.get(spec.total_option)) if spec.total_option else None
    clock = how.clock if how else SystemClock()
    committed = (CheckpointCounts(checkpoints, spec.checkpoint_count, clock)
                 if checkpoints and spec.checkpoint_count else None)
    runner = getattr(pipeline, 'runner', None)
    local = isinstance(runner, fn_runner.FnApiRunner)
    job = LocalJob(pipeline, clock) if local else RunnerJob(pipeline, clock)
    store = ledger.RunProgress(ledger_url) if ledger_url else None
    name = runner_name(beam_args)
    if store is not None:
        store.start(run_id, runner=name, counter=counter, total=total)
    if how is None:
        how = Watch(clock=clock, reporter=ConsoleReporter(label=f'{operation} {run_id}'))
    return watch(job, run_id=run_id, counter=counter, total=total, store=store, how=how, committed=committed)


def request_cancel(ledger_url: str, run_id: str, operator: str | None = None) -> ledger.RunProgressRow:
    """Records a cancel request for running run ``run_id`` (``hrbatch cancel``); LedgerError if the
    run is unknown or no longer running."""
    runs = ledger.RunLedger(ledger_url, create=False)
    run = runs.get(run_id)
    if run is None:
        raise ledger.LedgerError(f'run {run_id!r} is not in the run ledger {ledger.redact_url(ledger_url)!r}: '
                                 '"hrbatch runs list" shows the runs it holds')
    if run.state != ledger.RUNNING:
        raise ledger.InvalidTransitionError(f'run {run_id} is {run.state}: only a running run can be cancelled')
    return ledger.RunProgress(ledger_url).request_cancel(run_id, operator)


"""``hrbatch schedule``: launches the project's pipelines on cron schedules, each in its time zone,
exactly once per scheduled local time, inside the companies' maintenance windows.

    hrbatch schedule --config schedules.yaml                 a scheduler process (polls every ``poll``)
    hrbatch schedule --config schedules.yaml --once [--at T] evaluate one instant, start what is due,
                                                             wait for it, exit (tests, cron-driven use)
    hrbatch schedule exec --config F --schedule NAME         run the occurrence that just fell due, once,
                                                             in this process (what exported CronJobs run)
    hrbatch schedule export --config F --target k8s|cloud-scheduler|airflow --output DIR

The configuration (``pipelines/schedules.example.yaml`` is a complete one)::

    ledger: postgresql://hrbatch@db/hrbatch   # the run ledger and audit trail every run records in
    concurrency: 2                            # runs at once, all schedules together
    runners: {flink: [--runner=FlinkRunner, ...], local: []}
    companies: {acme: {timezone: Europe/Paris, allowed_hours: ..., public_holidays: FR, action: defer}}
    schedules:
      - name: dsn-acme                        # lower-case letters, digits, '-' (a Kubernetes name)
        pipeline: dsn
        cron: '0 6 5 * *'                     # five fields, in the schedule's local wall-clock time
        timezone: Europe/Paris
        company: acme                         # whose maintenance windows apply (optional)
        priority: critical                    # critical, default, low
        catch_up: latest                      # latest, all, none
        max_lateness: 24h
        retries: 3                            # attempts after the first
        backoff: {initial: 5m, factor: 2, max: 1h, jitter: 0.25}
        runner: flink
        args: {period: '{previous_month}', payslips: 'out/payroll-{previous_month}/payslips/*/part-*.parquet'}

Exactly once
------------
Each occurrence has the run key ``<schedule>:<local wall-clock time>`` (``dsn-acme:2026-12-05T06:00``)
and is launched as ``hrbatch run PIPELINE ARGS --run_key KEY --run_id ID --ledger URL``. The run
ledger (``transforms.ledger``) is the only memory: a key that succeeded is never launched again, a key
that is running (from this scheduler, another instance, or a person) is not launched a second time, so
a restarted scheduler or two schedulers on one ledger never double-run; the ledger serialises two
``begin`` of one key, and the second is refused.

Daylight saving time (``transforms.windows.resolve_local``)
---------------------------------------------------------------
Cron expressions are matched against local wall-clock times, each wall-clock time once:

* a local time that does not exist (02:30 in Europe/Paris on the last Sunday of March) runs once, at
  the first instant after the gap (03:00 CEST);
* a local time that happens twice (02:30 on the last Sunday of October) runs once, at its first
  occurrence (summer time, ``fold=0``); the repeated hour starts nothing.

Several wall-clock times of one gap (``*/15`` between 02:00 and 03:00) all fall due at 03:00 with
distinct run keys; the catch-up policy then decides, as for any occurrences due at once.

Catch-up
--------
An occurrence falls due at its scheduled instant, or, when the company's windows defer it, at the
next instant they allow. After downtime (or a deferral), per schedule:

* ``latest`` (default): only the most recent occurrence runs, if it fell due within ``max_lateness``
  (default 24h); older ones are reported as missed;
* ``all``: every occurrence that fell due within ``max_lateness`` runs, oldest first;
* ``none``: an occurrence runs only if the scheduler sees it within ``grace`` (default 5m) of falling due.

Retries
-------
A failed attempt is retried after ``initial x factor^(n-1)`` (capped at ``max``), shortened by a random
share of at most ``jitter``, drawn from a generator seeded with (``seed``, run key, attempt): restarting
the scheduler gives the same retry times, and runs failing together do not retry together. Each retry
is the same run key, so the pipeline's idempotent writes and the ledger make it safe. After
``retries`` retries the occurrence is given up. Every launch, retry time, give-up, deferral,
refusal and override is in the audit trail (``schedule.*``, ``window.*`` actions).

Launching
---------
Each run is a subprocess (``python -m pipelines.cli run ...``): a pipeline that exhausts memory or
crashes the interpreter takes only itself down, Beam's process-wide state never leaks between runs,
and the scheduler can start several at once. If a child exits without recording an end (killed, OOM)
its ledger row is marked failed by the scheduler, which saw it die, and the retry policy applies; a
row left ``running`` by a scheduler that itself died is never touched (``hrbatch run ... --resume`` is
an operator's decision, see ``transforms.ledger``).

The clock is injected (``Clock``): tests and ``--once --at`` never sleep on wall-clock time.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import typing

import croniter as croniter_module
import yaml

from pipelines import registry
from pipelines.options import ConfigErrorParser
from transforms import audit
from transforms import ledger
from transforms import windows as win
from transforms.errors import ConfigError

PRIORITIES = ('critical', 'default', 'low')
CATCH_UP = ('latest', 'all', 'none')
DEFAULT_MAX_LATENESS = datetime.timedelta(hours=24)
DEFAULT_GRACE = datetime.timedelta(minutes=5)
DEFAULT_MAX_DEFERRAL = datetime.timedelta(days=7)
DEFAULT_POLL = datetime.timedelta(seconds=30)
SCHEDULER_OPERATOR = 'hrbatch-scheduler'
_MAX_SCANNED = 2000  # occurrences looked at per schedule and evaluation, newest first
_NAME = re.compile(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')
_DURATION = re.compile(r'^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d)?\s*$')
_MACROS = {'@yearly': '0 0 1 1 *', '@annually': '0 0 1 1 *', '@monthly': '0 0 1 * *', '@weekly': '0 0 * * 0',
           '@daily': '0 0 * * *', '@midnight': '0 0 * * *', '@hourly': '0 * * * *'}
# Options the scheduler sets on every run: a schedule's args must not.
_RESERVED = ('run_key', 'run_id', 'ledger', 'force', 'resume', 'operator', 'windows', 'company')

# Statuses of an occurrence in an evaluation.
DUE, STARTED, QUEUED, RUNNING, DONE = 'due', 'started', 'queued', 'running', 'done'
DEFERRED, REFUSED, WAITING_RETRY, GAVE_UP, MISSED, CANCELLED = (
    'deferred', 'refused', 'waiting_retry', 'gave_up', 'missed', 'cancelled')

# Audit actions of the scheduler (any lower-case dotted name is accepted by the trail).
SCHEDULE_LAUNCHED = 'schedule.launched'
SCHEDULE_RETRY = 'schedule.retry_scheduled'
SCHEDULE_GAVE_UP = 'schedule.gave_up'
SCHEDULE_DEFERRED = 'schedule.deferred'
WINDOW_REFUSED = audit.WINDOW_REFUSED
WINDOW_OVERRIDDEN = audit.WINDOW_OVERRIDDEN


# ------------------------------------------------------------------------------------------------
# Clock


class Clock(typing.Protocol):
    def now(self) -> datetime.datetime: ...
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.timezone.utc)

    def sleep(self, seconds: float) -> None:
        import time
        time.sleep(seconds)


class FakeClock:
    """A clock that only moves when told: ``sleep`` advances it (tests, ``--once --at``)."""

    def __init__(self, start: datetime.datetime):
        self.moment = _aware(start, what='start')

    def now(self) -> datetime.datetime:
        return self.moment

    def sleep(self, seconds: float) -> None:
        self.moment += datetime.timedelta(seconds=seconds)


def _aware(moment: datetime.datetime, *, what: str) -> datetime.datetime:
    if moment.tzinfo is None:
        raise ValueError(f'{what}={moment!r} is not allowed: it must be timezone-aware')
    return moment.astimezone(datetime.timezone.utc)


def parse_instant(text: str) -> datetime.datetime:
    """``--at``: ISO 8601 with an offset or Z (``2026-03-29T01:00:00Z``)."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace('Z', '+00:00'))
    except ValueError:
        raise ConfigError(f'--at={text!r}: expected an ISO 8601 time with its offset, e.g. 2026-03-29T03:00:00+02:00') from None
    if moment.tzinfo is None:
        raise ConfigError(f'--at={text!r}: give the offset or Z, e.g. 2026-03-29T03:00:00+02:00')
    return moment.astimezone(datetime.timezone.utc)


# ------------------------------------------------------------------------------------------------
# Configuration


def parse_duration(value, *, where: str) -> datetime.timedelta:
    """``30s``, ``5m``, ``24h``, ``7d`` or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(f'{where}={value!r}: expected a duration such as 30s, 5m, 24h or 7d')
        seconds = float(match.group(1)) * {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}[match.group(2) or 's']
    if seconds < 0:
        raise ConfigError(f'{where}={value!r}: must not be negative')
    return datetime.timedelta(seconds=seconds)


@dataclasses.dataclass(frozen=True)
class Backoff:
    initial: datetime.timedelta = datetime.timedelta(minutes=1)
    factor: float = 2.0
    max: datetime.timedelta = datetime.timedelta(hours=1)
    jitter: float = 0.25

    @classmethod
    def from_config(cls, config, *, where: str) -> Backoff:
        config = config or {}
        unknown = sorted(set(config) - {'initial', 'factor', 'max', 'jitter'})
        if unknown:
            raise ConfigError(f'{where}: unknown key(s) {", ".join(unknown)}; allowed: initial, factor, max, jitter')
        backoff = cls(initial=parse_duration(config.get('initial', '1m'), where=f'{where}.initial'),
                      factor=float(config.get('factor', 2.0)),
                      max=parse_duration(config.get('max', '1h'), where=f'{where}.max'),
                      jitter=float(config.get('jitter', 0.25)))
        if backoff.factor < 1:
            raise ConfigError(f'{where}.factor={backoff.factor!r}: must be >= 1')
        if not 0 <= backoff.jitter <= 1:
            raise ConfigError(f'{where}.jitter={backoff.jitter!r}: must be in [0, 1]')
        if backoff.max < backoff.initial:
            raise ConfigError(f'{where}.max must be >= initial')
        return backoff

    def delay(self, failures: int, run_key: str, seed: int = 0) -> datetime.timedelta:
        """The wait after the ``failures``-th failed attempt of ``run_key``: exponential, capped, then
        shortened by up to ``jitter`` (deterministic for a seed, key and attempt)."""
        if failures < 1:
            raise ValueError(f'failures={failures!r} is not allowed: it must be >= 1')
        base = min(self.max.total_seconds(), self.initial.total_seconds() * self.factor ** (failures - 1))
        draw = random.Random(hashlib.sha256(f'{seed}:{run_key}:{failures}'.encode()).digest()).random()
        return datetime.timedelta(seconds=round(base * (1 - self.jitter * draw), 3))


@dataclasses.dataclass(frozen=True)
class Occurrence:
    """One scheduled local time of a schedule: ``wall`` (naive local), ``at`` (its UTC instant by the DST
    rule) and ``due`` (when it may start: ``at``, or later when a window defers it)."""
    schedule: str
    wall: datetime.datetime
    at: datetime.datetime
    due: datetime.datetime

    @property
    def run_key(self) -> str:
        return run_key(self.schedule, self.wall)


def run_key(schedule: str, wall: datetime.datetime) -> str:
    return f'{schedule}:{wall.isoformat(timespec="minutes")}'


def _month_before(wall: datetime.datetime) -> str:
    first = wall.date().replace(day=1)
    return (first - datetime.timedelta(days=1)).strftime('%Y-%m')


def placeholders(schedule: str, wall: datetime.datetime) -> dict:
    """What ``{...}`` in a schedule's args may name."""
    return {'scheduled': wall, 'scheduled_date': wall.date().isoformat(), 'previous_month': _month_before(wall),
            'schedule': schedule, 'run_key': run_key(schedule, wall)}


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    pipeline: str
    cron: str
    timezone: str
    company: str | None = None
    priority: str = 'default'
    catch_up: str = 'latest'
    max_lateness: datetime.timedelta = DEFAULT_MAX_LATENESS
    retries: int = 2
    backoff: Backoff = Backoff()
    runner: str = 'local'
    args: tuple[str, ...] = ()

    @property
    def tz(self):
        return win.timezone(self.timezone, where=f'schedule {self.name}')

    def render_args(self, wall: datetime.datetime) -> list[str]:
        values = placeholders(self.name, wall)
        return [arg.format_map(values) for arg in self.args]

    def wall_times(self, after: datetime.datetime, count_back: int, until: datetime.datetime) -> list[datetime.datetime]:
        """Local wall-clock times matching the cron expression, newest first, from ``until`` back to
        ``after`` (naive local), at most ``count_back``."""
        iterator = croniter_module.croniter(self.cron, until + datetime.timedelta(minutes=1))
        found = []
        while len(found) < count_back:
            wall = iterator.get_prev(datetime.datetime)
            if wall <= after:
                break
            found.append(wall)
        return found


_SCHEDULE_KEYS = {'name', 'pipeline', 'cron', 'timezone', 'company', 'priority', 'catch_up', 'max_lateness',
                  'retries', 'backoff', 'runner', 'args'}
_TOP_KEYS = {'ledger', 'concurrency', 'grace', 'poll', 'seed', 'operator', 'max_deferral', 'runners', 'companies',
             'schedules', 'export'}


def _cron(text, *, where: str) -> str:
    cron = _MACROS.get(str(text).strip(), str(text).strip())
    if len(cron.split()) != 5 or not croniter_module.croniter.is_valid(cron):
        raise ConfigError(f'{where}: cron={text!r}: expected five fields (minute hour day month weekday), '
                          "e.g. '0 2 * * *', or @daily, @hourly, @weekly, @monthly, @yearly")
    return cron


def _args(value, *, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, typing.Mapping):
        tokens = []
        for key, item in value.items():
            if isinstance(item, bool):
                item = 'true' if item else 'false'
            tokens.append(f'--{key}={item}')
    elif isinstance(value, (list, tuple)):
        tokens = [str(item) for item in value]
    else:
        raise ConfigError(f'{where}: args must be a mapping of option to value, or a list of arguments')
    for token in tokens:
        flag = token.split('=', 1)[0].lstrip('-')
        if token.startswith('--') and flag in _RESERVED:
            raise ConfigError(f'{where}: args must not set --{flag}: the scheduler sets it for every run')
    return tuple(tokens)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    ledger: str
    schedules: tuple[Schedule, ...]
    windows: win.Windows
    runners: dict[str, tuple[str, ...]]
    concurrency: int = 1
    grace: datetime.timedelta = DEFAULT_GRACE
    poll: datetime.timedelta = DEFAULT_POLL
    max_deferral: datetime.timedelta = DEFAULT_MAX_DEFERRAL
    seed: int = 0
    operator: str = SCHEDULER_OPERATOR
    export: dict = dataclasses.field(default_factory=dict)
    path: str | None = None

    def schedule(self, name: str) -> Schedule:
        for schedule in self.schedules:
            if schedule.name == name:
                return schedule
        raise ConfigError(f'no schedule named {name!r}; schedules: {", ".join(s.name for s in self.schedules)}')

    @classmethod
    def from_document(cls, document, *, path: str | None = None) -> SchedulerConfig:
        where = path or 'schedules'
        if not isinstance(document, typing.Mapping):
            raise ConfigError(f'{where}: expected a mapping with ledger, schedules, ...')
        unknown = sorted(set(document) - _TOP_KEYS)
        if unknown:
            raise ConfigError(f'{where}: unknown key(s) {", ".join(unknown)}; allowed: {", ".join(sorted(_TOP_KEYS))}')
        url = document.get('ledger') or os.environ.get('HRBATCH_DATABASE')
        if not url or not str(url).startswith(('sqlite:///', 'postgresql://')):
            raise ConfigError(f'{where}: ledger={url!r}: give the run ledger every scheduled run records in, '
                              'sqlite:///PATH or postgresql://... (or set HRBATCH_DATABASE)')
        runners = {'local': ()}
        for name, beam_args in (document.get('runners') or {}).items():
            if not isinstance(beam_args, (list, tuple)):
                raise ConfigError(f'{where}: runners.{name} must be a list of Beam options')
            runners[str(name)] = tuple(str(a) for a in beam_args)
        windows = win.Windows(document.get('companies'))
        schedules, seen = [], set()
        for index, entry in enumerate(document.get('schedules') or ()):
            at = f'{where}: schedules[{index}]'
            if not isinstance(entry, typing.Mapping):
                raise ConfigError(f'{at}: expected a mapping')
            extra = sorted(set(entry) - _SCHEDULE_KEYS)
            if extra:
                raise ConfigError(f'{at}: unknown key(s) {", ".join(extra)}; allowed: {", ".join(sorted(_SCHEDULE_KEYS))}')
            name = str(entry.get('name', ''))
            if not _NAME.match(name) or len(name) > 52:
                raise ConfigError(f'{at}: name={name!r}: lower-case letters, digits and -, at most 52 characters '
                                  '(it names the Kubernetes CronJob, the Cloud Scheduler job and the Airflow DAG)')
            if name in seen:
                raise ConfigError(f'{at}: schedule name {name!r} is used twice')
            seen.add(name)
            at = f'{where}: schedule {name}'
            pipeline = entry.get('pipeline')
            if pipeline not in registry.PIPELINES:
                raise ConfigError(f'{at}: pipeline={pipeline!r}: one of {", ".join(sorted(registry.PIPELINES))}')
            if 'timezone' not in entry:
                raise ConfigError(f'{at}: timezone is required (e.g. Europe/Paris): cron times are local times')
            win.timezone(entry['timezone'], where=at)
            company = entry.get('company')
            if company is not None:
                windows.calendar(str(company))
            priority = entry.get('priority', 'default')
            if priority not in PRIORITIES:
                raise ConfigError(f'{at}: priority={priority!r}: one of {", ".join(PRIORITIES)}')
            catch_up = entry.get('catch_up', 'latest')
            if catch_up not in CATCH_UP:
                raise ConfigError(f'{at}: catch_up={catch_up!r}: one of {", ".join(CATCH_UP)}')
            retries = entry.get('retries', 2)
            if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 20:
                raise ConfigError(f'{at}: retries={retries!r}: an integer in [0, 20]')
            runner = str(entry.get('runner', 'local'))
            if runner not in runners:
                raise ConfigError(f'{at}: runner={runner!r}: one of {", ".join(sorted(runners))} (see runners:)')
            schedule = Schedule(
                name=name, pipeline=pipeline, cron=_cron(entry.get('cron'), where=at), timezone=entry['timezone'],
                company=None if company is None else str(company), priority=priority, catch_up=catch_up,
                max_lateness=parse_duration(entry.get('max_lateness', '24h'), where=f'{at}: max_lateness'),
                retries=retries, backoff=Backoff.from_config(entry.get('backoff'), where=f'{at}: backoff'),
                runner=runner, args=_args(entry.get('args'), where=at))
            try:
                schedule.render_args(datetime.datetime(2026, 1, 1, 2, 0))
            except (KeyError, ValueError, IndexError, AttributeError) as error:
                raise ConfigError(f'{at}: args: bad placeholder ({error!r}); allowed: {{scheduled:%Y-%m-%d}}, '
                                  '{scheduled_date}, {previous_month}, {schedule}, {run_key}') from None
            schedules.append(schedule)
        if not schedules:
            raise ConfigError(f'{where}: no schedules')
        concurrency = document.get('concurrency', 1)
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigError(f'{where}: concurrency={concurrency!r}: an integer >= 1')
        return cls(ledger=str(url), schedules=tuple(schedules), windows=windows, runners=runners,
                   concurrency=concurrency, grace=parse_duration(document.get('grace', '5m'), where='grace'),
                   poll=parse_duration(document.get('poll', '30s'), where='poll'),
                   max_deferral=parse_duration(document.get('max_deferral', '7d'), where='max_deferral'),
                   seed=int(document.get('seed', 0)), operator=str(document.get('operator') or SCHEDULER_OPERATOR),
                   export=dict(document.get('export') or {}), path=path)


def load_config(path: str) -> SchedulerConfig:
    try:
        with open(path, encoding='utf-8') as handle:
            document = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f'--config={path!r}: cannot read it ({error.strerror})') from None
    except yaml.YAMLError as error:
        raise ConfigError(f'--config={path!r}: not valid YAML ({error})') from None
    return SchedulerConfig.from_document(document, path=path)


# ------------------------------------------------------------------------------------------------
# Occurrences


def occurrences(config: SchedulerConfig, schedule: Schedule, now: datetime.datetime) -> list[Occurrence]:
    """The occurrences that may matter at ``now``, oldest first: scheduled at or before ``now`` and
    falling due (after any deferral) at most ``max_lateness`` before it, or not due yet (deferred)."""
    tz = schedule.tz
    calendar = config.windows.calendar(schedule.company) if schedule.company else None
    defers = calendar is not None and calendar.action == win.DEFER
    lookback = schedule.max_lateness + max(config.grace, datetime.timedelta(0)) + \
        (config.max_deferral if defers else datetime.timedelta(0))
    # Wall times a few hours beyond each bound, so a time resolved across a DST change is not missed.
    slack = datetime.timedelta(hours=3)
    walls = schedule.wall_times(win._wall(now - lookback, tz) - slack, _MAX_SCANNED, win._wall(now, tz) + slack)
    found = []
    for wall in walls:
        at = win.resolve_local(wall, tz)
        if at > now or at <= now - lookback:
            continue
        due = at
        if defers:
            due = calendar.next_allowed(at) or datetime.datetime.max.replace(tzinfo=datetime.timezone.utc)
        found.append(Occurrence(schedule=schedule.name, wall=wall, at=at, due=due))
    found.sort(key=lambda o: (o.at, o.wall))
    return found


def select(schedule: Schedule, found: list[Occurrence], now: datetime.datetime,
           grace: datetime.timedelta) -> tuple[list[Occurrence], list[Occurrence], list[Occurrence]]:
    """The catch-up policy: (selected, deferred, missed). ``selected`` fell due and should run (or be
    retried); ``deferred`` are waiting for their window; ``missed`` will never run."""
    in_time = [o for o in found if o.due <= now and now - o.due <= schedule.max_lateness]
    too_late = [o for o in found if o.due <= now and now - o.due > schedule.max_lateness]
    waiting = [o for o in found if o.due > now]
    if schedule.catch_up == 'all':
        return in_time, waiting, too_late
    if schedule.catch_up == 'none':
        fresh = [o for o in in_time if now - o.due <= grace]
        chosen = fresh[-1:]
        return chosen, waiting[-1:], [o for o in found if o not in chosen and o not in waiting]
    # latest: the most recent occurrence wins, whether it is due or still deferred.
    if waiting and (not in_time or waiting[-1].at > in_time[-1].at):
        return [], waiting[-1:], in_time + too_late + waiting[:-1]
    return in_time[-1:], [], in_time[:-1] + too_late + waiting


# ------------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass
class Decision:
    """What the scheduler decided for one occurrence at one instant, and why."""
    schedule: Schedule
    occurrence: Occurrence
    status: str
    message: str
    attempt: int = 1
    when: datetime.datetime | None = None  # next allowed time (deferred/refused) or retry time
    window: win.WindowDecision | None = None
    run_id: str | None = None
    forced: bool = False

    @property
    def run_key(self) -> str:
        return self.occurrence.run_key

    def line(self) -> str:
        return f'{self.status:<13} {self.run_key:<40} {self.message}'


_RANK = {p: i for i, p in enumerate(PRIORITIES)}


def _local(moment: datetime.datetime, tz_name: str) -> str:
    import zoneinfo
    return moment.astimezone(zoneinfo.ZoneInfo(tz_name)).isoformat(timespec='minutes')


class LaunchHandle(typing.Protocol):
    def poll(self) -> int | None: ...
    def wait(self) -> int: ...
    def error_tail(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class LaunchRequest:
    schedule: Schedule
    occurrence: Occurrence
    run_id: str
    argv: tuple[str, ...]  # the arguments of ``hrbatch``: run PIPELINE ...
    attempt: int


class SubprocessLauncher:
    """Starts each run as ``python -m pipelines.cli run ...``; stderr is kept in a temporary file so a
    launch that fails before it is recorded can be explained."""

    def __init__(self, python: str | None = None, env: dict | None = None):
        self.python = python or sys.executable
        self.env = env

    def start(self, request: LaunchRequest) -> LaunchHandle:
        # The scheduler has applied the windows (and any --force) itself: the child must not check again.
        env = {k: v for k, v in (self.env or os.environ).items() if k not in ('HRBATCH_WINDOWS', 'HRBATCH_COMPANY')}
        return _Process([self.python, '-m', 'pipelines.cli', *request.argv], env)


class _Process:
    def __init__(self, command: list[str], env):
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)

    def poll(self):
        return self._process.poll()

    def wait(self):
        return self._process.wait()

    def error_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode('utf-8', 'replace').strip().splitlines()
        return lines[-1] if lines else ''


class Scheduler:
    """Evaluates the schedules at an instant, starts what is due, reaps what finished.

    ``clock`` gives the instant (``FakeClock`` in tests); ``launcher.start(LaunchRequest)`` starts a run
    (``SubprocessLauncher``); ``force`` overrides maintenance windows for this evaluation (audited);
    ``only`` restricts to some schedule names.
    """

    def __init__(self, config: SchedulerConfig, *, clock: Clock | None = None, launcher=None,
                 force: bool = False, only: typing.Collection[str] | None = None, out: typing.TextIO | None = None):
        self.config = config
        self.clock = clock or SystemClock()
        self.launcher = launcher or SubprocessLauncher()
        self.force = force
        self.only = set(only or ())
        for name in self.only:
            config.schedule(name)
        self.out = out or sys.stdout
        self.runs = ledger.RunLedger(config.ledger)
        self.trail = audit.AuditTrail(config.ledger)
        self.in_flight: dict[str, tuple[LaunchRequest, LaunchHandle]] = {}

    # -- reading state --------------------------------------------------------------------------

    def _audit_records(self, run_key: str, action: str) -> list:
        return self.trail.list_for_run_key(run_key, action=action)

    def _state(self, schedule: Schedule, occurrence: Occurrence, now: datetime.datetime) -> Decision:
        key = occurrence.run_key
        make = lambda status, message, **kw: Decision(schedule, occurrence, status, message, **kw)  # noqa: E731
        if key in self.in_flight:
            return make(RUNNING, f'running as {self.in_flight[key][0].run_id} (started here)')
        rows = self.runs.list(run_key=key, limit=1000)
        if any(r.state == ledger.SUCCEEDED for r in rows):
            done = next(r for r in rows if r.state == ledger.SUCCEEDED)
            return make(DONE, f'succeeded as {done.run_id} at {done.ended_at}')
        if rows and rows[0].state == ledger.RUNNING:
            return make(RUNNING, f'running as {rows[0].run_id} since {rows[0].started_at} ({rows[0].operator})')
        if rows and rows[0].state == ledger.CANCELLED:
            return make(CANCELLED, f'cancelled as {rows[0].run_id}: not relaunched')
        failures = sum(r.state == ledger.FAILED for r in rows)
        if failures == 0:
            return make(DUE, f'due since {_local(occurrence.due, schedule.timezone)}')
        if failures > schedule.retries:
            return make(GAVE_UP, f'failed {failures} times ({schedule.retries} retries): given up; last error: '
                                 f'{rows[0].error}', attempt=failures)
        retry_at = None
        for record in reversed(self._audit_records(key, SCHEDULE_RETRY)):
            if record.record_refs.get('failures') == failures:
                retry_at = datetime.datetime.fromisoformat(record.record_refs['retry_at'])
                break
        if retry_at is None:  # a failure this scheduler did not see (a run by hand): from the ledger
            ended = ledger.parse_time(rows[0].ended_at or rows[0].started_at)
            retry_at = ended + schedule.backoff.delay(failures, key, self.config.seed)
        if retry_at > now:
            return make(WAITING_RETRY, f'attempt {failures} failed; retry {failures + 1} of {schedule.retries + 1} '
                                       f'at {_local(retry_at, schedule.timezone)}', attempt=failures + 1, when=retry_at)
        return make(DUE, f'retry {failures} of {schedule.retries} (attempt {failures + 1})', attempt=failures + 1)

    def evaluate(self, now: datetime.datetime) -> list[Decision]:
        """Every occurrence that matters at ``now`` with its status; nothing is written or started."""
        now = _aware(now, what='now')
        decisions = []
        for schedule in self.config.schedules:
            if self.only and schedule.name not in self.only:
                continue
            found = occurrences(self.config, schedule, now)
            chosen, waiting, missed = select(schedule, found, now, self.config.grace)
            calendar = self.config.windows.calendar(schedule.company) if schedule.company else None
            for occurrence in missed[-3:]:  # the most recent few are enough to explain
                decisions.append(Decision(schedule, occurrence, MISSED,
                                          f'not run: catch_up={schedule.catch_up}, max_lateness={schedule.max_lateness}'))
            for occurrence in waiting:
                decision = calendar.check(occurrence.at)
                decisions.append(Decision(schedule, occurrence, DEFERRED, decision.message(), when=occurrence.due,
                                          window=decision))
            for occurrence in chosen:
                state = self._state(schedule, occurrence, now)
                if state.status == DUE and calendar is not None:
                    state = self._window(schedule, calendar, occurrence, state, now)
                decisions.append(state)
        self._queue(decisions)
        return decisions

    def _window(self, schedule, calendar, occurrence, state: Decision, now) -> Decision:
        checks = [calendar.check(now)]
        if calendar.action == win.REFUSE:
            checks.insert(0, calendar.check(occurrence.at))  # a run due outside its window is refused
        closed = next((c for c in checks if not c.allowed), None)
        if closed is None:
            return state
        if self.force:
            state.forced, state.window = True, closed
            state.message += f'; window overridden (--force): {closed.rule}'
            return state
        if calendar.action == win.DEFER:
            return Decision(schedule, occurrence, DEFERRED, closed.message(), attempt=state.attempt,
                            when=closed.next_allowed, window=closed)
        return Decision(schedule, occurrence, REFUSED, closed.message() + ' (refused: rerun with --force to override)',
                        attempt=state.attempt, when=closed.next_allowed, window=closed)

    def _queue(self, decisions: list[Decision]) -> None:
        """The concurrency limit: due runs by priority, then due time, then name; the rest queued."""
        running = sum(d.status == RUNNING for d in decisions)
        due = sorted((d for d in decisions if d.status == DUE),
                     key=lambda d: (_RANK[d.schedule.priority], d.occurrence.due, d.schedule.name, d.occurrence.wall))
        free = max(0, self.config.concurrency - running)
        for decision in due[free:]:
            decision.status = QUEUED
            decision.message += f' (queued: concurrency {self.config.concurrency} reached, priority {decision.schedule.priority})'
        decisions[:] = [d for d in decisions if d.status != DUE] + due[:free]

    # -- acting ---------------------------------------------------------------------------------

    def argv(self, schedule: Schedule, occurrence: Occurrence, run_id: str) -> list[str]:
        """``hrbatch`` arguments of one run of ``occurrence``."""
        return ['run', schedule.pipeline, *schedule.render_args(occurrence.wall), '--run_key', occurrence.run_key,
                '--run_id', run_id, '--ledger', self.config.ledger, '--operator', self.config.operator,
                *self.config.runners[schedule.runner]]

    def _append(self, action: str, decision: Decision, refs: dict) -> None:
        self.trail.append(action, operation=decision.schedule.pipeline, run_key=decision.run_key,
                          run_id=decision.run_id, operator=self.config.operator,
                          record_refs={'schedule': decision.schedule.name,
                                       'scheduled_for': decision.occurrence.wall.isoformat(timespec='minutes'),
                                       'timezone': decision.schedule.timezone, **refs})

    def _audit_once(self, action: str, decision: Decision, refs: dict) -> None:
        """Appends unless the same action with the same refs is already recorded for the key: a
        deferral re-evaluated every poll is audited once (again only if its next time changes)."""
        for record in self._audit_records(decision.run_key, action):
            if all(record.record_refs.get(k) == v for k, v in refs.items()):
                return
        self._append(action, decision, refs)

    def tick(self, now: datetime.datetime | None = None) -> list[Decision]:
        """Evaluates at ``now`` (default: the clock), audits deferrals and refusals, starts the due runs."""
        now = _aware(now or self.clock.now(), what='now')
        decisions = self.evaluate(now)
        for decision in decisions:
            if decision.status in (DEFERRED, REFUSED) and decision.window is not None:
                action = SCHEDULE_DEFERRED if decision.status == DEFERRED else WINDOW_REFUSED
                refs = {k: v for k, v in decision.window.refs().items() if k != 'at'}
                self._audit_once(action, decision, refs)
            elif decision.status == DUE:
                self._start(decision, now)
        return decisions

    def _start(self, decision: Decision, now: datetime.datetime) -> None:
        schedule, occurrence = decision.schedule, decision.occurrence
        decision.run_id = ledger.new_run_id(schedule.pipeline)
        if decision.forced and decision.window is not None:
            self._append(WINDOW_OVERRIDDEN, decision, decision.window.refs() | {'by': '--force'})
        request = LaunchRequest(schedule=schedule, occurrence=occurrence, run_id=decision.run_id,
                                argv=tuple(self.argv(schedule, occurrence, decision.run_id)), attempt=decision.attempt)
        self._append(SCHEDULE_LAUNCHED, decision, {'attempt': decision.attempt, 'at': now.isoformat(),
                                                   'priority': schedule.priority})
        self.in_flight[occurrence.run_key] = (request, self.launcher.start(request))
        decision.status = STARTED
        decision.message = f'started {decision.run_id} (attempt {decision.attempt}): hrbatch {shlex.join(request.argv)}'

    def reap(self, *, wait: bool = False) -> list[tuple[LaunchRequest, str]]:
        """Handles the runs that ended (all of them with ``wait``): a failure schedules its retry or
        gives up. Returns (request, ledger state) of each."""
        ended = []
        for key, (request, handle) in list(self.in_flight.items()):
            code = handle.wait() if wait else handle.poll()
            if code is None:
                continue
            del self.in_flight[key]
            ended.append((request, self._ended(request, handle, code)))
        return ended

    def _ended(self, request: LaunchRequest, handle: LaunchHandle, code: int) -> str:
        now = self.clock.now()
        key, schedule = request.occurrence.run_key, request.schedule
        row = self.runs.get(request.run_id)
        if row is None:
            latest = self.runs.latest(key)
            if latest is not None and latest.state in (ledger.SUCCEEDED, ledger.RUNNING):
                return latest.state  # done before, or someone else's run of the key
            if code == 0:
                return 'no_run'
            # Refused before it was recorded (bad arguments, a window, a lock): record the attempt so
            # that retries and give-up apply to it as to any failure.
            detail = audit.scrub_personal_data(handle.error_tail())
            try:
                self.runs.begin(key, schedule.pipeline, {'launch': list(request.argv)}, [], self.config.operator,
                                run_id=request.run_id)
            except ledger.RunInProgressError:
                return ledger.RUNNING
            row = self.runs.fail(request.run_id, f'launch failed before the run started (exit {code}): {detail}')
        elif row.state == ledger.RUNNING and code != 0:
            row = self.runs.fail(request.run_id, f'the run process exited with code {code} without recording an end')
        if row.state != ledger.FAILED:
            return row.state
        failures = sum(r.state == ledger.FAILED for r in self.runs.list(run_key=key, limit=1000))
        decision = Decision(schedule, request.occurrence, ledger.FAILED, '', attempt=failures, run_id=request.run_id)
        if failures > schedule.retries:
            self._append(SCHEDULE_GAVE_UP, decision, {'failures': failures, 'error': row.error})
            print(f'gave_up       {key:<40} failed {failures} times: {row.error}', file=self.out)
        else:
            delay = schedule.backoff.delay(failures, key, self.config.seed)
            retry_at = now + delay
            self._append(SCHEDULE_RETRY, decision, {'failures': failures, 'retry_at': retry_at.isoformat(),
                                                    'delay_s': delay.total_seconds(), 'error': row.error})
            print(f'retry         {key:<40} attempt {failures} failed ({row.error}); retry at '
                  f'{_local(retry_at, schedule.timezone)}', file=self.out)
        return ledger.FAILED

    # -- loops ----------------------------------------------------------------------------------

    def print_decisions(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            print(decision.line(), file=self.out)

    def once(self, at: datetime.datetime | None = None) -> int:
        """One evaluation at ``at``; waits for the runs it started. 1 if one of them failed."""
        decisions = self.tick(at)
        self.print_decisions(decisions)
        states = [state for _, state in self.reap(wait=True)]
        return 1 if ledger.FAILED in states else 0

    def serve(self, *, ticks: int | None = None) -> None:
        """Polls every ``poll`` until interrupted (or for ``ticks`` evaluations, for tests)."""
        count = 0
        while ticks is None or count < ticks:
            self.reap()
            decisions = self.tick()
            self.print_decisions([d for d in decisions if d.status in (STARTED, REFUSED, GAVE_UP)])
            count += 1
            self.clock.sleep(self.config.poll.total_seconds())
        self.reap(wait=True)


# ------------------------------------------------------------------------------------------------
# hrbatch schedule exec: one occurrence, in this process (what an exported CronJob runs)


def exec_argv(config: SchedulerConfig, name: str, now: datetime.datetime) -> list[str]:
    """``hrbatch`` arguments that run the latest occurrence of schedule ``name`` at or before ``now``,
    guarded by its company's windows (refused outside them: a CronJob cannot defer)."""
    schedule = config.schedule(name)
    tz = schedule.tz
    walls = schedule.wall_times(win._wall(now, tz) - datetime.timedelta(days=400), 4,
                                win._wall(now, tz) + datetime.timedelta(hours=3))
    walls = [w for w in walls if win.resolve_local(w, tz) <= now]
    if not walls:
        raise ConfigError(f'schedule {name}: no occurrence in the 400 days before {now.isoformat()}')
    wall = walls[0]
    argv = ['run', schedule.pipeline, *schedule.render_args(wall), '--run_key', run_key(name, wall),
            '--ledger', config.ledger, '--operator', config.operator, *config.runners[schedule.runner]]
    if schedule.company and config.path:
        argv += ['--windows', config.path, '--company', schedule.company]
    return argv


# ------------------------------------------------------------------------------------------------
# The window guard of hrbatch run (called by pipelines.lifecycle.run_pipeline)


class WindowRefusedError(ConfigError):
    """A run started outside its company's maintenance windows, without --force."""


def guard_run(operation: str, values: dict, spec, *, now: datetime.datetime | None = None) -> None:
    """Refuses a run outside its company's windows unless ``--force``; audits the refusal or the override.

    Applies when ``--windows FILE`` (or $HRBATCH_WINDOWS) and ``--company NAME`` (or $HRBATCH_COMPANY)
    are given; a hand-started run cannot be deferred, so ``defer`` companies refuse here too, saying
    when the run may start.
    """
    path = values.get('windows') or os.environ.get('HRBATCH_WINDOWS')
    company = values.get('company') or os.environ.get('HRBATCH_COMPANY')
    if not path and not company:
        return
    if not path or not company:
        raise ConfigError('--windows and --company go together: the file of maintenance windows and the company '
                          'whose windows apply (or $HRBATCH_WINDOWS and $HRBATCH_COMPANY)')
    now = now or datetime.datetime.now(datetime.timezone.utc)
    decision = win.load_windows(path).check(company, now)
    if decision.allowed:
        return
    trail = audit.AuditTrail(spec.ledger_url)
    refs = decision.refs() | {'started': 'by hand'}
    if values.get('force'):
        trail.append(WINDOW_OVERRIDDEN, operation=operation, run_key=spec.run_key, run_id=spec.run_id,
                     operator=spec.operator, record_refs=refs | {'by': '--force'})
        print(f'{operation} {spec.run_key}: {decision.message()}; overridden by --force (audited)')
        return
    trail.append(WINDOW_REFUSED, operation=operation, run_key=spec.run_key, run_id=spec.run_id,
                 operator=spec.operator, record_refs=refs)
    raise WindowRefusedError(f'{operation} {spec.run_key} refused: {decision.message()}. Rerun then, or with '
                             '--force to override (the override is audited).')


# ------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str], *, clock: Clock | None = None, launcher=None, out: typing.TextIO | None = None) -> int:
    """``hrbatch schedule [--once [--at T]] | exec | export``."""
    out = out or sys.stdout
    if argv and argv[0] == 'export':
        from pipelines import schedule_export
        return schedule_export.main(argv[1:], out=out)
    if argv and argv[0] == 'exec':
        parser = ConfigErrorParser(prog='hrbatch schedule exec', description='Run the latest occurrence of one '
                                   'schedule, once, in this process.')
        parser.add_argument('--config', required=True)
        parser.add_argument('--schedule', required=True)
        parser.add_argument('--at', type=parse_instant, help='the instant (default: now), ISO 8601 with offset')
        parser.add_argument('--print', action='store_true', help='print the hrbatch command instead of running it')
        args = parser.parse_args(argv[1:])
        config = load_config(args.config)
        now = args.at or (clock or SystemClock()).now()
        command = exec_argv(config, args.schedule, now)
        if args.print:
            print('hrbatch ' + shlex.join(command), file=out)
            return 0
        from pipelines import cli
        return cli.main(command)
    parser = ConfigErrorParser(prog='hrbatch schedule', description='Launch the pipelines on their schedules.')
    parser.add_argument('--config', required=True, help='the schedules file (YAML)')
    parser.add_argument('--once', action='store_true', help='evaluate one instant, start what is due, wait, exit')
    parser.add_argument('--at', type=parse_instant, help='with --once: the instant to evaluate (ISO 8601 with offset)')
    parser.add_argument('--schedule', action='append', default=[], help='only this schedule (repeatable)')
    parser.add_argument('--force', action='store_true', help='start due runs even outside their maintenance '
                        'windows (each override is audited)')
    parser.add_argument('--dry_run', action='store_true', help='with --once: print the decisions, start nothing')
    args = parser.parse_args(argv)
    if args.at and not args.once:
        raise ConfigError('--at needs --once: a scheduler process follows the clock')
    config = load_config(args.config)
    if args.at:
        clock = FakeClock(args.at)
    scheduler = Scheduler(config, clock=clock, launcher=launcher, force=args.force, only=args.schedule, out=out)
    if args.once:
        if args.dry_run:
            scheduler.print_decisions(scheduler.evaluate(scheduler.clock.now()))
            return 0
        return scheduler.once()
    print(f'hrbatch schedule: {len(config.schedules)} schedules, concurrency {config.concurrency}, '
          f'polling every {config.poll.total_seconds():g}s; ledger {ledger.redact_url(config.ledger)}', file=out)
    try:
        scheduler.serve()
    except KeyboardInterrupt:
        print('hrbatch schedule: stopped; runs still going continue and are in the ledger', file=out)
    return 0

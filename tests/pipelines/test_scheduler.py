"""hrbatch schedule: DST, exactly once through the run ledger, catch-up, priorities, retries, windows.

The clock is a FakeClock everywhere and runs are launched by a fake launcher that records them in the
ledger as ``hrbatch run`` would: nothing sleeps. One test launches a real ``hrbatch run`` subprocess.
"""
import datetime
import io

import pytest
import yaml

from pipelines import cli
from pipelines import generate
from pipelines import scheduler as sched
from transforms import audit
from transforms import ledger
from transforms.errors import ConfigError

UTC = datetime.timezone.utc


def utc(*args):
    return datetime.datetime(*args, tzinfo=UTC)


class FakeLauncher:
    """Records each launch and plays the child's part in the ledger: ``outcomes[run_key]`` is a list of
    'succeed', 'fail', 'crash' (dies leaving its row running), 'refuse' (exits before ``begin``) or
    'hang' (still running), consumed in order; default 'succeed'."""

    def __init__(self, url, outcomes=None):
        self.url, self.outcomes, self.started, self.handles = url, dict(outcomes or {}), [], []

    def start(self, request):
        handle = self._start(request)
        self.started.append(request)
        self.handles.append(handle)
        return handle

    def _start(self, request):
        key = request.occurrence.run_key
        outcome = (self.outcomes.get(key) or ['succeed']).pop(0) if self.outcomes.get(key) else 'succeed'
        runs = ledger.RunLedger(self.url)
        if outcome == 'refuse':
            return _Handle(2, 'hrbatch: error: --period: bad value')
        runs.begin(key, request.schedule.pipeline, {'argv': list(request.argv)}, [], 'test', run_id=request.run_id)
        if outcome == 'succeed':
            runs.succeed(request.run_id, {'rows': 1})
            return _Handle(0)
        if outcome == 'fail':
            runs.fail(request.run_id, 'RuntimeError: boom')
            return _Handle(1)
        if outcome == 'crash':
            return _Handle(-9)
        return _Handle(None)


class _Handle:
    def __init__(self, code, tail=''):
        self.code, self.tail = code, tail

    def poll(self):
        return self.code

    def wait(self):
        return self.code

    def error_tail(self):
        return self.tail


def make_config(tmp_path, schedules, **top):
    document = {'ledger': f'sqlite:///{tmp_path}/hrbatch.db', 'concurrency': 5,
                'runners': {'flink': ['--runner=FlinkRunner', '--flink_master=localhost:8081']},
                'schedules': schedules, **top}
    return sched.SchedulerConfig.from_document(document)


def daily(name='nightly', cron='30 2 * * *', **extra):
    return {'name': name, 'pipeline': 'matching', 'cron': cron, 'timezone': 'Europe/Paris',
            'args': {'candidates': 'c.parquet', 'offers': 'o.parquet', 'output': 'out/{scheduled_date}'}, **extra}


def scheduler(config, launcher, at, **kwargs):
    return sched.Scheduler(config, clock=sched.FakeClock(at), launcher=launcher, out=io.StringIO(), **kwargs)


def started_keys(launcher):
    return [r.occurrence.run_key for r in launcher.started]


# ------------------------------------------------------------------------------------------------
# Daylight saving time


def test_a_nonexistent_local_time_runs_once_at_the_end_of_the_gap(tmp_path):
    config = make_config(tmp_path, [daily()])
    launcher = FakeLauncher(config.ledger)
    # 2026-03-29 02:30 Europe/Paris does not exist: due at 03:00 CEST = 01:00 UTC.
    assert scheduler(config, launcher, utc(2026, 3, 29, 0, 59)).once() == 0
    assert started_keys(launcher) == ['nightly:2026-03-28T02:30']      # the day before, caught up
    assert scheduler(config, launcher, utc(2026, 3, 29, 1, 0)).once() == 0
    assert started_keys(launcher)[-1] == 'nightly:2026-03-29T02:30'
    for minute in (1, 30, 90):
        scheduler(config, launcher, utc(2026, 3, 29, 1, 0) + datetime.timedelta(minutes=minute)).once()
    assert started_keys(launcher).count('nightly:2026-03-29T02:30') == 1
    request = launcher.started[-1]
    assert request.occurrence.at == utc(2026, 3, 29, 1, 0)
    assert '--run_key' in request.argv and 'nightly:2026-03-29T02:30' in request.argv


def test_an_ambiguous_local_time_runs_once_at_its_first_occurrence(tmp_path):
    config = make_config(tmp_path, [daily()])
    launcher = FakeLauncher(config.ledger)
    # 2026-10-25 02:30 Europe/Paris happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET).
    scheduler(config, launcher, utc(2026, 10, 25, 0, 29)).once()
    scheduler(config, launcher, utc(2026, 10, 25, 0, 30)).once()
    assert started_keys(launcher)[-1] == 'nightly:2026-10-25T02:30'
    assert launcher.started[-1].occurrence.at == utc(2026, 10, 25, 0, 30)
    count = len(launcher.started)
    scheduler(config, launcher, utc(2026, 10, 25, 1, 30)).once()      # the second 02:30: nothing new
    scheduler(config, launcher, utc(2026, 10, 25, 1, 45)).once()
    assert len(launcher.started) == count


def test_an_hourly_schedule_across_both_dst_changes_runs_each_wall_time_once(tmp_path):
    config = make_config(tmp_path, [daily(name='hourly', cron='0 * * * *', catch_up='all', max_lateness='30m')])
    launcher = FakeLauncher(config.ledger)
    clock = sched.FakeClock(utc(2026, 10, 24, 22, 0))
    s = sched.Scheduler(config, clock=clock, launcher=launcher, out=io.StringIO())
    for _ in range(6 * 4):  # 6 hours in 15-minute steps
        s.tick()
        s.reap(wait=True)
        clock.sleep(15 * 60)
    walls = [k.split(':', 1)[1] for k in started_keys(launcher)]
    # 00:00 .. 04:00 local: 02:00 once (the CEST one), then 03:00 CET two hours of UTC later.
    assert walls == ['2026-10-25T00:00', '2026-10-25T01:00', '2026-10-25T02:00', '2026-10-25T03:00',
                     '2026-10-25T04:00']
    two = next(r for r in launcher.started if r.occurrence.run_key.endswith('T02:00'))
    three = next(r for r in launcher.started if r.occurrence.run_key.endswith('T03:00'))
    assert two.occurrence.at == utc(2026, 10, 25, 0, 0) and three.occurrence.at == utc(2026, 10, 25, 2, 0)


# ------------------------------------------------------------------------------------------------
# Exactly once through the run ledger


def test_a_restarted_scheduler_or_a_second_instance_never_runs_a_key_twice(tmp_path):
    config = make_config(tmp_path, [daily()])
    first = FakeLauncher(config.ledger, {'nightly:2026-06-10T02:30': ['hang']})
    at = utc(2026, 6, 10, 0, 31)
    scheduler(config, first, at).tick()
    second = FakeLauncher(config.ledger)
    decisions = scheduler(config, second, at).tick()          # another instance: the key is running
    assert second.started == [] and [d.status for d in decisions if d.status != sched.MISSED] == [sched.RUNNING]
    runs = ledger.RunLedger(config.ledger)
    runs.succeed(first.started[0].run_id, {})
    decisions = scheduler(config, second, at + datetime.timedelta(minutes=5)).tick()   # restarted
    assert second.started == [] and decisions[-1].status == sched.DONE


# ------------------------------------------------------------------------------------------------
# Catch-up after downtime


@pytest.mark.parametrize('policy, expected', [
    ('latest', ['nightly:2026-06-12T02:30']),
    ('all', ['nightly:2026-06-10T02:30', 'nightly:2026-06-11T02:30', 'nightly:2026-06-12T02:30']),
    ('none', []),
])
def test_catch_up_after_downtime(tmp_path, policy, expected):
    config = make_config(tmp_path, [daily(catch_up=policy, max_lateness='3d')])
    launcher = FakeLauncher(config.ledger)
    # Down from 2026-06-09 12:00 to 2026-06-12 10:00: three 02:30 occurrences missed.
    scheduler(config, launcher, utc(2026, 6, 12, 8, 0)).once()
    assert started_keys(launcher) == expected


def test_catch_up_respects_max_lateness_and_none_runs_within_grace(tmp_path):
    config = make_config(tmp_path, [daily(catch_up='all', max_lateness='30h')])
    launcher = FakeLauncher(config.ledger)
    scheduler(config, launcher, utc(2026, 6, 12, 4, 0)).once()     # 06-10 02:30 is 51.5 h late: missed
    assert started_keys(launcher) == ['nightly:2026-06-11T02:30', 'nightly:2026-06-12T02:30']
    none = make_config(tmp_path / 'n', [daily(catch_up='none')])
    (tmp_path / 'n').mkdir()
    launcher = FakeLauncher(none.ledger)
    scheduler(none, launcher, utc(2026, 6, 12, 0, 34)).once()   # 4 minutes late: within grace
    assert started_keys(launcher) == ['nightly:2026-06-12T02:30']


# ------------------------------------------------------------------------------------------------
# Concurrency and priorities


def test_the_concurrency_limit_starts_due_runs_by_priority(tmp_path):
    schedules = [daily(name='low-one', priority='low', cron='0 2 * * *'),
                 daily(name='default-one', cron='0 1 * * *'),
                 daily(name='critical-one', priority='critical', cron='0 3 * * *')]
    config = make_config(tmp_path, schedules, concurrency=1)
    launcher = FakeLauncher(config.ledger, {'critical-one:2026-06-10T03:00': ['hang']})
    s = scheduler(config, launcher, utc(2026, 6, 10, 2, 0))
    decisions = {d.schedule.name: d for d in s.tick()}
    assert started_keys(launcher) == ['critical-one:2026-06-10T03:00']
    assert decisions['default-one'].status == sched.QUEUED and 'concurrency 1 reached' in decisions['default-one'].message
    assert decisions['low-one'].status == sched.QUEUED
    s.tick()                                                  # still running: nothing else starts
    assert len(launcher.started) == 1
    ledger.RunLedger(config.ledger).succeed(launcher.started[0].run_id, {})
    launcher.handles[0].code = 0                              # the process ends
    s.reap()
    s.tick()                                                  # default before low
    s.reap()
    s.tick()
    assert started_keys(launcher)[1:] == ['default-one:2026-06-10T01:00', 'low-one:2026-06-10T02:00']


# ------------------------------------------------------------------------------------------------
# Retries


def test_a_failed_run_is_retried_with_exponential_backoff_and_jitter_then_given_up(tmp_path):
    config = make_config(tmp_path, [daily(retries=2, backoff={'initial': '10m', 'factor': 2, 'max': '1h',
                                                                'jitter': 0.5})], seed=7)
    key = 'nightly:2026-06-10T02:30'
    launcher = FakeLauncher(config.ledger, {key: ['fail', 'crash', 'fail']})
    clock = sched.FakeClock(utc(2026, 6, 10, 0, 30))
    s = sched.Scheduler(config, clock=clock, launcher=launcher, out=io.StringIO())
    assert s.once() == 1
    backoff = config.schedule('nightly').backoff
    first = backoff.delay(1, key, 7)
    assert datetime.timedelta(minutes=5) <= first <= datetime.timedelta(minutes=10)
    assert first == backoff.delay(1, key, 7) != backoff.delay(1, key, 8)     # seeded, not shared
    decisions = s.evaluate(clock.now() + first - datetime.timedelta(seconds=1))
    assert decisions[0].status == sched.WAITING_RETRY and 'retry 2 of 3' in decisions[0].message
    clock.moment += first
    assert s.once() == 1                                      # attempt 2 crashes: marked failed by us
    runs = ledger.RunLedger(config.ledger).list(run_key=key)
    assert runs[0].state == 'failed' and 'exited with code -9 without recording an end' in runs[0].error
    second = backoff.delay(2, key, 7)
    assert datetime.timedelta(minutes=10) <= second <= datetime.timedelta(minutes=20)
    clock.moment += second
    assert s.once() == 1                                      # attempt 3 fails: given up
    clock.moment += datetime.timedelta(hours=2)
    decisions = s.evaluate(clock.now())
    assert decisions[0].status == sched.GAVE_UP and len(launcher.started) == 3
    actions = [r.action for r in audit.AuditTrail(config.ledger).list_for_run_key(key)]
    assert actions == [sched.SCHEDULE_LAUNCHED, sched.SCHEDULE_RETRY, sched.SCHEDULE_LAUNCHED, sched.SCHEDULE_RETRY,
                       sched.SCHEDULE_LAUNCHED, sched.SCHEDULE_GAVE_UP]
    assert audit.AuditTrail(config.ledger).verify().ok


def test_a_launch_refused_before_it_is_recorded_counts_as_a_failed_attempt(tmp_path):
    config = make_config(tmp_path, [daily(retries=0)])
    key = 'nightly:2026-06-10T02:30'
    launcher = FakeLauncher(config.ledger, {key: ['refuse']})
    assert scheduler(config, launcher, utc(2026, 6, 10, 0, 30)).once() == 1
    (run,) = ledger.RunLedger(config.ledger).list(run_key=key)
    assert run.state == 'failed' and 'launch failed before the run started (exit 2)' in run.error
    assert scheduler(config, launcher, utc(2026, 6, 10, 3, 0)).evaluate(utc(2026, 6, 10, 3, 0))[0].status == sched.GAVE_UP


def test_the_scheduler_process_loop_runs_on_the_injected_clock(tmp_path):
    config = make_config(tmp_path, [daily(cron='*/10 * * * *', catch_up='latest')], poll='60s')
    launcher = FakeLauncher(config.ledger)
    clock = sched.FakeClock(utc(2026, 6, 10, 8, 0, 30))
    sched.Scheduler(config, clock=clock, launcher=launcher, out=io.StringIO()).serve(ticks=31)
    assert clock.now() == utc(2026, 6, 10, 8, 31, 30)
    assert started_keys(launcher) == [f'nightly:2026-06-10T10:{m:02d}' for m in (0, 10, 20, 30)]


# ------------------------------------------------------------------------------------------------
# Maintenance windows


COMPANIES = {
    'acme': {'timezone': 'Europe/Paris', 'allowed_hours': {'mon-fri': ['20:00-06:00']}, 'public_holidays': 'FR',
             'action': 'defer'},
    'strict': {'timezone': 'Europe/Paris', 'forbidden_dates': [{'date': '2026-12-24', 'reason': 'freeze'}],
               'action': 'refuse'},
}


def test_a_run_due_outside_its_window_is_deferred_to_the_next_window_and_audited_once(tmp_path):
    config = make_config(tmp_path, [daily(cron='0 12 * * *', company='acme')], companies=COMPANIES)
    launcher = FakeLauncher(config.ledger)
    key = 'nightly:2026-07-13T12:00'        # Monday noon; Tuesday 14 July is a public holiday
    s = scheduler(config, launcher, utc(2026, 7, 13, 10, 0))
    for minutes in (0, 30, 60):
        decisions = s.tick(utc(2026, 7, 13, 10, 0) + datetime.timedelta(minutes=minutes))
    assert launcher.started == []
    (deferred,) = [d for d in decisions if d.status == sched.DEFERRED]
    assert deferred.run_key == key and deferred.when == utc(2026, 7, 13, 18, 0)       # 20:00 Paris
    assert '12:00 on mon 2026-07-13 is outside the allowed hours (20:00-24:00)' in deferred.message
    assert 'may run from 2026-07-13T20:00+02:00 (Europe/Paris)' in deferred.message
    records = audit.AuditTrail(config.ledger).list_for_run_key(key)
    assert [r.action for r in records] == [sched.SCHEDULE_DEFERRED]
    assert records[0].record_refs['next_allowed'] == '2026-07-13T18:00:00+00:00'
    s.tick(utc(2026, 7, 13, 18, 0))
    assert started_keys(launcher) == [key]
    # The Tuesday occurrence falls on 14 July (holiday, no hours after 06:00): deferred to Wednesday 20:00.
    decisions = s.evaluate(utc(2026, 7, 14, 12, 0))
    # (Tuesday's 20:00-06:00 interval is not Tuesday's to give: its Wednesday part opens at midnight.)
    assert decisions[-1].status == sched.DEFERRED and decisions[-1].when == utc(2026, 7, 14, 22, 0)
    assert 'public holiday 2026-07-14' in decisions[-1].message
    assert 'may run from 2026-07-15T00:00+02:00' in decisions[-1].message


def test_a_run_due_on_a_refused_date_is_refused_unless_forced_and_both_are_audited(tmp_path):
    config = make_config(tmp_path, [daily(cron='0 9 * * *', company='strict')], companies=COMPANIES)
    launcher = FakeLauncher(config.ledger)
    key = 'nightly:2026-12-24T09:00'
    decisions = scheduler(config, launcher, utc(2026, 12, 24, 8, 0)).tick()
    assert launcher.started == [] and decisions[-1].status == sched.REFUSED
    assert 'forbidden date 2026-12-24: freeze' in decisions[-1].message and '--force' in decisions[-1].message
    assert 'may run from 2026-12-25T00:00+01:00' in decisions[-1].message
    scheduler(config, launcher, utc(2026, 12, 24, 8, 5)).tick()     # not audited twice
    scheduler(config, launcher, utc(2026, 12, 24, 8, 10), force=True).once()
    assert started_keys(launcher) == [key]
    actions = [r.action for r in audit.AuditTrail(config.ledger).list_for_run_key(key)]
    assert actions == [audit.WINDOW_REFUSED, audit.WINDOW_OVERRIDDEN, sched.SCHEDULE_LAUNCHED]


# ------------------------------------------------------------------------------------------------
# hrbatch run, started by hand, is guarded by the same windows


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp('data')
    generate.generate(str(directory), candidates=60, offers=4, seed=3)
    return directory


def test_a_hand_started_run_outside_its_window_is_refused_with_the_rule_and_the_next_time(tmp_path, data, capsys,
                                                                                          monkeypatch):
    windows = tmp_path / 'schedules.yaml'
    windows.write_text(yaml.safe_dump({'companies': {'acme': {'forbidden_dates': [
        {'from': '2000-01-01', 'to': '2100-01-01', 'reason': 'test freeze'}]}}}))
    monkeypatch.delenv('HRBATCH_WINDOWS', raising=False)
    argv = ['run', 'matching', '--candidates', str(data / 'candidates.parquet'), '--offers',
            str(data / 'offers.parquet'), '--output', str(tmp_path / 'out'), '--run_key', 'matching:hand',
            '--windows', str(windows), '--company', 'acme', '--top_k', '2']
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert 'matching matching:hand refused: outside the maintenance windows of company acme' in error
    assert 'test freeze' in error and 'may run from never' in error and '--force' in error
    url = f'sqlite:///{tmp_path}/out/hrbatch.db'
    assert [r.action for r in audit.AuditTrail(url).list()] == [audit.WINDOW_REFUSED]
    assert ledger.RunLedger(url).list() == []               # refused before the ledger


def test_force_overrides_the_window_of_a_hand_started_run_and_is_audited(tmp_path):
    windows = tmp_path / 'schedules.yaml'
    windows.write_text(yaml.safe_dump({'companies': {'acme': {'allowed_hours': {'sat': ['10:00-11:00']}}}}))
    url = f'sqlite:///{tmp_path}/hrbatch.db'

    class Spec:
        ledger_url, run_key, run_id, operator = url, 'payroll:2026-11', 'payroll-1', 'alice'

    values = {'windows': str(windows), 'company': 'acme', 'force': False}
    monday = utc(2026, 11, 30, 9, 0)
    with pytest.raises(sched.WindowRefusedError, match='may run from 2026-12-05T10:00\\+01:00'):
        sched.guard_run('payroll', values, Spec, now=monday)
    sched.guard_run('payroll', {**values, 'force': True}, Spec, now=monday)
    sched.guard_run('payroll', values, Spec, now=utc(2026, 12, 5, 9, 30))      # inside: nothing recorded
    records = audit.AuditTrail(url).list()
    assert [r.action for r in records] == [audit.WINDOW_REFUSED, audit.WINDOW_OVERRIDDEN]
    assert records[1].record_refs['by'] == '--force' and records[1].operator == 'alice'
    with pytest.raises(ConfigError, match='--windows and --company go together'):
        sched.guard_run('payroll', {'windows': str(windows), 'company': None}, Spec, now=monday)


# ------------------------------------------------------------------------------------------------
# A real launch, and the command line


def test_a_real_subprocess_run_through_once_at(tmp_path, data):
    config_path = tmp_path / 'schedules.yaml'
    config_path.write_text(yaml.safe_dump({
        'ledger': f'sqlite:///{tmp_path}/hrbatch.db',
        'schedules': [{'name': 'match', 'pipeline': 'matching', 'cron': '0 6 * * *', 'timezone': 'Europe/Paris',
                       'args': {'candidates': str(data / 'candidates.parquet'), 'offers': str(data / 'offers.parquet'),
                                'output': str(tmp_path / 'out-{scheduled_date}'), 'top_k': 2}}]}))
    out = io.StringIO()
    assert sched.main(['--config', str(config_path), '--once', '--at', '2026-06-10T06:00:00+02:00'], out=out) == 0
    assert 'started' in out.getvalue()
    (run,) = ledger.RunLedger(f'sqlite:///{tmp_path}/hrbatch.db').list()
    assert run.run_key == 'match:2026-06-10T06:00' and run.state == 'succeeded'
    assert run.counts['pairs_scored'] == 60 * 4 and run.operator == 'hrbatch-scheduler'
    assert run.parameters['output'] == str(tmp_path / 'out-2026-06-10')
    out = io.StringIO()
    assert sched.main(['--config', str(config_path), '--once', '--at', '2026-06-10T06:05:00+02:00'], out=out) == 0
    assert out.getvalue().startswith('done ')


def test_cli_dry_run_exec_print_and_errors(tmp_path, capsys):
    config_path = tmp_path / 'schedules.yaml'
    config_path.write_text(yaml.safe_dump({'ledger': f'sqlite:///{tmp_path}/hrbatch.db', 'companies': COMPANIES,
                                           'schedules': [daily(company='acme', args={'period': '{previous_month}'},
                                                               pipeline='payroll')]}))
    assert cli.main(['schedule', '--config', str(config_path), '--once', '--at', '2026-06-10T00:31:00Z',
                     '--dry_run']) == 0
    assert 'due           nightly:2026-06-10T02:30' in capsys.readouterr().out
    assert cli.main(['schedule', 'exec', '--config', str(config_path), '--schedule', 'nightly',
                     '--at', '2026-06-01T01:00:00Z', '--print']) == 0
    printed = capsys.readouterr().out
    assert 'hrbatch run payroll --period=2026-05 --run_key nightly:2026-06-01T02:30' in printed
    assert f'--windows {config_path} --company acme' in printed
    assert cli.main(['schedule', '--config', str(config_path), '--at', '2026-06-10T00:31:00']) == 2
    assert '--at' in capsys.readouterr().err


@pytest.mark.parametrize('change, message', [
    ({'cron': '0 2 * *'}, 'expected five fields'),
    ({'cron': '0 2 * * * 5'}, 'expected five fields'),
    ({'timezone': 'Paris'}, 'not a known IANA time zone'),
    ({'pipeline': 'nope'}, "pipeline='nope'"),
    ({'priority': 'urgent'}, 'critical, default, low'),
    ({'catch_up': 'some'}, 'latest, all, none'),
    ({'name': 'Bad_Name'}, 'lower-case letters'),
    ({'args': {'run_key': 'x'}}, 'must not set --run_key'),
    ({'args': {'period': '{month}'}}, 'bad placeholder'),
    ({'runner': 'spark'}, "runner='spark'"),
    ({'company': 'unknown'}, "company 'unknown'"),
    ({'backoff': {'jitter': 2}}, 'jitter'),
])
def test_bad_schedules_are_refused_at_load(tmp_path, change, message):
    with pytest.raises(ConfigError) as error:
        make_config(tmp_path, [{**daily(), **change}], companies=COMPANIES)
    assert message in str(error.value)


def test_the_example_configuration_loads():
    config = sched.load_config('pipelines/schedules.example.yaml')
    assert {s.name for s in config.schedules} == {'payroll-acme', 'matching-nightly'}
    assert config.schedule('payroll-acme').render_args(datetime.datetime(2026, 11, 25, 22, 0))[0] == '--period=2026-11'

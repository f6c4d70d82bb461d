"""Maintenance windows, blackout dates, French public holidays and the DST rule of local times."""
import datetime
import zoneinfo

import pytest

from transforms import windows as win
from transforms.errors import ConfigError

PARIS = zoneinfo.ZoneInfo('Europe/Paris')
UTC = datetime.timezone.utc


def utc(*args):
    return datetime.datetime(*args, tzinfo=UTC)


def paris(*args):
    return win.resolve_local(datetime.datetime(*args), PARIS)


def calendar(**config):
    return win.CompanyCalendar.from_config('acme', {'timezone': 'Europe/Paris', **config})


def test_a_local_time_in_the_spring_gap_resolves_to_the_first_instant_after_it():
    # 2026-03-29, Europe/Paris: 02:00 CET jumps to 03:00 CEST (01:00 UTC); 02:30 does not exist.
    assert not win.exists_locally(datetime.datetime(2026, 3, 29, 2, 30), PARIS)
    assert paris(2026, 3, 29, 2, 30) == utc(2026, 3, 29, 1, 0)
    assert paris(2026, 3, 29, 2, 0) == utc(2026, 3, 29, 1, 0)
    assert paris(2026, 3, 29, 3, 0) == utc(2026, 3, 29, 1, 0)   # the gap's end itself
    assert paris(2026, 3, 29, 1, 59) == utc(2026, 3, 29, 0, 59)


def test_an_ambiguous_local_time_resolves_to_its_first_occurrence():
    # 2026-10-25, Europe/Paris: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    assert win.is_ambiguous(datetime.datetime(2026, 10, 25, 2, 30), PARIS)
    assert paris(2026, 10, 25, 2, 30) == utc(2026, 10, 25, 0, 30)   # CEST, fold=0
    assert paris(2026, 10, 25, 3, 30) == utc(2026, 10, 25, 2, 30)   # CET
    assert not win.is_ambiguous(datetime.datetime(2026, 10, 25, 3, 30), PARIS)


def test_allowed_hours_cross_midnight_and_unlisted_days_allow_nothing():
    cal = calendar(allowed_hours={'mon-fri': ['20:00-06:00']})
    assert cal.is_allowed(paris(2026, 12, 1, 21, 0))          # Tuesday evening
    assert cal.is_allowed(paris(2026, 12, 2, 5, 59))          # Wednesday, before 06:00
    decision = cal.check(paris(2026, 12, 2, 12, 0))
    assert not decision.allowed and 'outside the allowed hours (00:00-06:00, 20:00-24:00)' in decision.rule
    assert decision.next_allowed == paris(2026, 12, 2, 20, 0)
    # Friday 20:00 runs into Saturday 06:00; Saturday itself allows nothing after that.
    assert cal.is_allowed(paris(2026, 12, 5, 3, 0))
    saturday = cal.check(paris(2026, 12, 5, 12, 0))
    assert not saturday.allowed and saturday.next_allowed == paris(2026, 12, 7, 20, 0)   # Monday evening
    sunday = cal.check(paris(2026, 12, 6, 12, 0))
    assert sunday.rule == 'no allowed hours on sun'
    assert 'may run from 2026-12-07T20:00+01:00 (Europe/Paris)' in sunday.message()


def test_forbidden_dates_and_ranges_name_their_reason():
    cal = calendar(forbidden_dates=['2026-12-24', {'from': '2026-12-30', 'to': '2027-01-02', 'reason': 'closing'}])
    decision = cal.check(paris(2026, 12, 24, 10, 0))
    assert not decision.allowed and decision.rule == 'forbidden date 2026-12-24'
    assert decision.next_allowed == paris(2026, 12, 25, 0, 0)
    closing = cal.check(paris(2026, 12, 31, 10, 0))
    assert closing.rule == 'forbidden date 2026-12-31 (in 2026-12-30..2027-01-02): closing'
    assert closing.next_allowed == paris(2027, 1, 3, 0, 0)


def test_french_public_holidays_and_alsace_moselle():
    national = calendar(public_holidays='FR')
    bastille = national.check(paris(2026, 7, 14, 10, 0))
    assert not bastille.allowed and bastille.rule.startswith('public holiday 2026-07-14') and 'FR' in bastille.rule
    assert national.is_allowed(paris(2026, 4, 3, 10, 0))      # Good Friday: not a holiday in most of France
    moselle = calendar(public_holidays={'country': 'FR', 'subdivision': '57'})
    good_friday = moselle.check(paris(2026, 4, 3, 10, 0))
    assert not good_friday.allowed and 'FR-57' in good_friday.rule
    # Christmas and St Stephen's day in a row: the next allowed time is the 27th.
    assert moselle.check(paris(2026, 12, 25, 10, 0)).next_allowed == paris(2026, 12, 27, 0, 0)


def test_a_window_opening_in_the_dst_gap_opens_after_it():
    cal = calendar(allowed_hours={'sun': ['02:30-05:00']})
    decision = cal.check(paris(2026, 3, 29, 0, 30))
    assert decision.next_allowed == utc(2026, 3, 29, 1, 0)   # 03:00 CEST, the first instant after the gap


def test_next_allowed_of_an_allowed_instant_is_itself_and_a_closed_calendar_is_never():
    cal = calendar()
    moment = utc(2026, 5, 5, 10, 0)
    assert cal.check(moment).allowed and cal.next_allowed(moment) == moment
    closed = calendar(allowed_hours={'mon': ['10:00-11:00']}, forbidden_dates=[{'from': '2026-01-01', 'to': '2028-01-01'}])
    decision = closed.check(utc(2026, 5, 5, 10, 0))
    assert decision.next_allowed is None and 'never' in decision.message()


@pytest.mark.parametrize('config, message', [
    ({'allowed_hours': {'mon': ['25:00-26:00']}}, 'hours are 00:00 to 24:00'),
    ({'allowed_hours': {'someday': ['10:00-11:00']}}, 'use mon..sun'),
    ({'allowed_hours': {'mon': ['10:00-10:00']}}, 'is empty'),
    ({'allowed_hours': {'mon': ['10h-11h']}}, 'expected HH:MM-HH:MM'),
    ({'forbidden_dates': ['2026-02-31']}, 'expected YYYY-MM-DD'),
    ({'public_holidays': 'XX'}, 'not known to the holidays package'),
    ({'public_holidays': {'country': 'FR', 'subdivision': '99'}}, 'public_holidays'),
    ({'action': 'skip'}, 'must be defer or refuse'),
    ({'timezone': 'Europe/Pariss'}, 'not a known IANA time zone'),
    ({'hours': {}}, 'unknown key(s) hours'),
])
def test_bad_configuration_is_refused_naming_the_company_and_value(config, message):
    with pytest.raises(ConfigError, match='acme') as error:
        win.CompanyCalendar.from_config('acme', config)
    assert message in str(error.value)


def test_windows_of_an_unknown_company_are_refused():
    windows = win.Windows({'acme': {}})
    with pytest.raises(ConfigError, match="company 'other' has no maintenance windows in the configuration; companies: acme"):
        windows.check('other', utc(2026, 1, 1))


def test_load_windows_reads_the_companies_of_a_schedules_file(tmp_path):
    path = tmp_path / 'schedules.yaml'
    path.write_text('companies:\n  acme:\n    public_holidays: FR\n    action: refuse\n')
    windows = win.load_windows(str(path))
    assert windows.calendar('acme').action == 'refuse'
    (tmp_path / 'bad.yaml').write_text('schedules: []\n')
    with pytest.raises(ConfigError, match='companies: section'):
        win.load_windows(str(tmp_path / 'bad.yaml'))

"""Maintenance windows and blackout calendars: when a company allows its batch jobs to run.

No law defines maintenance windows for batch jobs (DOMAIN.md): they are the organisation's own
agreements (with the works council, in the collective agreement, with the payroll provider), so they
are configuration, one entry per company::

    companies:
      acme:
        timezone: Europe/Paris
        allowed_hours:                    # local wall-clock times; a weekday not listed allows nothing
          mon-fri: ['20:00-06:00']        # an interval may cross midnight: Fri 20:00 to Sat 06:00
          sat-sun: ['00:00-24:00']
        forbidden_dates:                  # whole local days, a date or a range, with an optional reason
          - 2026-12-24
          - {from: 2026-08-01, to: 2026-08-15, reason: summer freeze}
        public_holidays: FR               # or {country: FR, subdivision: '57'} (Alsace-Moselle)
        action: defer                     # defer (run at the next allowed instant) or refuse

Rules, in the order a decision names them: a local date that is forbidden (``forbidden_dates``) or a
public holiday (the ``holidays`` package, ``subdivision`` optional) allows nothing that day; otherwise an
instant is allowed when its local wall-clock time falls in one of the day's intervals (``HH:MM-HH:MM``,
end excluded, ``24:00`` allowed as an end; an interval whose end is before its start runs past midnight
into the next day, which must itself not be forbidden). Without ``allowed_hours`` every hour is allowed.

``Windows.check(company, moment)`` returns a ``WindowDecision``: allowed or not, the rule that
forbids, and the next allowed instant (``next_allowed``), so a refusal can say when the job may run.
Local times that do not exist (the spring-forward gap) are never inside a window; a window that starts
inside the gap opens at the first instant after it.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import re
import typing
import zoneinfo

import holidays

from transforms.errors import ConfigError

DEFER, REFUSE = 'defer', 'refuse'
ACTIONS = (DEFER, REFUSE)
_DAYS = ('mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun')
_DAY_ALIASES = {'weekdays': 'mon-fri', 'weekend': 'sat-sun', '*': 'mon-sun', 'daily': 'mon-sun'}
_INTERVAL = re.compile(r'^\s*([0-2]?[0-9]):([0-5][0-9])\s*-\s*([0-2]?[0-9]):([0-5][0-9])\s*$')
# How far ahead next_allowed looks before it declares a calendar closed for good.
MAX_SEARCH_DAYS = 400
_COMPANY_KEYS = {'timezone', 'allowed_hours', 'forbidden_dates', 'public_holidays', 'action'}


# ------------------------------------------------------------------------------------------------
# Local wall-clock time <-> instants


def resolve_local(wall: datetime.datetime, tz: zoneinfo.ZoneInfo) -> datetime.datetime:
    """The instant of the naive local wall-clock time ``wall`` in ``tz``, by the project's DST rule:

    * a time that exists once is that instant;
    * an ambiguous time (the autumn fall-back hour, which happens twice) is its first occurrence
      (``fold=0``, summer time);
    * a time that does not exist (the spring-forward gap) is the first instant after the gap (for
      02:30 on 2026-03-29 in Europe/Paris: 03:00 CEST, 01:00 UTC).
    """
    if wall.tzinfo is not None:
        raise ValueError(f'wall={wall!r} is not allowed: give a naive local wall-clock time')
    first = wall.replace(tzinfo=tz, fold=0).astimezone(datetime.timezone.utc)
    if _wall(first, tz) == wall:
        return first
    # Nonexistent. Read with the offset before the gap (fold=0) it lands past the gap, and no gap is
    # longer than 3 hours: find the transition, the first whole second whose wall time is later.
    high = int(first.timestamp())
    low = high - 3 * 3600
    while high - low > 1:
        mid = (low + high) // 2
        if _wall(datetime.datetime.fromtimestamp(mid, datetime.timezone.utc), tz) > wall:
            high = mid
        else:
            low = mid
    return datetime.datetime.fromtimestamp(high, datetime.timezone.utc)


def _wall(moment: datetime.datetime, tz: zoneinfo.ZoneInfo) -> datetime.datetime:
    return moment.astimezone(tz).replace(tzinfo=None, fold=0)


def exists_locally(wall: datetime.datetime, tz: zoneinfo.ZoneInfo) -> bool:
    return _wall(wall.replace(tzinfo=tz).astimezone(datetime.timezone.utc), tz) == wall


def is_ambiguous(wall: datetime.datetime, tz: zoneinfo.ZoneInfo) -> bool:
    return wall.replace(tzinfo=tz, fold=0).utcoffset() != wall.replace(tzinfo=tz, fold=1).utcoffset() \
        and exists_locally(wall, tz)


def timezone(name: str, *, where: str) -> zoneinfo.ZoneInfo:
    if not isinstance(name, str) or not name:
        raise ConfigError(f'{where}: timezone={name!r}: give an IANA time zone such as Europe/Paris')
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f'{where}: timezone={name!r} is not a known IANA time zone (e.g. Europe/Paris)') from None


# ------------------------------------------------------------------------------------------------
# The calendar of one company


@dataclasses.dataclass(frozen=True)
class WindowDecision:
    """Whether ``moment`` is inside the company's windows; if not, the ``rule`` that forbids it and
    the ``next_allowed`` instant (None if nothing is allowed within ``MAX_SEARCH_DAYS``)."""
    company: str
    moment: datetime.datetime
    allowed: bool
    action: str
    rule: str | None = None
    next_allowed: datetime.datetime | None = None
    timezone: str = 'UTC'

    def local(self, moment: datetime.datetime | None) -> str:
        if moment is None:
            return 'never (no allowed time in the next 400 days)'
        return moment.astimezone(zoneinfo.ZoneInfo(self.timezone)).isoformat(timespec='minutes') + f' ({self.timezone})'

    def message(self) -> str:
        if self.allowed:
            return f'inside the maintenance windows of company {self.company}'
        return (f'outside the maintenance windows of company {self.company} at {self.local(self.moment)}: '
                f'{self.rule}; may run from {self.local(self.next_allowed)}')

    def refs(self) -> dict:
        """For an audit record (no personal data: a company name, rules, times)."""
        return {'company': self.company, 'rule': self.rule, 'action': self.action,
                'at': self.moment.astimezone(datetime.timezone.utc).isoformat(),
                'next_allowed': None if self.next_allowed is None else
                self.next_allowed.astimezone(datetime.timezone.utc).isoformat()}


@functools.lru_cache(maxsize=64)
def _holidays(country: str, subdivision: str | None, year: int):
    return holidays.country_holidays(country, subdiv=subdivision, years=year)


def _parse_days(spec: str, *, where: str) -> list[int]:
    text = _DAY_ALIASES.get(str(spec).strip().lower(), str(spec).strip().lower())
    days = []
    for part in text.split(','):
        part = part.strip()
        if '-' in part:
            first, _, last = part.partition('-')
            if first not in _DAYS or last not in _DAYS:
                raise ConfigError(f'{where}: day range {spec!r}: use mon..sun, e.g. mon-fri')
            a, b = _DAYS.index(first), _DAYS.index(last)
            days.extend(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
        elif part in _DAYS:
            days.append(_DAYS.index(part))
        else:
            raise ConfigError(f'{where}: day {spec!r}: use mon..sun, a range such as mon-fri, weekdays, '
                              'weekend or *')
    return days


def _parse_interval(text, *, where: str) -> tuple[int, int]:
    """Minutes since midnight (start, end); end > 1440 for an interval that crosses midnight."""
    match = _INTERVAL.match(str(text))
    if not match:
        raise ConfigError(f'{where}: interval {text!r}: expected HH:MM-HH:MM, e.g. 20:00-06:00')
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start >= 1440 or end > 1440:
        raise ConfigError(f'{where}: interval {text!r}: hours are 00:00 to 24:00')
    if start == end:
        raise ConfigError(f'{where}: interval {text!r} is empty; 00:00-24:00 is the whole day')
    return (start, end) if end > start else (start, end + 1440)


def _parse_date(value, *, where: str) -> datetime.date:
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    try:
        return datetime.date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f'{where}: date {value!r}: expected YYYY-MM-DD') from None


@dataclasses.dataclass(frozen=True)
class CompanyCalendar:
    """The windows of one company (see the module docstring for the configuration)."""
    company: str
    tz: zoneinfo.ZoneInfo
    # Per weekday (0 = Monday): intervals in minutes since that day's midnight, end may pass 1440.
    hours: tuple[tuple[tuple[int, int], ...], ...] | None
    forbidden: tuple[tuple[datetime.date, datetime.date, str], ...]
    holiday_country: str | None
    holiday_subdivision: str | None
    action: str

    @classmethod
    def from_config(cls, company: str, config: typing.Mapping) -> CompanyCalendar:
        where = f'windows of company {company!r}'
        if not isinstance(config, typing.Mapping):
            raise ConfigError(f'{where}: expected a mapping with {", ".join(sorted(_COMPANY_KEYS))}')
        unknown = sorted(set(config) - _COMPANY_KEYS)
        if unknown:
            raise ConfigError(f'{where}: unknown key(s) {", ".join(unknown)}; allowed: {", ".join(sorted(_COMPANY_KEYS))}')
        tz = timezone(config.get('timezone', 'Europe/Paris'), where=where)
        hours = None
        if config.get('allowed_hours') is not None:
            table: list[list[tuple[int, int]]] = [[] for _ in _DAYS]
            if not isinstance(config['allowed_hours'], typing.Mapping):
                raise ConfigError(f'{where}: allowed_hours must map days (mon-fri, sat, ...) to lists of HH:MM-HH:MM')
            for days, intervals in config['allowed_hours'].items():
                if isinstance(intervals, str):
                    intervals = [intervals]
                for day in _parse_days(days, where=where):
                    table[day].extend(_parse_interval(i, where=f'{where}, allowed_hours {days}') for i in intervals or ())
            hours = tuple(tuple(sorted(day)) for day in table)
        forbidden = []
        for entry in config.get('forbidden_dates') or ():
            reason = ''
            if isinstance(entry, typing.Mapping):
                reason = str(entry.get('reason') or '')
                if 'date' in entry:
                    first = last = _parse_date(entry['date'], where=where)
                elif 'from' in entry and 'to' in entry:
                    first, last = _parse_date(entry['from'], where=where), _parse_date(entry['to'], where=where)
                else:
                    raise ConfigError(f'{where}: forbidden date {dict(entry)!r}: give date, or from and to')
            else:
                text = str(entry)
                if '..' in text:
                    a, _, b = text.partition('..')
                    first, last = _parse_date(a.strip(), where=where), _parse_date(b.strip(), where=where)
                else:
                    first = last = _parse_date(entry, where=where)
            if last < first:
                raise ConfigError(f'{where}: forbidden dates {first}..{last}: the end is before the start')
            forbidden.append((first, last, reason))
        country = subdivision = None
        spec = config.get('public_holidays')
        if spec:
            if isinstance(spec, typing.Mapping):
                country, subdivision = spec.get('country'), spec.get('subdivision')
                subdivision = None if subdivision is None else str(subdivision)
            else:
                country = str(spec)
            try:
                holidays.country_holidays(country, subdiv=subdivision, years=2026)
            except NotImplementedError:
                raise ConfigError(f'{where}: public_holidays country {country!r} is not known to the holidays '
                                  'package (use an ISO code such as FR)') from None
            except ValueError as error:  # unknown subdivision
                raise ConfigError(f'{where}: public_holidays {spec!r}: {error}') from None
        action = config.get('action', DEFER)
        if action not in ACTIONS:
            raise ConfigError(f'{where}: action={action!r}: must be defer or refuse')
        return cls(company=company, tz=tz, hours=hours, forbidden=tuple(forbidden), holiday_country=country,
                   holiday_subdivision=subdivision, action=action)

    # -- rules ------------------------------------------------------------------------------------

    def day_closed(self, day: datetime.date) -> str | None:
        """Why the whole local ``day`` is forbidden, or None."""
        for first, last, reason in self.forbidden:
            if first <= day <= last:
                span = str(day) if first == last else f'{day} (in {first}..{last})'
                return f'forbidden date {span}' + (f': {reason}' if reason else '')
        if self.holiday_country:
            names = _holidays(self.holiday_country, self.holiday_subdivision, day.year)
            if day in names:
                where = self.holiday_country + (f'-{self.holiday_subdivision}' if self.holiday_subdivision else '')
                return f'public holiday {day} ({names.get(day)}, {where})'
        return None

    def _segments(self, day: datetime.date) -> list[tuple[datetime.datetime, datetime.datetime]]:
        """The allowed wall-clock segments of the local ``day`` (naive, sorted, merged), [start, end)."""
        midnight = datetime.datetime.combine(day, datetime.time())
        if self.hours is None:
            raw = [(0, 1440)]
        else:
            raw = []
            for start, end in self.hours[day.weekday()]:
                raw.append((start, min(end, 1440)))
            for start, end in self.hours[(day.weekday() - 1) % 7]:
                if end > 1440:  # yesterday's interval running past midnight
                    raw.append((0, end - 1440))
        merged: list[list[int]] = []
        for start, end in sorted(raw):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return [(midnight + datetime.timedelta(minutes=s), midnight + datetime.timedelta(minutes=e))
                for s, e in merged]

    def check(self, moment: datetime.datetime) -> WindowDecision:
        """Whether the instant ``moment`` (timezone-aware) is inside the windows, and if not why and when."""
        if moment.tzinfo is None:
            raise ValueError(f'moment={moment!r} is not allowed: it must be timezone-aware')
        wall = _wall(moment, self.tz)
        common = dict(company=self.company, moment=moment, action=self.action, timezone=self.tz.key)
        closed = self.day_closed(wall.date())
        if closed is None:
            if any(start <= wall < end for start, end in self._segments(wall.date())):
                return WindowDecision(allowed=True, **common)
            if self.hours is not None and not self._segments(wall.date()):
                rule = f'no allowed hours on {_DAYS[wall.weekday()]}'
            else:
                listed = ', '.join(f'{s:%H:%M}-{"24:00" if e.date() > s.date() else f"{e:%H:%M}"}'
                                   for s, e in self._segments(wall.date()))
                rule = f'{wall:%H:%M} on {_DAYS[wall.weekday()]} {wall.date()} is outside the allowed hours ({listed})'
        else:
            rule = closed
        return WindowDecision(allowed=False, rule=rule, next_allowed=self.next_allowed(moment), **common)

    def next_allowed(self, moment: datetime.datetime) -> datetime.datetime | None:
        """The first allowed instant at or after ``moment`` (UTC), or None within ``MAX_SEARCH_DAYS``."""
        moment = moment.astimezone(datetime.timezone.utc)
        wall = _wall(moment, self.tz)
        for offset in range(MAX_SEARCH_DAYS + 1):
            day = wall.date() + datetime.timedelta(days=offset)
            if self.day_closed(day):
                continue
            for start, end in self._segments(day):
                if end <= wall:
                    continue
                if start <= wall:
                    return moment
                instant = resolve_local(start, self.tz)
                if instant >= moment and _wall(instant, self.tz) < end:
                    return instant
        return None

    def is_allowed(self, moment: datetime.datetime) -> bool:
        return self.check(moment).allowed


class Windows:
    """The calendars of every company of a configuration (its ``companies`` mapping)."""

    def __init__(self, companies: typing.Mapping[str, typing.Mapping] | None):
        if companies is not None and not isinstance(companies, typing.Mapping):
            raise ConfigError('companies: expected a mapping of company name to its windows')
        self.calendars = {str(name): CompanyCalendar.from_config(str(name), config or {})
                          for name, config in (companies or {}).items()}

    def calendar(self, company: str) -> CompanyCalendar:
        if company not in self.calendars:
            raise ConfigError(f'company {company!r} has no maintenance windows in the configuration; '
                              f'companies: {", ".join(sorted(self.calendars)) or "none"}')
        return self.calendars[company]

    def check(self, company: str, moment: datetime.datetime) -> WindowDecision:
        return self.calendar(company).check(moment)


def load_windows(path: str) -> Windows:
    """The ``companies`` of a YAML or JSON file (local or gs://, e.g. the schedules file)."""
    import yaml
    from apache_beam.io.filesystems import FileSystems
    try:
        with FileSystems.open(path) as handle:
            document = yaml.safe_load(handle.read().decode('utf-8'))
    except (OSError, IOError) as error:
        raise ConfigError(f'--windows={path!r}: cannot read it ({error})') from None
    except yaml.YAMLError as error:
        raise ConfigError(f'--windows={path!r}: not valid YAML ({error})') from None
    if not isinstance(document, typing.Mapping) or 'companies' not in document:
        raise ConfigError(f'--windows={path!r}: expected a mapping with a companies: section')
    return Windows(document['companies'])

"""The DSN file format (norm NEODeS): rendering, parsing and checking, as pure functions.

A DSN file is text in ISO-8859-1, one rubric a line, ``Sxx.Gyy.zz.aaa,'value'``, at most 256
characters a line (lines end with LF; the norm accepts LF or CR LF). A block is a run of rubrics
of one ``Sxx.Gyy.zz`` group, in increasing rubric number; a new occurrence of a block starts when
its group comes again or its numbers stop increasing. Blocks nest as ``TREE`` says.

What is checked here (``check``) and what is not:

- the block tree: every block under its parent, children in the declared order, cardinalities;
- the mandatory rubrics of a monthly declaration (DOMAIN.md, CT2025.1.3 usage table) in each block;
- every rubric's value against ``FORMATS`` (an unknown rubric is a problem: nothing stray is written);
- the line length and the S90 totals (.001 = every line of the file, S90 included; .002 = number of
  S20 declarations).

It is not the official control suite (CCH/CSL/CRE inter-rubric rules, nomenclature tables):
``dsn-val`` or net-entreprises' own test upload remains the reference before a real submission.

Formats (DOMAIN.md): dates ``DDMMYYYY``; S20.G00.05.005 (the month declared) ``01MMYYYY``; amounts
with a dot and exactly two decimals (``-?[0]*(0|[1-9][0-9]*)\\.[0-9]{2}``); the Urssaf bordereau
total S21.G00.22.005 rounded to the euro (still written with ``.00``).

Due dates (``due_date``): the 5th of month M+1 for a company of 50 employees or more paying within
the month, else the 15th; a due date on a Saturday, Sunday or French public holiday
(``holidays.France``) moves to the next working day (CSS R133-14; net-entreprises calendar).
"""
import calendar
import dataclasses
import datetime
import re
import unicodedata

import holidays

from transforms.errors import HrbatchError

ENCODING = 'iso-8859-1'
MAX_LINE = 256
NEWLINE = '\n'
_LINE_RE = re.compile(r"^(S\d{2}\.G\d{2}\.\d{2}\.\d{3}),'(.*)'$")
_PERIOD_RE = re.compile(r'^(\d{4})-(0[1-9]|1[0-2])$')


class DsnFormatError(HrbatchError):
    """A DSN file (or a value to put in one) does not follow the format."""


# ------------------------------------------------------------------------------------------------
# Values

_REPLACEMENTS = {'œ': 'oe', 'Œ': 'OE', 'ł': 'l', 'Ł': 'L', '’': "'", '‘': "'", '–': '-', '—': '-', '€': 'EUR'}


def text(value, max_length: int) -> str:
    """``value`` as a DSN text value: ISO-8859-1 characters only (others transliterated, accents kept
    where ISO-8859-1 has them), no control characters, spaces collapsed, at most ``max_length``."""
    value = ''.join(_REPLACEMENTS.get(c, c) for c in str(value))
    kept = []
    for char in value:
        if char in '\r\n\t':
            char = ' '
        try:
            char.encode(ENCODING)
        except UnicodeEncodeError:
            char = ''.join(c for c in unicodedata.normalize('NFKD', char) if not unicodedata.combining(c))
            char = char.encode(ENCODING, errors='ignore').decode(ENCODING)
        if char and all(unicodedata.category(c)[0] != 'C' for c in char):
            kept.append(char)
    return re.sub(' +', ' ', ''.join(kept)).strip()[:max_length]


def amount(cents: int) -> str:
    """Integer cents -> ``'1234.56'`` (dot, exactly two decimals, ``-`` for negatives)."""
    cents = int(cents)
    sign = '-' if cents < 0 else ''
    return f'{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}'


def euros_rounded(cents: int) -> int:
    """Cents rounded half away from zero to whole euros, in cents (the bordereau's rounding)."""
    cents = int(cents)
    sign = -1 if cents < 0 else 1
    return sign * ((abs(cents) + 50) // 100) * 100


def date(day: datetime.date) -> str:
    return day.strftime('%d%m%Y')


def month_start(period: str) -> datetime.date:
    match = _PERIOD_RE.match(period or '')
    if not match:
        raise DsnFormatError(f'period {period!r}: must be a month YYYY-MM')
    return datetime.date(int(match.group(1)), int(match.group(2)), 1)


def month_end(period: str) -> datetime.date:
    start = month_start(period)
    return start.replace(day=calendar.monthrange(start.year, start.month)[1])


def declared_month(period: str) -> str:
    """S20.G00.05.005: ``01MMYYYY``."""
    return date(month_start(period))


def rate(percent: float) -> str:
    """A rate in percent with two decimals (S21.G00.50.006)."""
    return f'{round(float(percent) + 0.0, 2):.2f}'


def line(rubric: str, value: str) -> str:
    """One rubric line. Raises DsnFormatError for a bad rubric, a value that does not encode, or a line
    over 256 characters."""
    if not re.match(r'^S\d{2}\.G\d{2}\.\d{2}\.\d{3}$', rubric):
        raise DsnFormatError(f'rubric {rubric!r}: must be Sxx.Gyy.zz.aaa')
    rendered = f"{rubric},'{value}'"
    if len(rendered) > MAX_LINE:
        raise DsnFormatError(f'rubric {rubric}: line of {len(rendered)} characters, the most is {MAX_LINE}')
    if '\n' in value or '\r' in value:
        raise DsnFormatError(f'rubric {rubric}: a value cannot hold a line break')
    try:
        rendered.encode(ENCODING)
    except UnicodeEncodeError as err:
        raise DsnFormatError(f'rubric {rubric}: character {err.object[err.start]!r} is not ISO-8859-1') from None
    return rendered


def render(rubrics: list[tuple[str, str]]) -> bytes:
    """The file's bytes: one line per ``(rubric, value)``, LF-terminated, ISO-8859-1."""
    return ''.join(line(r, v) + NEWLINE for r, v in rubrics).encode(ENCODING)


def parse(data: bytes) -> list[tuple[str, str]]:
    """``(rubric, value)`` of every line of a DSN file. Raises DsnFormatError naming the first bad line."""
    try:
        content = data.decode(ENCODING)
    except UnicodeDecodeError as err:  # latin-1 decodes any byte; kept for other encodings' sake
        raise DsnFormatError(f'not {ENCODING}: {err}') from None
    result = []
    for number, raw in enumerate(content.splitlines(), start=1):
        if len(raw) > MAX_LINE:
            raise DsnFormatError(f'line {number}: {len(raw)} characters, the most is {MAX_LINE}')
        match = _LINE_RE.match(raw)
        if not match:
            raise DsnFormatError(f"line {number}: not Sxx.Gyy.zz.aaa,'value'")
        result.append((match.group(1), match.group(2)))
    return result


# ------------------------------------------------------------------------------------------------
# The tree, the mandatory rubrics, the value formats

@dataclasses.dataclass(frozen=True)
class Block:
    parent: str | None
    minimum: int
    maximum: int | None      # None: unbounded


# Monthly declaration (nature 01), as DOMAIN.md describes it; children in this order under a parent.
TREE = {
    'S10.G00.00': Block(None, 1, 1),
    'S10.G00.01': Block(None, 1, 1),
    'S10.G00.02': Block(None, 1, 1),
    'S20.G00.05': Block(None, 1, None),
    'S21.G00.06': Block('S20.G00.05', 1, 1),
    'S21.G00.11': Block('S21.G00.06', 1, 1),
    'S21.G00.22': Block('S21.G00.11', 0, None),
    'S21.G00.23': Block('S21.G00.22', 0, None),
    'S21.G00.30': Block('S21.G00.11', 0, None),
    'S21.G00.40': Block('S21.G00.30', 1, None),
    'S21.G00.71': Block('S21.G00.40', 1, None),
    'S21.G00.50': Block('S21.G00.30', 1, None),
    'S21.G00.51': Block('S21.G00.50', 1, None),
    'S21.G00.78': Block('S21.G00.50', 0, None),
    'S21.G00.79': Block('S21.G00.78', 0, None),
    'S21.G00.81': Block('S21.G00.78', 0, None),
    'S90.G00.90': Block(None, 1, 1),
}
_ORDER = {name: index for index, name in enumerate(TREE)}


def _numbers(spec: str) -> tuple[str, ...]:
    out = []
    for part in spec.split():
        if '-' in part:
            low, high = part.split('-')
            out += [f'{n:03d}' for n in range(int(low), int(high) + 1)]
        else:
            out.append(part)
    return tuple(out)


# DOMAIN.md, "Mandatory rubrics for a monthly declaration (CT2025.1.3 usage table)".
MANDATORY = {block: _numbers(spec) for block, spec in {
    'S10.G00.00': '001 002 005 006 007 008', 'S10.G00.01': '001 002 003', 'S10.G00.02': '001 002 004 005',
    'S20.G00.05': '001-005 007 008 010', 'S21.G00.06': '001 003', 'S21.G00.11': '001 002 022',
    'S21.G00.22': '001 003 004 005', 'S21.G00.23': '001 002', 'S21.G00.30': '002 004 006 013 014 015',
    'S21.G00.40': '001-004 006-009 011-014 016-020 024 026 036 037 039 040', 'S21.G00.71': '002',
    'S21.G00.50': '001 002 004 006 007 009 013', 'S21.G00.51': '001 002 010 011 013',
    'S21.G00.78': '001-004', 'S21.G00.79': '001 004', 'S21.G00.81': '001', 'S90.G00.90': '001 002',
}.items()}

AMOUNT = r'-?[0]*(0|[1-9][0-9]*)\.[0-9]{2}'
DATE = r'(0[1-9]|[12][0-9]|3[01])(0[1-9]|1[0-2])(19|20)[0-9]{2}'
_TEXT = r"[^\x00-\x1f\x7f]"
_DIGITS = r'[0-9]'


def _text(low: int, high: int) -> str:
    return f'{_TEXT}{{{low},{high}}}'


# The value of every rubric this project writes. Sources: DOMAIN.md for dates and amounts; the
# lengths and code lists are those of the cahier technique as far as they could be checked (see
# transforms/rules/dsn_codes.csv and the report of the DSN issue for what is confirmed).
FORMATS = {
    'S10.G00.00.001': _text(1, 20), 'S10.G00.00.002': _text(1, 20), 'S10.G00.00.003': _text(1, 20),
    'S10.G00.00.005': '0[12]', 'S10.G00.00.006': r'P[0-9]{2}V[0-9]{2}', 'S10.G00.00.007': '0[1-9]',
    'S10.G00.00.008': '0[1-9]',
    'S10.G00.01.001': r'[0-9]{9}', 'S10.G00.01.002': r'[0-9]{5}', 'S10.G00.01.003': _text(1, 80),
    'S10.G00.02.001': '0[12]', 'S10.G00.02.002': _text(1, 80), 'S10.G00.02.004': r'[^@\s]+@[^@\s]+\.[^@\s]+',
    'S10.G00.02.005': r'[0-9+ .()-]{1,20}',
    'S20.G00.05.001': '0[1-7]', 'S20.G00.05.002': '0[1-5]', 'S20.G00.05.003': r'[1-9][1-9]',
    'S20.G00.05.004': r'[0-9]{1,12}', 'S20.G00.05.005': r'01(0[1-9]|1[0-2])(19|20)[0-9]{2}',
    'S20.G00.05.007': DATE, 'S20.G00.05.008': '0[1-9]', 'S20.G00.05.010': '0[1-9]',
    'S21.G00.06.001': r'[0-9]{9}', 'S21.G00.06.003': r'[0-9]{4}[A-Z]',
    'S21.G00.11.001': r'[0-9]{5}', 'S21.G00.11.002': r'[0-9]{4}[A-Z]', 'S21.G00.11.022': r'[0-9A-Z]{4}',
    'S21.G00.22.001': r'[0-9A-Z]{1,14}', 'S21.G00.22.003': DATE, 'S21.G00.22.004': DATE,
    'S21.G00.22.005': r'-?[0]*(0|[1-9][0-9]*)\.00',
    'S21.G00.23.001': r'[0-9]{3}', 'S21.G00.23.002': r'92[01]', 'S21.G00.23.004': AMOUNT,
    'S21.G00.23.005': AMOUNT,
    'S21.G00.30.001': r'[1-478][0-9]{4}(2[AB]|[0-9]{2})[0-9]{6}', 'S21.G00.30.002': _text(1, 80),
    'S21.G00.30.004': _text(1, 80), 'S21.G00.30.005': '0[12]', 'S21.G00.30.006': DATE,
    'S21.G00.30.013': '0[1-4]', 'S21.G00.30.014': r'(0[1-9]|[1-8][0-9]|9[0-5]|2[AB]|9[78][0-9]|99)',
    'S21.G00.30.015': r'[A-Z]{2}', 'S21.G00.30.019': _text(1, 30),
    'S21.G00.40.001': DATE, 'S21.G00.40.002': r'[0-9]{2}', 'S21.G00.40.003': r'[0-9]{2}',
    'S21.G00.40.004': r'[0-9]{3}[a-z]', 'S21.G00.40.006': _text(1, 120), 'S21.G00.40.007': r'[0-9]{2}',
    'S21.G00.40.008': r'[0-9]{2}', 'S21.G00.40.009': r'[0-9A-Za-z]{1,20}', 'S21.G00.40.010': DATE,
    'S21.G00.40.011': r'[0-9]{2}', 'S21.G00.40.012': AMOUNT, 'S21.G00.40.013': AMOUNT,
    'S21.G00.40.014': r'[0-9]{2}', 'S21.G00.40.016': r'[0-9]{2}', 'S21.G00.40.017': r'[0-9A-Z]{4}',
    'S21.G00.40.018': r'[0-9]{3}', 'S21.G00.40.019': r'[0-9]{14}', 'S21.G00.40.020': r'[0-9]{3}',
    'S21.G00.40.024': r'[0-9]{2}', 'S21.G00.40.026': r'[0-9]{2}', 'S21.G00.40.036': r'0[12]',
    'S21.G00.40.037': r'0[12]', 'S21.G00.40.039': r'[0-9]{3}', 'S21.G00.40.040': r'[0-9]{3}[A-Z0-9]{2}',
    'S21.G00.71.002': r'[A-Z0-9]{4}',
    'S21.G00.50.001': DATE, 'S21.G00.50.002': AMOUNT, 'S21.G00.50.004': AMOUNT,
    'S21.G00.50.006': r'[0-9]{1,2}\.[0-9]{2}', 'S21.G00.50.007': r'[0-9]{2}', 'S21.G00.50.009': AMOUNT,
    'S21.G00.50.013': AMOUNT,
    'S21.G00.51.001': DATE, 'S21.G00.51.002': DATE, 'S21.G00.51.010': r'[0-9A-Za-z]{1,20}',
    'S21.G00.51.011': r'[0-9]{3}', 'S21.G00.51.013': AMOUNT,
    'S21.G00.78.001': r'[0-9]{2}', 'S21.G00.78.002': DATE, 'S21.G00.78.003': DATE, 'S21.G00.78.004': AMOUNT,
    'S21.G00.81.001': r'[0-9]{3}', 'S21.G00.81.003': AMOUNT, 'S21.G00.81.004': AMOUNT,
    'S90.G00.90.001': r'[1-9][0-9]*', 'S90.G00.90.002': r'[1-9][0-9]*',
}
_COMPILED = {rubric: re.compile(f'^(?:{pattern})$') for rubric, pattern in FORMATS.items()}


def blocks(rubrics: list[tuple[str, str]]) -> list[tuple[str, dict]]:
    """The block occurrences of a parsed file, in order: ``(block, {number: value})``."""
    occurrences = []
    for rubric, value in rubrics:
        name, number = rubric[:10], rubric[11:]
        if occurrences and occurrences[-1][0] == name and number > max(occurrences[-1][1]):
            occurrences[-1][1][number] = value
        else:
            occurrences.append((name, {number: value}))
    return occurrences


def check(rubrics: list[tuple[str, str]]) -> list[str]:
    """Every problem of a parsed monthly DSN (empty list: none found). See the module docstring."""
    problems = []
    for index, (rubric, value) in enumerate(rubrics, start=1):
        pattern = _COMPILED.get(rubric)
        if pattern is None:
            problems.append(f'line {index}: rubric {rubric} is not one this project writes')
        elif not pattern.match(value):
            problems.append(f'line {index}: {rubric} value does not match {FORMATS[rubric]}')
        if len(f"{rubric},'{value}'") > MAX_LINE:
            problems.append(f'line {index}: over {MAX_LINE} characters')
    # stack of [block, {child: count}, last child order]
    stack: list[list] = [[None, {}, -1]]

    def close(frame):
        block = frame[0]
        for child, spec in TREE.items():
            if spec.parent == block:
                count = frame[1].get(child, 0)
                if count < spec.minimum:
                    problems.append(f'{child}: {count} under {block or "the file"}, at least {spec.minimum} expected')

    for position, (block, values) in enumerate(blocks(rubrics), start=1):
        spec = TREE.get(block)
        if spec is None:
            problems.append(f'block {position}: {block} is not a block of a monthly declaration')
            continue
        while stack[-1][0] != spec.parent and len(stack) > 1:
            close(stack.pop())
        if stack[-1][0] != spec.parent:
            problems.append(f'block {position}: {block} is not under its parent {spec.parent}')
            continue
        frame = stack[-1]
        if _ORDER[block] < frame[2]:
            problems.append(f'block {position}: {block} comes after a block that must follow it')
        frame[2] = _ORDER[block]
        frame[1][block] = frame[1].get(block, 0) + 1
        if spec.maximum is not None and frame[1][block] > spec.maximum:
            problems.append(f'block {position}: more than {spec.maximum} {block} under {spec.parent or "the file"}')
        missing = [n for n in MANDATORY.get(block, ()) if n not in values]
        if missing:
            problems.append(f'block {position}: {block} lacks mandatory rubrics {", ".join(missing)}')
        stack.append([block, {}, -1])
    while stack:
        close(stack.pop())
    totals = [values for block, values in blocks(rubrics) if block == 'S90.G00.90']
    if totals:
        declared_lines, declared_count = totals[-1].get('001'), totals[-1].get('002')
        if declared_lines != str(len(rubrics)):
            problems.append(f'S90.G00.90.001 is {declared_lines}, the file has {len(rubrics)} lines')
        count = sum(1 for block, _ in blocks(rubrics) if block == 'S20.G00.05')
        if declared_count != str(count):
            problems.append(f'S90.G00.90.002 is {declared_count}, the file has {count} declarations')
    return problems


# ------------------------------------------------------------------------------------------------
# Due date

def due_date(period: str, company_headcount: int, paid_within_month: bool = True) -> datetime.date:
    """When the monthly DSN of ``period`` is due: the 5th of the next month (50 employees or more,
    paid within the month) or the 15th, moved past Saturdays, Sundays and French public holidays.
    (The deadline is at 12:00 that day.)"""
    start = month_start(period)
    following = (start.replace(day=28) + datetime.timedelta(days=4)).replace(day=1)
    day = following.replace(day=5 if company_headcount >= 50 and paid_within_month else 15)
    closed = holidays.France(years=[day.year, day.year + 1])
    while day.weekday() >= 5 or day in closed:
        day += datetime.timedelta(days=1)
    return day

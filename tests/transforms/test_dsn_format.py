"""The DSN format functions: values, rendering and parsing, the structure checker, due dates."""
import datetime

import pytest

from transforms import dsn_format as fmt


def test_amounts_have_a_dot_and_exactly_two_decimals():
    assert fmt.amount(182303) == '1823.03'
    assert fmt.amount(5) == '0.05'
    assert fmt.amount(0) == '0.00'
    assert fmt.amount(-72575) == '-725.75'
    assert fmt.euros_rounded(123450) == 123500 and fmt.euros_rounded(123449) == 123400
    assert fmt.euros_rounded(-150) == -200 and fmt.amount(fmt.euros_rounded(99)) == '1.00'


def test_dates_and_the_declared_month():
    assert fmt.date(datetime.date(2026, 11, 3)) == '03112026'
    assert fmt.declared_month('2026-11') == '01112026'
    assert fmt.month_end('2026-02') == datetime.date(2026, 2, 28)
    with pytest.raises(fmt.DsnFormatError, match='YYYY-MM'):
        fmt.month_start('2026-13')


def test_text_keeps_latin_1_accents_and_transliterates_the_rest():
    assert fmt.text('Hélène  Müller', 80) == 'Hélène Müller'
    assert fmt.text('Œuvré\nŁukasz', 80) == 'OEuvré Lukasz'
    assert fmt.text('x' * 100, 80) == 'x' * 80
    assert fmt.text('\x07Zoé\t', 10) == 'Zoé'


def test_render_then_parse_round_trips_in_iso_8859_1():
    rubrics = [('S21.G00.30.002', "D'Artagnan"), ('S21.G00.30.004', 'Zoé'), ('S90.G00.90.001', '2')]
    data = fmt.render(rubrics)
    assert data == "S21.G00.30.002,'D'Artagnan'\nS21.G00.30.004,'Zoé'\nS90.G00.90.001,'2'\n".encode('iso-8859-1')
    assert b'Zo\xe9' in data
    assert fmt.parse(data) == rubrics
    assert fmt.parse(data.replace(b'\n', b'\r\n')) == rubrics


@pytest.mark.parametrize('bad, message', [
    (b"S21.G00.30.002,Dupont\n", 'line 1'),
    (b"S21.G00.30.002,'ok'\nhello\n", 'line 2'),
    (b"S21.G00.30.002,'" + b'x' * 300 + b"'\n", 'characters'),
])
def test_parse_names_the_bad_line(bad, message):
    with pytest.raises(fmt.DsnFormatError, match=message):
        fmt.parse(bad)


def test_line_refuses_what_the_norm_refuses():
    with pytest.raises(fmt.DsnFormatError, match='256'):
        fmt.line('S21.G00.30.002', 'x' * 250)
    with pytest.raises(fmt.DsnFormatError, match='ISO-8859-1'):
        fmt.line('S21.G00.30.002', 'Œ')
    with pytest.raises(fmt.DsnFormatError, match='Sxx'):
        fmt.line('S21.G00.30', 'x')


def _minimal():
    """A valid monthly declaration with one employee: the smallest tree the checker accepts."""
    rubrics = [
        *[(f'S10.G00.00.{n}', v) for n, v in (('001', 'hrbatch'), ('002', 'hrbatch'), ('005', '01'),
                                              ('006', 'P26V01'), ('007', '01'), ('008', '01'))],
        ('S10.G00.01.001', '732829320'), ('S10.G00.01.002', '00074'), ('S10.G00.01.003', 'Siège'),
        ('S10.G00.02.001', '02'), ('S10.G00.02.002', 'Marie Martin'), ('S10.G00.02.004', 'paie@example.fr'),
        ('S10.G00.02.005', '0102030405'),
        *[(f'S20.G00.05.{n}', v) for n, v in (('001', '01'), ('002', '01'), ('003', '11'), ('004', '2026110101'),
                                              ('005', '01112026'), ('007', '30112026'), ('008', '01'), ('010', '01'))],
        ('S21.G00.06.001', '732829320'), ('S21.G00.06.003', '6201Z'),
        ('S21.G00.11.001', '00074'), ('S21.G00.11.002', '6201Z'), ('S21.G00.11.022', '9999'),
        ('S21.G00.22.001', '78861779300013'), ('S21.G00.22.003', '01112026'), ('S21.G00.22.004', '30112026'),
        ('S21.G00.22.005', '100.00'), ('S21.G00.23.001', '100'), ('S21.G00.23.002', '920'),
        ('S21.G00.23.005', '99.51'),
        ('S21.G00.30.001', '1800175123456'), ('S21.G00.30.002', 'Dupont'), ('S21.G00.30.004', 'Zoé'),
        ('S21.G00.30.006', '01011980'), ('S21.G00.30.013', '01'), ('S21.G00.30.014', '75'),
        ('S21.G00.30.015', 'FR'),
        *[(f'S21.G00.40.{n}', v) for n, v in (
            ('001', '01012020'), ('002', '06'), ('003', '04'), ('004', '543d'), ('006', 'Employé'), ('007', '01'),
            ('008', '99'), ('009', 'C001'), ('011', '10'), ('012', '151.67'), ('013', '151.67'), ('014', '10'),
            ('016', '99'), ('017', '9999'), ('018', '200'), ('019', '73282932000074'), ('020', '200'),
            ('024', '99'), ('026', '99'), ('036', '02'), ('037', '02'), ('039', '200'), ('040', '620AA'))],
        ('S21.G00.71.002', 'RUAA'),
        *[(f'S21.G00.50.{n}', v) for n, v in (('001', '30112026'), ('002', '1500.00'), ('004', '1400.00'),
                                              ('006', '0.00'), ('007', '13'), ('009', '0.00'), ('013', '1500.00'))],
        ('S21.G00.51.001', '01112026'), ('S21.G00.51.002', '30112026'), ('S21.G00.51.010', 'C001'),
        ('S21.G00.51.011', '001'), ('S21.G00.51.013', '1823.03'),
        ('S21.G00.78.001', '03'), ('S21.G00.78.002', '01112026'), ('S21.G00.78.003', '30112026'),
        ('S21.G00.78.004', '1823.03'), ('S21.G00.81.001', '075'), ('S21.G00.81.004', '236.99'),
        ('S21.G00.81.001', '018'), ('S21.G00.81.004', '-725.75'),
    ]
    return rubrics + [('S90.G00.90.001', str(len(rubrics) + 2)), ('S90.G00.90.002', '1')]


def test_the_checker_accepts_a_valid_tree():
    assert fmt.check(_minimal()) == []
    assert len(fmt.blocks(_minimal())) == 17  # two S21.G00.81 blocks: each starts again at 001


def test_the_checker_finds_order_mandatory_format_and_total_problems():
    rubrics = _minimal()
    without_contract = [r for r in rubrics if not r[0].startswith(('S21.G00.40', 'S21.G00.71'))]
    assert any('S21.G00.40: 0 under S21.G00.30' in p for p in fmt.check(without_contract))
    swapped = list(rubrics)
    start = next(i for i, r in enumerate(swapped) if r[0].startswith('S21.G00.06'))
    swapped[start:start + 2], swapped[start + 2:start + 5] = swapped[start + 2:start + 5], swapped[start:start + 2]
    assert any('not under its parent' in p for p in fmt.check(swapped))
    no_name = [r for r in rubrics if r[0] != 'S21.G00.30.002']
    problems = fmt.check(no_name)
    assert any('S21.G00.30 lacks mandatory rubrics 002' in p for p in problems)
    assert any('S90.G00.90.001' in p for p in problems)
    bad_amount = [(r, '1823,03' if r == 'S21.G00.51.013' else v) for r, v in rubrics]
    assert any('S21.G00.51.013 value does not match' in p for p in fmt.check(bad_amount))
    bad_bordereau = [(r, '100.40' if r == 'S21.G00.22.005' else v) for r, v in rubrics]
    assert any('S21.G00.22.005' in p for p in fmt.check(bad_bordereau))
    stray = rubrics[:-2] + [('S21.G00.81.999', 'x')] + rubrics[-2:]
    assert any('S21.G00.81.999 is not one this project writes' in p for p in fmt.check(stray))
    late_individual = [r for r in rubrics if not r[0].startswith('S21.G00.2')]
    late_individual[-2:-2] = [r for r in rubrics if r[0].startswith('S21.G00.2')]
    assert any('not under its parent' in p or 'comes after' in p for p in fmt.check(late_individual))


@pytest.mark.parametrize('period, headcount, within, due', [
    ('2026-03', 10, True, datetime.date(2026, 4, 15)),    # plain 15th (a Wednesday)
    ('2026-03', 60, True, datetime.date(2026, 4, 7)),     # 5th a Sunday, Monday 6th Easter Monday
    ('2026-03', 60, False, datetime.date(2026, 4, 15)),   # 50+ but paid the next month: the 15th
    ('2026-10', 10, True, datetime.date(2026, 11, 16)),   # 15th a Sunday
    ('2026-11', 60, True, datetime.date(2026, 12, 7)),    # 5th a Saturday
    ('2026-11', 49, True, datetime.date(2026, 12, 15)),   # under 50
    ('2028-07', 10, True, datetime.date(2028, 8, 16)),    # 15 August, a Tuesday
    ('2028-05', 50, True, datetime.date(2028, 6, 6)),     # Pentecost Monday the 5th
    ('2027-04', 10, True, datetime.date(2027, 5, 18)),    # Saturday 15th, Sunday, Pentecost Monday 17th
    ('2026-12', 10, True, datetime.date(2027, 1, 15)),    # into the next year
])
def test_due_dates(period, headcount, within, due):
    assert fmt.due_date(period, headcount, paid_within_month=within) == due

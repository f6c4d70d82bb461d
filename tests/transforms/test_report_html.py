"""The HTML and SVG helpers of the reports: escaping, self-containment, axes, charts that draw marks."""
import re

from transforms import report_html as rh


def test_every_text_is_escaped_in_charts_tables_and_the_page():
    evil = '<script>alert("x")</script> & co'
    svg = rh.bar_chart([evil], [3], title=evil)
    table = rh.table([rh.Column(evil, str)], [[evil]])
    page = rh.page(title=evil, subtitle=evil, meta=evil, body=rh.figure(svg, evil) + table)
    assert '<script>alert' not in page
    assert '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co' in page


def test_a_page_is_self_contained_and_carries_its_checks():
    page = rh.page(title='t', subtitle='s', meta='m', body=rh.figure(rh.histogram([0, 0.5, 1], [2, 5], title='h',
                                                                                  x_label='score'), 'h'))
    assert rh.external_urls(page) == []
    assert 'xmlns' not in page and 'src=' not in page and '@import' not in page
    assert 'window.onerror' in page and 'id="script-errors"' in page and 'data-rendered' in page
    assert rh.external_urls('<img src="https://example.com/a.png">') == ['https://example.com/a.png']


def test_charts_draw_one_mark_per_value_and_no_chart_without_data():
    assert rh.bar_chart(['a', 'b', 'c'], [1, 0, 2], title='b').count('class="mark"') == 3
    assert rh.histogram([0, 1, 2, 3], [4, 0, 1], title='h', x_label='x').count('class="mark"') == 2
    stacked = rh.stacked_bar_chart(['x', 'y'], [('s1', [1, 2]), ('s2', [0.5, 0])], title='s')
    assert stacked.count('class="mark"') == 3
    columns = rh.column_chart(['m1', 'm2'], [('a', [1, None]), ('b', [2, 3])], title='c')
    assert columns.count('class="mark"') == 3
    assert 'class="chart' not in rh.figure(None, 'nothing') and 'No data' in rh.figure(None, 'nothing')


def test_axes_end_on_round_numbers_split_in_round_steps():
    assert [rh.nice_max(v) for v in (0, 0.818, 4, 7, 20, 123)] == [1.0, 1.0, 5, 10, 20, 200]
    assert rh.tick_count(2.0) == 4 and rh.tick_count(5) == 5 and rh.tick_count(2.5) == 5
    ticks = re.findall(r'<text class="tick"[^>]*>([^<]*)</text>', rh.bar_chart(['a'], [4], title='t'))
    assert ticks == ['0', '1', '2', '3', '4', '5']


def test_tables_cap_their_rows_and_keep_raw_values_for_sorting():
    rows = [[i, i * 100] for i in range(rh.MAX_TABLE_ROWS + 7)]
    html = rh.table([rh.Column('n', rh.fmt_int, True), rh.Column('cents', rh.fmt_euros, True)], rows)
    assert html.count('<tr>') == rh.MAX_TABLE_ROWS + 1
    assert f'{rh.MAX_TABLE_ROWS:,} of {rh.MAX_TABLE_ROWS + 7:,} rows shown' in html
    assert 'data-sort="1200"' in html and '12.00\u00a0€' in html


def test_number_formats():
    assert rh.fmt_euros(123456789) == '1\u202f234\u202f567.89\u00a0€'
    assert rh.fmt_pct(3.14159) == '+3.1\u00a0%' and rh.fmt_pct(None) == '–'
    assert rh.fit('abcdefghij', 5) == 'abcd…' and rh.fit('abc', 5) == 'abc'

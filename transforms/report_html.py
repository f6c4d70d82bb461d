"""Self-contained HTML reports: inline CSS, charts as inline SVG, a small inline script.

Pure functions that return HTML text; every text that comes from data goes through ``esc``
(``html.escape``). A page needs no network to open: no external stylesheet, font, script or image,
and the SVG is inline HTML5 (no ``xmlns`` URL either).

The inline script does three things: ``window.onerror`` (installed first, in ``<head>``) writes any
script error into the visible ``#script-errors`` element; once the page has loaded, each
``<figure class="chart">`` whose SVG has drawn marks (elements of class ``mark`` with a non-empty
bounding box) gets ``data-rendered="N"`` (N marks); and a click on a table header sorts the table.
A headless browser can therefore check a report: every chart figure has ``data-rendered`` and
``#script-errors`` is empty.

Charts: ``bar_chart`` (horizontal bars), ``stacked_bar_chart`` (horizontal, one segment per series),
``column_chart`` (vertical, grouped by series: month over month) and ``histogram``. An empty chart
is never drawn: ``figure`` shows a "no data" note instead, outside any chart figure.
"""
import html
import math
import re
import typing

PALETTE = ('#3b5bdb', '#f08c00', '#0ca678', '#d6336c', '#7048e8', '#1098ad', '#e03131', '#74b816',
           '#5c7cfa', '#fab005')
_FONT = "'DejaVu Sans', 'Segoe UI', Helvetica, Arial, sans-serif"
_URL = re.compile(r'https?://', re.IGNORECASE)
MAX_TABLE_ROWS = 500


def esc(value) -> str:
    """``value`` as HTML text (quotes escaped too: safe in attributes)."""
    return html.escape('' if value is None else str(value), quote=True)


def external_urls(text: str) -> list[str]:
    """The http(s) URLs an HTML text references (a self-contained report has none)."""
    return [text[m.start():m.start() + 80].split('"')[0] for m in _URL.finditer(text)]


# ---------------------------------------------------------------------------------------------
# Number formats
# ---------------------------------------------------------------------------------------------

def fmt_int(value) -> str:
    return '–' if value is None else f'{int(value):,}'.replace(',', '\u202f')


def fmt_float(value, decimals: int = 2) -> str:
    return '–' if value is None else f'{float(value):,.{decimals}f}'.replace(',', '\u202f')


def fmt_euros(cents) -> str:
    """Cents as euros: ``1 234 567.89 €``."""
    return '–' if cents is None else f'{cents / 100:,.2f}'.replace(',', '\u202f') + '\u00a0€'


def fmt_pct(value, signed: bool = True) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '–'
    return f'{value:+.1f}\u00a0%' if signed else f'{value:.1f}\u00a0%'


def _short(value: float) -> str:
    """A compact axis label: 1.2k, 3.4M."""
    magnitude = abs(value)
    for limit, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if magnitude >= limit:
            return f'{value / limit:.3g}{suffix}'
    return f'{value:.3g}'


def nice_max(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above ``value`` (an axis end); 1 for 0 or less."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10 ** exponent
        if candidate >= value * (1 - 1e-12):
            return candidate
    return 10 ** (exponent + 1)


# ---------------------------------------------------------------------------------------------
# SVG charts
# ---------------------------------------------------------------------------------------------

def tick_count(scale: float) -> int:
    """How many intervals split the axis 0..``scale`` (a ``nice_max``) into round steps."""
    mantissa = scale / 10 ** math.floor(math.log10(scale))
    return 4 if round(mantissa, 6) == 2 else 5


def fit(label, chars: int) -> str:
    """``label`` cut to ``chars`` characters, with an ellipsis when cut."""
    text = str(label)
    return text if len(text) <= chars else text[:max(1, chars - 1)] + '…'


def _svg(width: int, height: int, body: str, label: str) -> str:
    return (f'<svg class="svg-chart" role="img" aria-label="{esc(label)}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{body}</svg>')


def _text(x: float, y: float, text: str, *, anchor: str = 'start', cls: str = 'tick', extra: str = '') -> str:
    return f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{esc(text)}</text>'


def _legend(names: typing.Sequence[str], x: float, y: float, max_x: float) -> tuple[str, float]:
    """Legend entries from (x, y), wrapped before ``max_x``; (SVG, the height it takes)."""
    parts, cursor, line = [], x, 0
    for i, name in enumerate(names):
        step = 26 + 6.8 * len(str(name))
        if cursor + step > max_x and cursor > x:
            cursor, line = x, line + 1
        color = PALETTE[i % len(PALETTE)]
        row_y = y + 18 * line
        parts.append(f'<rect x="{cursor:.1f}" y="{row_y - 9:.1f}" width="11" height="11" rx="2" fill="{color}"/>')
        parts.append(_text(cursor + 16, row_y, name, cls='legend'))
        cursor += step
    return ''.join(parts), 18.0 * (line + 1)


def _label_chars(width: int) -> int:
    return int((width - 14) / 7.0)


def _label_width(labels: typing.Sequence[str], width: int) -> int:
    """Room for the labels left of the bars: as long as the longest, at most 40 % of the chart."""
    return int(min(max(260, 0.4 * width), max(60, 7.0 * max((len(str(label)) for label in labels), default=4) + 14)))


def bar_chart(labels: typing.Sequence[str], values: typing.Sequence[float], *, title: str,
              value_text: typing.Callable[[float], str] = fmt_float, color: str = PALETTE[0],
              width: int = 620, bar_height: int = 22) -> str:
    """Horizontal bars, one per label, each with its value written after it."""
    left = _label_width(labels, width)
    right = 110
    plot = width - left - right
    top = 10
    height = top + len(labels) * (bar_height + 8) + 26
    scale = nice_max(max((v for v in values if v is not None), default=0))
    parts = []
    steps = tick_count(scale)
    for k in range(steps + 1):
        x = left + plot * k / steps
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 22}"/>')
        parts.append(_text(x, height - 6, _short(scale * k / steps), anchor='middle'))
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * (bar_height + 8)
        length = plot * max(0.0, value or 0) / scale
        parts.append(_text(left - 8, y + bar_height * 0.7, fit(label, _label_chars(left)), anchor='end', cls='label'))
        parts.append(f'<rect class="mark" x="{left}" y="{y}" width="{max(length, 1.5):.1f}" height="{bar_height}" '
                     f'rx="3" fill="{color}"><title>{esc(label)}: {esc(value_text(value))}</title></rect>')
        parts.append(_text(left + max(length, 1.5) + 6, y + bar_height * 0.7, value_text(value), cls='value'))
    return _svg(width, height, ''.join(parts), title)


def stacked_bar_chart(labels: typing.Sequence[str], series: typing.Sequence[tuple[str, typing.Sequence[float]]], *,
                      title: str, value_text: typing.Callable[[float], str] = fmt_float, width: int = 620,
                      bar_height: int = 22, total_text: typing.Callable[[float], str] | None = None) -> str:
    """Horizontal bars made of one segment per series (e.g. the weighted components of a score)."""
    total_text = total_text or value_text
    left = _label_width(labels, width)
    right = 90
    plot = width - left - right
    legend, legend_height = _legend([name for name, _ in series], 12, 14, width - 12)
    top = int(12 + legend_height)
    height = top + len(labels) * (bar_height + 8) + 26
    totals = [sum(max(0.0, values[i] or 0) for _, values in series) for i in range(len(labels))]
    scale = nice_max(max(totals, default=0))
    parts = [legend]
    steps = tick_count(scale)
    for k in range(steps + 1):
        x = left + plot * k / steps
        parts.append(f'<line class="grid" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 22}"/>')
        parts.append(_text(x, height - 6, _short(scale * k / steps), anchor='middle'))
    for i, label in enumerate(labels):
        y = top + i * (bar_height + 8)
        cursor = float(left)
        parts.append(_text(left - 8, y + bar_height * 0.7, fit(label, _label_chars(left)), anchor='end', cls='label'))
        for s, (name, values) in enumerate(series):
            value = max(0.0, values[i] or 0)
            length = plot * value / scale
            if length <= 0:
                continue
            parts.append(f'<rect class="mark" x="{cursor:.1f}" y="{y}" width="{length:.1f}" height="{bar_height}" '
                         f'fill="{PALETTE[s % len(PALETTE)]}"><title>{esc(label)}, {esc(name)}: '
                         f'{esc(value_text(value))}</title></rect>')
            cursor += length
        parts.append(_text(cursor + 6, y + bar_height * 0.7, total_text(totals[i]), cls='value'))
    return _svg(width, height, ''.join(parts), title)


def column_chart(categories: typing.Sequence[str], series: typing.Sequence[tuple[str, typing.Sequence[float | None]]],
                 *, title: str, value_text: typing.Callable[[float], str] = fmt_float, width: int = 620,
                 height: int = 300) -> str:
    """Vertical columns: one group per category, one column per series (e.g. months side by side)."""
    legend, legend_height = _legend([name for name, _ in series], 58, 16, width - 12)
    left, right, top, bottom = 58, 12, int(16 + legend_height), 58
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for _, vs in series for v in vs if v is not None]
    scale = nice_max(max(values, default=0))
    parts = [legend]
    steps = tick_count(scale)
    for k in range(steps + 1):
        y = top + plot_h * (1 - k / steps)
        parts.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}"/>')
        parts.append(_text(left - 6, y + 4, _short(scale * k / steps), anchor='end'))
    group = plot_w / max(1, len(categories))
    column = min(46.0, group * 0.8 / max(1, len(series)))
    for c, category in enumerate(categories):
        start = left + group * c + (group - column * len(series)) / 2
        for s, (name, vs) in enumerate(series):
            value = vs[c]
            if value is None:
                continue
            h = plot_h * max(0.0, value) / scale
            x = start + s * column
            parts.append(f'<rect class="mark" x="{x:.1f}" y="{top + plot_h - max(h, 1.5):.1f}" width="{column - 2:.1f}" '
                         f'height="{max(h, 1.5):.1f}" rx="2" fill="{PALETTE[s % len(PALETTE)]}"><title>{esc(category)}, '
                         f'{esc(name)}: {esc(value_text(value))}</title></rect>')
        label_x = left + group * (c + 0.5)
        rotate = len(categories) > 6
        extra = f' transform="rotate(-30 {label_x:.1f} {height - bottom + 16:.1f})"' if rotate else ''
        parts.append(_text(label_x, height - bottom + 16, category, anchor='end' if rotate else 'middle',
                           cls='label', extra=extra))
    return _svg(width, height, ''.join(parts), title)


def histogram(edges: typing.Sequence[float], counts: typing.Sequence[int], *, title: str, x_label: str,
              width: int = 620, height: int = 280, color: str = PALETTE[2]) -> str:
    """Adjacent columns over ``edges`` (len(counts) + 1 of them), with the x axis labelled."""
    left, right, top, bottom = 58, 14, 14, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    scale = nice_max(max(counts, default=0))
    low, high = edges[0], edges[-1]
    span = (high - low) or 1.0
    parts = []
    steps = tick_count(scale)
    for k in range(steps + 1):
        y = top + plot_h * (1 - k / steps)
        parts.append(f'<line class="grid" x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}"/>')
        parts.append(_text(left - 6, y + 4, _short(scale * k / steps), anchor='end'))
    for i, count in enumerate(counts):
        x0 = left + plot_w * (edges[i] - low) / span
        x1 = left + plot_w * (edges[i + 1] - low) / span
        h = plot_h * count / scale
        if count:
            parts.append(f'<rect class="mark" x="{x0 + 0.5:.1f}" y="{top + plot_h - h:.1f}" width="{x1 - x0 - 1:.1f}" '
                         f'height="{h:.1f}" fill="{color}"><title>[{edges[i]:g}, {edges[i + 1]:g}): '
                         f'{count:,}</title></rect>')
    for k in range(0, len(edges), max(1, (len(edges) - 1) // 10)):
        x = left + plot_w * (edges[k] - low) / span
        parts.append(_text(x, top + plot_h + 16, f'{edges[k]:g}', anchor='middle'))
    parts.append(f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}"/>')
    parts.append(_text(left + plot_w / 2, height - 6, x_label, anchor='middle', cls='label'))
    return _svg(width, height, ''.join(parts), title)


# ---------------------------------------------------------------------------------------------
# Page parts
# ---------------------------------------------------------------------------------------------

def figure(svg: str | None, caption: str, *, wide: bool = False) -> str:
    """A chart figure (checked by the page script), or a "no data" note when ``svg`` is None."""
    if svg is None:
        return f'<div class="card empty"><h3>{esc(caption)}</h3><p>No data.</p></div>'
    return (f'<figure class="chart card{" wide" if wide else ""}"><figcaption>{esc(caption)}</figcaption>'
            f'{svg}</figure>')


def kpis(items: typing.Sequence[tuple[str, str, str]]) -> str:
    """Tiles of (label, value, note)."""
    tiles = ''.join(f'<div class="kpi"><div class="kpi-label">{esc(label)}</div><div class="kpi-value">{esc(value)}'
                    f'</div><div class="kpi-note">{esc(note)}</div></div>' for label, value, note in items)
    return f'<div class="kpis">{tiles}</div>'


class Column(typing.NamedTuple):
    name: str                                   # header text
    format: typing.Callable[[typing.Any], str]  # cell text from the raw value
    numeric: bool = False


def table(columns: typing.Sequence[Column], rows: typing.Sequence[typing.Sequence], *, caption: str = '',
          total_rows: int | None = None) -> str:
    """A sortable table (click a header). Each cell keeps its raw value in ``data-sort``. At most
    ``MAX_TABLE_ROWS`` rows are shown, with a note saying where the rest is."""
    shown = rows[:MAX_TABLE_ROWS]
    head = ''.join(f'<th class="{"num" if c.numeric else ""}" title="Sort">{esc(c.name)}</th>' for c in columns)
    body = []
    for row in shown:
        cells = []
        for column, value in zip(columns, row):
            key = '' if value is None else value
            cells.append(f'<td class="{"num" if column.numeric else ""}" data-sort="{esc(key)}">'
                         f'{esc(column.format(value))}</td>')
        body.append(f'<tr>{"".join(cells)}</tr>')
    total = len(rows) if total_rows is None else total_rows
    note = (f'<p class="note">{len(shown):,} of {total:,} rows shown; every row is in the CSV and Parquet files.</p>'
            if total > len(shown) else '')
    title = f'<caption>{esc(caption)}</caption>' if caption else ''
    return (f'<div class="table-wrap card"><table class="sortable">{title}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{note}')


def section(title: str, body: str, note: str = '') -> str:
    intro = f'<p class="section-note">{esc(note)}</p>' if note else ''
    return f'<section><h2>{esc(title)}</h2>{intro}{body}</section>'


def grid(parts: typing.Sequence[str]) -> str:
    return f'<div class="grid">{"".join(parts)}</div>'


_CSS = """
:root { --ink: #1f2933; --muted: #66788a; --line: #e4e7eb; --bg: #f4f6fa; --accent: #3b5bdb; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); font: 14px/1.45 FONT; }
header { background: linear-gradient(120deg, #233876, #3b5bdb); color: #fff; padding: 26px 40px 22px; }
header h1 { margin: 0 0 4px; font-size: 26px; font-weight: 700; letter-spacing: .2px; }
header .subtitle { opacity: .85; font-size: 14px; }
header .meta { margin-top: 10px; font-size: 12px; opacity: .75; }
main { padding: 22px 40px 40px; max-width: 1320px; }
h2 { font-size: 18px; margin: 28px 0 10px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 14px; margin: 0 0 8px; }
.section-note, .note { color: var(--muted); font-size: 12.5px; margin: 4px 0 12px; }
.card { background: #fff; border-radius: 10px; box-shadow: 0 1px 3px rgba(16,24,40,.08), 0 1px 2px rgba(16,24,40,.05);
        border: 1px solid var(--line); }
.kpis { display: flex; flex-wrap: wrap; gap: 14px; margin: 4px 0 8px; }
.kpi { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px 18px; min-width: 180px;
       box-shadow: 0 1px 3px rgba(16,24,40,.06); border-top: 4px solid var(--accent); }
.kpi-label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .5px; }
.kpi-value { font-size: 22px; font-weight: 700; margin-top: 2px; }
.kpi-note { color: var(--muted); font-size: 12px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px; }
figure.chart { margin: 0; padding: 14px 16px 10px; }
figure.chart.wide { grid-column: 1 / -1; }
figcaption { font-weight: 700; margin-bottom: 8px; }
.svg-chart { display: block; max-width: 100%; height: auto; }
.svg-chart .grid { stroke: #edf0f3; stroke-width: 1; }
.svg-chart .axis { stroke: #9aa5b1; stroke-width: 1; }
.svg-chart text { font-family: FONT; fill: #52606d; }
.svg-chart .tick { font-size: 10.5px; }
.svg-chart .label { font-size: 11.5px; fill: #323f4b; }
.svg-chart .value { font-size: 11px; fill: #323f4b; font-weight: 600; }
.svg-chart .legend { font-size: 11.5px; fill: #323f4b; }
.svg-chart rect.mark:hover { opacity: .8; }
.empty { padding: 14px 16px; color: var(--muted); }
.table-wrap { overflow-x: auto; margin-top: 6px; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
caption { text-align: left; font-weight: 700; padding: 10px 12px 4px; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: #f8f9fb; color: #3e4c59; cursor: pointer; position: sticky; top: 0; user-select: none; }
th.sorted-asc::after { content: ' \\25B2'; font-size: 9px; }
th.sorted-desc::after { content: ' \\25BC'; font-size: 9px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fbfcfd; }
tbody tr:hover { background: #eef2ff; }
#script-errors { color: #c92a2a; background: #fff5f5; border: 1px solid #ffc9c9; border-radius: 8px; padding: 8px 12px;
                 margin: 12px 40px 0; font-family: monospace; white-space: pre-wrap; }
#script-errors:empty { display: none; }
footer { color: var(--muted); font-size: 12px; padding: 0 40px 30px; }
""".replace('FONT', _FONT)

# Installed first, so an error in any later script is shown on the page.
_ERROR_SCRIPT = """
window.onerror = function (message, source, line) {
  var box = document.getElementById('script-errors');
  var text = 'Script error: ' + message + (line ? ' (line ' + line + ')' : '') + '\\n';
  if (box) { box.textContent += text; } else { document.documentElement.setAttribute('data-script-error', text); }
};
"""

_PAGE_SCRIPT = """
(function () {
  function markCharts() {
    document.querySelectorAll('figure.chart').forEach(function (fig) {
      var svg = fig.querySelector('svg');
      var drawn = 0;
      if (svg) {
        svg.querySelectorAll('.mark').forEach(function (mark) {
          var box = mark.getBBox();
          if (box.width > 0 && box.height > 0) { drawn += 1; }
        });
      }
      if (drawn > 0) { fig.setAttribute('data-rendered', String(drawn)); }
      else { fig.removeAttribute('data-rendered'); fig.setAttribute('data-render-problem', 'no drawn mark'); }
    });
  }
  function sortBy(table, index, th) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var descending = !th.classList.contains('sorted-desc');
    var numeric = th.classList.contains('num');
    rows.sort(function (a, b) {
      var x = a.cells[index].getAttribute('data-sort'), y = b.cells[index].getAttribute('data-sort');
      var order = numeric ? (parseFloat(x || '-Infinity') - parseFloat(y || '-Infinity')) : x.localeCompare(y);
      return descending ? -order : order;
    });
    table.querySelectorAll('th').forEach(function (h) { h.classList.remove('sorted-asc', 'sorted-desc'); });
    th.classList.add(descending ? 'sorted-desc' : 'sorted-asc');
    rows.forEach(function (row) { body.appendChild(row); });
  }
  function makeSortable() {
    document.querySelectorAll('table.sortable').forEach(function (table) {
      table.querySelectorAll('th').forEach(function (th, index) {
        th.addEventListener('click', function () { sortBy(table, index, th); });
      });
    });
  }
  function start() { markCharts(); makeSortable(); document.body.setAttribute('data-ready', 'true'); }
  if (document.readyState === 'loading') { document.addEventListener('DOMContentLoaded', start); } else { start(); }
})();
"""


def page(*, title: str, subtitle: str, meta: str, body: str, footer: str = '') -> str:
    """The whole report as one HTML document, with nothing to fetch."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f'<script>{_ERROR_SCRIPT}</script><style>{_CSS}</style></head><body>'
            f'<header><h1>{esc(title)}</h1><div class="subtitle">{esc(subtitle)}</div>'
            f'<div class="meta">{esc(meta)}</div></header><div id="script-errors"></div>'
            f'<main>{body}</main><footer>{esc(footer)}</footer><script>{_PAGE_SCRIPT}</script></body></html>\n')

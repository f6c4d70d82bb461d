"""The reports end to end: real matching and payroll outputs in, numbers checked against independent
recomputations from those outputs, bad rows dead-lettered, and each HTML page opened in headless
Chromium (its DOM after the scripts ran, and a screenshot): every chart drawn, no script error, no URL.

Chromium is the Debian package, installed by ``bash .ci/install_chromium.sh``. The screenshots are
saved in the test's tmp dir and copied to ``tests/.screenshots/<kind>.png`` (git-ignored).
"""
import collections
import datetime
import json
import math
import pathlib
import re
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import generate
from pipelines import generate_payroll
from pipelines import matching
from pipelines import payroll
from pipelines import reports
from transforms import report_html
from transforms import schemas
from transforms.errors import ConfigError
from transforms.keyed_write import read_parquet_dataset

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

SCREENSHOTS = pathlib.Path(__file__).resolve().parents[1] / '.screenshots'
MONTHS = ('2026-10', '2026-11')
TOP = 4


# ---------------------------------------------------------------------------------------------
# Headless Chromium
# ---------------------------------------------------------------------------------------------

def _chromium() -> str:
    path = shutil.which('chromium')
    if path is None:
        pytest.fail('chromium is not installed: run `bash .ci/install_chromium.sh` (Debian package, headless)')
    return path


def _browse(html: pathlib.Path, screenshot: pathlib.Path) -> str:
    """Opens ``html`` in headless Chromium: saves a screenshot, returns the DOM after the scripts ran."""
    base = [_chromium(), '--headless', '--no-sandbox', '--disable-gpu', '--window-size=1280,2000',
            '--hide-scrollbars', '--user-data-dir=' + str(screenshot.parent / '.chromium-profile')]
    url = html.resolve().as_uri()
    dom = subprocess.run([*base, '--dump-dom', url], capture_output=True, text=True, timeout=120, check=True).stdout
    subprocess.run([*base, f'--screenshot={screenshot}', url], capture_output=True, timeout=120, check=True)
    assert screenshot.exists() and screenshot.stat().st_size > 10_000, f'no screenshot of {html}'
    return dom


def page_problems(html_text: str, dom: str) -> list[str]:
    """What is wrong with a report page: a chart not drawn, a script error, a URL, no chart at all."""
    problems = [f'references {url}' for url in report_html.external_urls(html_text)]
    figures = re.findall(r'<figure class="chart[^"]*"[^>]*>', dom)
    if not figures:
        problems.append('no chart figure')
    problems += [f'chart not rendered: {tag}' for tag in figures if 'data-rendered=' not in tag]
    errors = re.search(r'<div id="script-errors">(.*?)</div>', dom, re.S)
    if errors is None:
        problems.append('no #script-errors element')
    elif errors.group(1).strip():
        problems.append(f'script errors: {errors.group(1).strip()}')
    if 'data-ready="true"' not in dom:
        problems.append('the page script did not finish')
    return problems


def _check_page(html: pathlib.Path, kind: str, tmp_path: pathlib.Path, record_property, capsys) -> str:
    shot = tmp_path / f'{kind}.png'
    dom = _browse(html, shot)
    assert page_problems(html.read_text(encoding='utf-8'), dom) == []
    SCREENSHOTS.mkdir(exist_ok=True)
    kept = SCREENSHOTS / f'{kind}.png'
    shutil.copyfile(shot, kept)
    shown = f'tests/.screenshots/{kind}.png'
    record_property(f'{kind}_screenshot', shown)
    with capsys.disabled():  # shown with or without -s
        print(f'\nreport screenshot: {shown} (and {shot})')
    return dom


# ---------------------------------------------------------------------------------------------
# Inputs: the real pipelines on small generated data
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def matching_output(tmp_path_factory):
    root = tmp_path_factory.mktemp('matching')
    generate.generate(str(root / 'in'), candidates=400, offers=14, seed=11)
    matching.run(['--candidates', str(root / 'in' / 'candidates.parquet'), '--offers', str(root / 'in' / 'offers.parquet'),
                  '--output', str(root / 'out'), '--top_k', '25', '--database', 'none'])
    return root


@pytest.fixture(scope='module')
def payroll_outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp('payroll')
    data = root / 'in'
    generate_payroll.generate_payroll(str(data), employees=160, period='2026-11', seed=8)
    # One contract that ends before it starts: a dead letter in each month's payroll output.
    contracts = pq.read_table(data / 'contracts.parquet').to_pylist()
    bad = dict(contracts[0], contract_id='BAD-1', start_date=datetime.date(2026, 9, 20), end_date=datetime.date(2026, 9, 1))
    pq.write_table(pa.Table.from_pylist(contracts + [bad], schema=pq.read_schema(data / 'contracts.parquet')),
                   data / 'contracts.parquet')
    for period in MONTHS:
        args = ['--period', period, '--output', str(root / f'payroll-{period}'), '--database', 'none', '--buckets', '4']
        for name in generate_payroll.DATASETS:
            args += [f'--{name}', str(data / f'{name}.parquet')]
        payroll.run(args)
    return root


def _report(tmp_path, kind, *args, name=None):
    output = tmp_path / (name or f'report-{kind}')
    summary = reports.run(['--kind', kind, '--output', str(output), *args])
    return output, summary


def _dead_letters(output):
    return [json.loads(line) for path in sorted((output / 'dead_letters').glob('*.jsonl'))
            for line in path.read_text().splitlines()]


def _csv_equals_parquet(output, name):
    import pyarrow.csv as pa_csv
    parquet = pq.read_table(output / f'{name}.parquet')
    csv = pa_csv.read_csv(output / f'{name}.csv', convert_options=pa_csv.ConvertOptions(
        column_types=parquet.schema, strings_can_be_null=True))
    assert csv.to_pylist() == parquet.to_pylist(), name
    return parquet.to_pylist()


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------

def test_matching_report_counts_scores_and_explains_the_top_candidates(tmp_path, matching_output, record_property,
                                                                        capsys):
    source = matching_output / 'out' / 'matches'
    # The report's input: the matches, one partition again (duplicates) and a row that breaks the schema.
    matches_in = tmp_path / 'matches'
    shutil.copytree(source, matches_in)
    first = sorted(source.glob('*/part-*.parquet'))[0]
    (matches_in / 'copy').mkdir()
    shutil.copyfile(first, matches_in / 'copy' / 'part-00000.parquet')
    good = read_parquet_dataset(str(source))
    broken = good.slice(0, 1).to_pylist()[0] | {'candidate_id': 'C-BROKEN', 'score': 1.5}
    (matches_in / 'broken').mkdir()
    pq.write_table(pa.Table.from_pylist([broken], schema=good.schema), matches_in / 'broken' / 'part-00000.parquet')

    offers_path = matching_output / 'in' / 'offers.parquet'
    output, summary = _report(tmp_path, 'matching', '--matches', str(matches_in / '*' / 'part-*.parquet'),
                              '--offers', str(offers_path), '--top', str(TOP))

    # Independent recomputation from the matching pipeline's own output.
    rows = good.to_pylist()
    offers = {o['offer_id']: o for o in pq.read_table(offers_path).to_pylist()}
    by_offer = collections.defaultdict(list)
    for row in rows:
        by_offer[row['offer_id']].append(row)
    table = {r['offer_id']: r for r in _csv_equals_parquet(output, 'offers')}
    assert set(table) == set(offers)  # offers without a match are listed too
    for offer_id, offer in offers.items():
        mine = by_offer.get(offer_id, [])
        got = table[offer_id]
        assert got['title'] == offer['title'] and got['matches'] == len(mine)
        assert got['above_threshold'] == sum(r['score'] >= offer['minimum_match_score'] for r in mine)
        if mine:
            assert got['mean_score'] == pytest.approx(sum(r['score'] for r in mine) / len(mine), abs=1e-4)
            assert got['min_score'] == pytest.approx(min(r['score'] for r in mine), abs=1e-4)
            assert got['max_score'] == pytest.approx(max(r['score'] for r in mine), abs=1e-4)
        else:
            assert got['mean_score'] is None
    histogram = collections.Counter((r['offer_id'], min(math.floor(r['score'] * reports.BINS), reports.BINS - 1))
                                    for r in rows)
    distribution = _csv_equals_parquet(output, 'score_distribution')
    assert {(d['offer_id'], round(d['bin_low'] * reports.BINS)): d['candidates'] for d in distribution} == histogram
    top = _csv_equals_parquet(output, 'top_candidates')
    expected_top = []
    for offer_id in sorted(by_offer):
        best = sorted(by_offer[offer_id], key=lambda r: (-r['score'], r['candidate_id']))[:TOP]
        expected_top += [(offer_id, i + 1, r['candidate_id']) for i, r in enumerate(best)]
    assert [(t['offer_id'], t['position'], t['candidate_id']) for t in top] == expected_top
    weights = json.loads(rows[0]['weights'])
    for t in top:
        parts = [t[f'contribution_{c}'] for c in schemas.SCORE_COMPONENTS]
        assert sum(parts) == pytest.approx(t['score'], abs=1e-3)  # the explanation adds up to the score
        assert all(t[f'weight_{c}'] == pytest.approx(weights[c]) for c in schemas.SCORE_COMPONENTS)

    letters = _dead_letters(output)
    assert summary['dead_letters'] == len(letters) == pq.read_metadata(first).num_rows + 1
    assert sum('score' in letter['error'] and letter['step'] == 'ReadMatches' for letter in letters) == 1
    assert summary['records_read'] == len(rows) + pq.read_metadata(first).num_rows

    html = output / 'matching_report.html'
    text = html.read_text(encoding='utf-8')
    for candidate in pq.read_table(matching_output / 'in' / 'candidates.parquet').slice(0, 50).to_pylist():
        assert candidate['email'] not in text and candidate['last_name'] not in text  # ids only
    _check_page(html, 'matching', tmp_path, record_property, capsys)


# ---------------------------------------------------------------------------------------------
# Payroll
# ---------------------------------------------------------------------------------------------

def test_payroll_report_matches_the_control_totals_month_over_month(tmp_path, payroll_outputs, record_property,
                                                                     capsys):
    # A third directory repeats one partition of November's payslips and lines: counted once.
    extra = payroll_outputs / 'payroll-2026-11-again'
    for name in ('payslips', 'payslip_lines'):
        part = sorted((payroll_outputs / 'payroll-2026-11' / name).glob('*/part-*.parquet'))[0]
        (extra / name / part.parent.name).mkdir(parents=True)
        shutil.copyfile(part, extra / name / part.parent.name / part.name)
    repeated = pq.read_metadata(sorted((extra / 'payslips').glob('*/part-*.parquet'))[0]).num_rows
    try:
        output, summary = _report(tmp_path, 'payroll', '--payroll', str(payroll_outputs / 'payroll-2026-*'),
                                  '--buckets', '3')
    finally:
        shutil.rmtree(extra)

    months = {r['establishment_siret'] + r['period']: r for r in _csv_equals_parquet(output, 'establishment_months')}
    contributions = _csv_equals_parquet(output, 'contributions')
    expected = {}
    for period in MONTHS:
        out = payroll_outputs / f'payroll-{period}'
        controls = read_parquet_dataset(str(out / 'controls')).to_pylist()
        slips = read_parquet_dataset(str(out / 'payslips')).to_pylist()
        for site in {c['establishment_siret'] for c in controls}:
            mine = {c['item']: c['value'] for c in controls if c['establishment_siret'] == site}
            expected[site + period] = mine
            got = months[site + period]
            # The payroll pipeline's own control totals...
            assert got['headcount'] == mine['headcount']
            for name in ('gross', 'employer_cost', 'employee_contributions', 'employer_contributions', 'rgdu',
                         'net_pay', 'pas'):
                assert got[f'{name}_cents'] == mine[name], (site, period, name)
            # ... and a plain sum of the payslips.
            assert got['gross_cents'] == sum(s['gross_cents'] for s in slips if s['establishment_siret'] == site)
            for side in ('employee', 'employer'):
                by_rubric = {c['rubric']: c[f'{side}_cents'] for c in contributions
                             if c['establishment_siret'] == site and c['period'] == period}
                for item, value in mine.items():
                    if item.startswith(f'{side}:') and item.split(':', 1)[1] in by_rubric:
                        assert by_rubric[item.split(':', 1)[1]] == value, (site, period, item)
    assert set(months) == set(expected)
    for key, got in months.items():
        if got['period'] == '2026-11':
            before = expected.get(key[:-7] + '2026-10')
            assert got['previous_period'] == ('2026-10' if before else None)
            if before:
                assert got['gross_change_cents'] == got['gross_cents'] - before['gross']
                assert got['headcount_change'] == got['headcount'] - before['headcount']
                assert got['employer_cost_change_pct'] == pytest.approx(
                    100 * (got['employer_cost_cents'] - before['employer_cost']) / before['employer_cost'], abs=0.01)
        else:
            assert got['previous_period'] is None and got['gross_change_cents'] is None

    letters = _dead_letters(output)
    duplicated_slips = [letter for letter in letters if letter['error'].startswith('payslip of employee')]
    assert len(duplicated_slips) == repeated and summary['dead_letters'] == len(letters) > repeated
    assert not list((output / '.spill').glob('*/*')), 'the spilled rows are removed'
    _check_page(output / 'payroll_report.html', 'payroll', tmp_path, record_property, capsys)


# ---------------------------------------------------------------------------------------------
# Data quality
# ---------------------------------------------------------------------------------------------

def test_quality_report_counts_dead_letters_by_operation_step_and_reason_without_values(
        tmp_path, payroll_outputs, record_property, capsys):
    inputs = tmp_path / 'outputs'
    for period in MONTHS:
        shutil.copytree(payroll_outputs / f'payroll-{period}' / 'dead_letters', inputs / f'payroll-{period}' / 'dead_letters')
    handmade = inputs / 'matching-out' / 'dead_letters'
    handmade.mkdir(parents=True)
    records = [
        {'run_id': 'matching-20261204T084037Z-aa5a5a46', 'step': 'ReadCandidates', 'source': 'in/c.csv#row=3',
         'error': "email='jean.dupont@example.fr': must be an e-mail address", 'payload': '{}'},
        {'run_id': 'matching-20261204T084037Z-aa5a5a46', 'step': 'ReadCandidates', 'source': 'in/c.csv#row=9',
         'error': "email='marie@example': must be an e-mail address", 'payload': '{}'},
        {'run_id': 'custom-id', 'step': 'ReadOffers', 'source': 'in/o.csv#row=1',
         'error': 'latitude=nan: must be in [-90.0, 90.0]', 'payload': '{}'},
    ]
    lines = [json.dumps(r) for r in records] + ['this line is not JSON']
    (handmade / 'dead_letters-00000-of-00001.jsonl').write_text('\n'.join(lines) + '\n')
    (inputs / 'empty' / 'dead_letters').mkdir(parents=True)
    (inputs / 'empty' / 'dead_letters' / 'dead_letters-00000-of-00001.jsonl').write_text('')  # a clean run's file

    output, summary = _report(tmp_path, 'quality', '--dead_letters', str(inputs / '*' / 'dead_letters' / '*.jsonl'))

    read = [json.loads(line) for path in sorted(inputs.glob('*/dead_letters/*.jsonl'))
            for line in path.read_text().splitlines() if line.startswith('{')]
    assert len(read) > 3  # the payroll runs' dead letters are there
    expected = collections.Counter()
    for letter in read:
        operation = re.sub(r'-\d{8}T\d{6}Z-[0-9a-f]{8}$', '', letter['run_id'])
        if operation == letter['run_id']:  # not a generated run id: the name of the directory of its file
            operation = 'matching-out'
        expected[(operation, letter['step'])] += 1
    by_step = _csv_equals_parquet(output, 'dead_letters_by_step')
    assert {(r['operation'], r['step']): r['dead_letters'] for r in by_step} == expected
    by_reason = _csv_equals_parquet(output, 'dead_letters_by_reason')
    assert sum(r['dead_letters'] for r in by_reason) == len(read) == summary['records_read']
    email = [r for r in by_reason if r['step'] == 'ReadCandidates']
    assert email == [{'operation': 'matching', 'step': 'ReadCandidates', 'reason': "email='…': must be an e-mail address",
                      'dead_letters': 2}]
    html = output / 'quality_report.html'
    text = html.read_text(encoding='utf-8')
    for letter in read:
        for value in re.findall(r"'([^']+)'", letter['error']):
            assert value not in text  # no rejected value reaches the report
    assert 'jean.dupont' not in text and 'employee E' not in text
    letters = _dead_letters(output)
    assert len(letters) == summary['dead_letters'] == 1 and letters[0]['step'] == 'ReadDeadLetters'
    _check_page(html, 'quality', tmp_path, record_property, capsys)


# ---------------------------------------------------------------------------------------------
# The checks can fail; bad launches are refused
# ---------------------------------------------------------------------------------------------

def test_a_page_with_a_script_error_or_an_undrawn_chart_is_detected(tmp_path):
    good = report_html.page(title='t', subtitle='s', meta='m', body=report_html.figure(
        report_html.bar_chart(['a', 'b'], [1, 2], title='c'), 'c'))
    page = tmp_path / 'good.html'
    page.write_text(good)
    assert page_problems(good, _browse(page, tmp_path / 'good.png')) == []

    broken = good.replace('</body>', '<script>callsSomethingThatDoesNotExist();</script></body>')
    page.write_text(broken)
    problems = page_problems(broken, _browse(page, tmp_path / 'broken.png'))
    assert any('callsSomethingThatDoesNotExist' in p for p in problems), problems

    undrawn = good.replace('class="mark"', 'class="nomark"')
    page.write_text(undrawn)
    assert any('chart not rendered' in p for p in page_problems(undrawn, _browse(page, tmp_path / 'undrawn.png')))

    remote = good.replace('</head>', '<link rel="stylesheet" href="https://cdn.example.com/x.css"></head>')
    assert any('references https://' in p for p in page_problems(remote, ''))


@pytest.mark.parametrize('args, message', [
    (['--kind', 'budget'], "--kind='budget': must be one of matching, payroll, quality"),
    (['--kind', 'matching'], '--kind matching needs --matches'),
    (['--kind', 'matching', '--matches', '/nowhere/*.parquet'], r"--matches='/nowhere/\*\.parquet'.*matches no file"),
    (['--kind', 'payroll', '--payroll', '/nowhere/payroll-*'], "--payroll=.*matches no file.*payslips/"),
    (['--kind', 'quality', '--dead_letters', '/nowhere/*.jsonl'], "--dead_letters='/nowhere/\\*.jsonl' matches no file"),
    (['--kind', 'matching', '--matches', 'x.parquet', '--payroll', 'out/*'],
     '--payroll is an option of --kind payroll, not of --kind matching'),
])
def test_bad_launches_fail_naming_the_option(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        reports.run([*args, '--output', str(tmp_path / 'out')])

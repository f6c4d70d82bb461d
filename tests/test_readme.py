"""The README's two commands stay true: .ci/run runs the second, and the demo of the first works."""
import pathlib
import re
import sqlite3

import pyarrow.parquet as pq

from pipelines import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / 'README.md').read_text()
    head = text.split('\n## ', 1)[0]
    return re.findall(r'```bash\n(.*?)\n```', head, flags=re.S)


def test_readme_starts_with_exactly_two_commands_and_ci_runs_the_second():
    commands = _readme_commands()
    assert len(commands) == 2 and all('\n' not in c for c in commands)
    install_and_demo, install_and_test = commands
    assert install_and_demo.endswith('hrbatch demo') and '--no-deps -r requirements.txt' in install_and_demo
    ci_lines = [line.strip() for line in (ROOT / '.ci' / 'run').read_text().splitlines()]
    assert install_and_test in ci_lines
    assert 'pytest' in install_and_test


def test_demo_generates_data_runs_matching_and_prints_where_results_are(tmp_path, capsys):
    assert cli.main(['demo', '--output', str(tmp_path), '--candidates', '400', '--offers', '15']) == 0
    out = capsys.readouterr().out
    assert 'Matches (Parquet)' in out and str(tmp_path / 'output' / 'matches') in out
    assert (tmp_path / 'input' / 'candidates.parquet').exists()
    parquet_rows = sum(pq.read_metadata(p).num_rows for p in (tmp_path / 'output' / 'matches').rglob('*.parquet'))
    with sqlite3.connect(tmp_path / 'output' / 'hrbatch.db') as db:
        (sql_rows,) = db.execute('SELECT COUNT(*) FROM matches').fetchone()
    assert parquet_rows == sql_rows > 0
    assert f'matches written {parquet_rows:>14,}'.replace(' ', '') in out.replace(' ', '')

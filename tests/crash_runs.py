"""Helpers of the tests that stop a real run midway (kill, Ctrl-C, cancel) and rerun it."""
import pathlib
import sqlite3
import time


def wait_for_commits(output: pathlib.Path, count: int, process, timeout: float = 60.0) -> None:
    """Returns once ``count`` read tasks are committed (their markers exist) or the run has ended."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if len(list((output / '.checkpoints').glob('*/*.done.json'))) >= count:
            return
        time.sleep(0.01)


def matching_result(output: pathlib.Path):
    """The published result of a matching run: every matches file (name and bytes) and every
    database row."""
    files = {str(p.relative_to(output / 'matches')): p.read_bytes()
             for p in sorted((output / 'matches').glob('*/part-*.parquet'))}
    with sqlite3.connect(output / 'hrbatch.db') as db:
        rows = sorted(db.execute('SELECT * FROM matches').fetchall())
    return files, rows

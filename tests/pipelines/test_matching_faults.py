"""kill -9 the matching pipeline at seeded points, resume it, and get exactly a clean run's result."""
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

from pipelines import generate
from tests.crash_runs import matching_result
from tests.crash_runs import wait_for_commits
from transforms import ledger

SEED = 20261203
KILLS = 10


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp('data')
    # Small row groups: 16 read tasks, so kills land before, between and after task commits.
    generate.generate(str(directory), candidates=4000, offers=60, seed=3, chunk_rows=250)
    return directory


def _command(data, output: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, '-m', 'pipelines.matching', '--candidates', str(data / 'candidates.parquet'),
            '--offers', str(data / 'offers.parquet'), '--output', str(output), '--run_key', 'matching:faults',
            '--top_k', '7', '--pair_budget', '20000', '--direct_num_workers', '2',
            '--direct_running_mode', 'multi_processing', *extra]


def _start(command):
    # A session of its own: the kill takes the workers down with the launcher, as a lost machine would.
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, 'PYTHONWARNINGS': 'ignore'}, start_new_session=True)


def test_killed_runs_resume_to_exactly_the_cleanmatching_result(tmp_path, data):
    clean = tmp_path / 'clean'
    started = time.monotonic()
    assert subprocess.run(_command(data, clean), capture_output=True).returncode == 0
    clean_seconds = time.monotonic() - started
    expected = matching_result(clean)
    assert expected[0] and expected[1]

    rng = random.Random(SEED)
    killed_before_end = resumed_work = 0
    for attempt in range(KILLS):
        output = tmp_path / f'killed-{attempt}'
        process = _start(_command(data, output))
        if attempt % 2:
            time.sleep(rng.uniform(0.3, clean_seconds))  # a seeded moment: any stage, launch included
        else:
            wait_for_commits(output, rng.randint(1, 16), process)  # a seeded number of committed tasks
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            killed_before_end += 1
        process.wait()
        resumed = subprocess.run(_command(data, output, '--resume'), capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        resumed_work += "were committed by the run that died" in resumed.stdout
        assert matching_result(output) == expected, f'kill point {attempt} gave another result'
        runs = ledger.RunLedger(f'sqlite:///{output}/hrbatch.db').list()
        assert runs[0].state == 'succeeded'
        assert not list((output / '.checkpoints').rglob('*.json'))
    # The seeded points must really interrupt runs, not only land after them.
    assert killed_before_end >= KILLS // 2
    # And the resumed runs really skipped the work the killed runs had committed.
    assert resumed_work >= KILLS // 2

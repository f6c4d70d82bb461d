"""The migration pipeline: candidates v1 -> v2 end to end, row by row, idempotent, dry run, controls, resume."""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that
from apache_beam.testing.util import equal_to

from pipelines import migration
from tests import sample_records
from tests.crash_runs import wait_for_commits
from transforms import migrations
from transforms import schemas
from transforms.errors import ConfigError
from transforms.keyed_write import read_parquet_dataset
from transforms.read import ReadRecords

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

JAVA = '19a8293b-8e95-4de3-983f-77484079c389'
PYTHON = 'ccd0a1d9-afda-43d9-b901-96344886e14d'
SQL = '598de5b0-5b58-4ea7-8058-a4bc4d18c742'
ENGLISH = '6d3edede-8951-4621-a835-e04323300fa0'
SPREADSHEETS = '1973c966-f236-40c9-b2d4-5d71a89019be'

# (full_name, phone as typed, old skill codes) -> (first_name, last_name, E.164 phone, ESCO skills)
GOOD = [
    ('Jean-Pierre DE LA FONTAINE', '06 12 34 56 78', ['INF-JAVA', 'INF-JEE', 'INF-PY'],
     ('Jean-Pierre', 'DE LA FONTAINE', '+33612345678', [JAVA, PYTHON])),
    ('  marie   de la tour ', '+33 (0)6 12 34 56 79', [' inf-sql '], ('Marie', 'DE LA TOUR', '+33612345679', [SQL])),
    ('JEAN DUPONT', '0033 1 23 45 67 89', [], ('Jean', 'DUPONT', '+33123456789', [])),
    ('Élodie ÉTIENNE-MARTIN', None, ['LNG-EN', 'LNG-EN'], ('Élodie', 'ÉTIENNE-MARTIN', None, [ENGLISH])),
    ("Aïcha N'DIAYE", '+44 20 7946 0958', ['BUR-TABLEUR'], ('Aïcha', "N'DIAYE", '+442079460958', [SPREADSHEETS])),
    ('Jean P. DUPONT', '06.12.34.56.80', ['INF-PY', 'INF-JAVA'], ('Jean P.', 'DUPONT', '+33612345680', [PYTHON, JAVA])),
    ('anne marie lefèvre', '0612345681', ['LNG-EN'], ('Anne Marie', 'LEFÈVRE', '+33612345681', [ENGLISH])),
    ('Anne Le GALL', '+33612345682', [], ('Anne', 'LE GALL', '+33612345682', [])),
]
# (full_name, phone, codes, email) -> the words its dead letter must hold, by step
BAD = [
    ('Madonna', '0612345690', ['INF-PY'], None, {'MigrateCandidatesV1ToV2': ['full_name', 'one word']}),
    ('   ', '0612345691', [], None, {'MigrateCandidatesV1ToV2': ['full_name: empty']}),
    ('Paul MARTIN', '12 34', [], None, {'MigrateCandidatesV1ToV2': ["phone: '12 34'"]}),
    ('Léa ROUX', '0612345692', ['INF-PY', 'XX-OLD'], None, {'MigrateCandidatesV1ToV2': ["unknown old codes ['XX-OLD']"]}),
    ('Cher', 'abc', ['NOPE'], None, {'MigrateCandidatesV1ToV2': ['one word', "phone: 'abc'", "['NOPE']"]}),
    ('Hugo BLANC', '0612345693', [], 'not-an-email', {'ReadCandidatesV1': ['email']}),
]


def v1_record(i: int, full_name, phone, codes, email=None) -> dict:
    record = sample_records.candidate(i)
    for name in ('first_name', 'last_name', 'skills'):
        del record[name]
    record.update(full_name=full_name, phone=phone, skill_codes=codes)
    if email is not None:
        record['email'] = email
    return record


def write_v1(directory: pathlib.Path, records: list[dict], row_group_size: int = 4, name='part-00000.parquet'):
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(records, schema=migrations.CANDIDATES_V1.arrow_schema())
    pq.write_table(table, directory / name, row_group_size=row_group_size)  # no version marker: version 1
    return directory


@pytest.fixture
def v1(tmp_path):
    records = [v1_record(i, *case[:3]) for i, case in enumerate(GOOD)]
    records += [v1_record(100 + i, *case[:4]) for i, case in enumerate(BAD)]
    return write_v1(tmp_path / 'in' / 'candidates', records), records


def _args(source, output, *extra):
    return ['--dataset', 'candidates', '--from', '1', '--to', '2', '--input', str(source), '--output', str(output),
            '--buckets', '3', *extra]


def _dead_letters(output: pathlib.Path) -> list[dict]:
    return [json.loads(line) for path in sorted((output / 'dead_letters').glob('*.jsonl'))
            for line in path.read_text(encoding='utf-8').splitlines()]


def _files(output: pathlib.Path) -> dict:
    return {str(p.relative_to(output)): p.read_bytes()
            for p in sorted([*(output / 'candidates').glob('*/part-*.parquet'), output / 'controls.json'])}


def test_every_row_is_migrated_exactly_and_bad_rows_are_dead_lettered_with_their_reasons(tmp_path, v1,
                                                                                          test_pipeline):
    source, _ = v1
    output = tmp_path / 'out'
    summary = migration.run(_args(source, output))
    assert summary['rows_read'] == len(GOOD) + len(BAD) and summary['rows_migrated'] == len(GOOD)
    rows = {row['candidate_id']: row for row in read_parquet_dataset(str(output / 'candidates')).to_pylist()}
    assert len(rows) == len(GOOD)
    for i, (*_, (first, last, phone, skills)) in enumerate(GOOD):
        expected = sample_records.candidate(i, first_name=first, last_name=last, phone=phone, skills=skills)
        assert rows[expected['candidate_id']] == expected
    letters = {json.loads(letter['payload'])['candidate_id']: letter for letter in _dead_letters(output)}
    assert len(letters) == len(BAD) == summary['dead_letters']
    for i, (*_, reasons) in enumerate(BAD):
        letter = letters[f'cand-{100 + i:03d}']
        (step, words), = reasons.items()
        assert letter['step'] == step and all(word in letter['error'] for word in words), letter['error']
        assert letter['source'].endswith(f'part-00000.parquet#row={len(GOOD) + i}')
    # Every file says it holds version 2, and reads back as canonical candidates without a rejection.
    for path in (output / 'candidates').glob('*/part-*.parquet'):
        metadata = pq.read_schema(path).metadata
        assert metadata[b'hrbatch.dataset_version'] == b'2' and metadata[b'hrbatch.dataset'] == b'candidates'
    with test_pipeline() as p:
        read = p | ReadRecords(file_pattern=str(output / 'candidates' / '*' / 'part-*.parquet'),
                               schema=schemas.CANDIDATES)
        assert_that(read.dead_letters, equal_to([]), label='NoRejection')
        assert_that(read.records | beam.Map(lambda b: b.num_rows) | beam.CombineGlobally(sum),
                    equal_to([len(GOOD)]), label='AllRows')


def test_control_totals_add_up(tmp_path, v1):
    source, records = v1
    output = tmp_path / 'out'
    migration.run(_args(source, output))
    controls = json.loads((output / 'controls.json').read_text())
    before, after, dead = controls['before'], controls['after'], controls['dead_lettered']
    assert controls['balanced'] and all(controls['checks'].values())
    assert before['rows'] == len(records) == after['rows'] + dead['dead_letters'] == after['rows'] + dead['rows']
    assert before['rows_per_file'] == {'part-00000.parquet': len(records)}
    partitions = {p.parent.name: pq.read_metadata(p).num_rows for p in (output / 'candidates').glob('*/part-*.parquet')}
    assert after['rows_per_partition'] == partitions and sum(partitions.values()) == len(GOOD)
    assert after['non_null']['first_name'] == after['non_null']['last_name'] == len(GOOD)
    assert after['non_null']['phone'] == sum(1 for case in GOOD if case[3][2] is not None)
    assert before['non_null']['phone'] == sum(1 for r in records if r['phone'] is not None)
    good_salaries = sum(r['expected_salary'] for r in records[:len(GOOD)])
    assert after['sums']['expected_salary'] == pytest.approx(good_salaries)
    assert before['sums']['expected_salary'] == pytest.approx(sum(r['expected_salary'] for r in records))
    assert before['sums']['latitude'] == pytest.approx(after['sums']['latitude'] + dead['sums']['latitude'])


def test_a_rerun_rewrites_identical_bytes_and_the_data_is_then_at_version_2(tmp_path, v1):
    source, _ = v1
    output = tmp_path / 'out'
    migration.run(_args(source, output))
    first = _files(output)
    assert migration.run(_args(source, output))['skipped'] is True
    migration.run(_args(source, output, '--force'))
    assert _files(output) == first
    # The migrated dataset is at version 2: migrating it from 1 fails at launch and says so.
    with pytest.raises(ConfigError, match=r'is at candidates version 2 .*not at --from=1.*already there'):
        migration.run(_args(output / 'candidates', tmp_path / 'again'))
    assert not (tmp_path / 'again').exists()


@pytest.mark.parametrize('argv, message', [
    (['--to', '3'], r'no declared migration step leads from candidates version 1 to version 3'),
    (['--from', '2', '--to', '3'], r'is at candidates version 1 .*not at --from=2; pass --from=1'),
    (['--from', '2', '--to', '1'], r'--to must be above --from'),
])
def test_a_migration_the_data_or_the_steps_cannot_do_fails_at_launch(tmp_path, v1, argv, message):
    source, _ = v1
    with pytest.raises(ConfigError, match=message):
        migration.run(_args(source, tmp_path / 'out', *argv))
    assert not (tmp_path / 'out').exists()


def test_unmarked_version_2_files_and_mixed_versions_fail_at_launch(tmp_path, v1):
    source, _ = v1
    current = tmp_path / 'current'
    current.mkdir()
    pq.write_table(pa.Table.from_pylist([sample_records.candidate(1)], schema=schemas.CANDIDATES.arrow_schema()),
                   current / 'part-00000.parquet')
    with pytest.raises(ConfigError, match=r"no hrbatch.dataset_version marker.*lacks the fields \['full_name'.*"
                                          r'fields of version 2'):
        migration.run(_args(current, tmp_path / 'out'))
    output = tmp_path / 'out'
    migration.run(_args(source, output))
    mixed = tmp_path / 'mixed'
    mixed.mkdir()
    (mixed / 'part-00000.parquet').write_bytes((source / 'part-00000.parquet').read_bytes())
    migrated = next((output / 'candidates').glob('*/part-*.parquet'))
    (mixed / 'b').mkdir()
    (mixed / 'b' / 'part-00000.parquet').write_bytes(migrated.read_bytes())
    with pytest.raises(ConfigError, match=r'mixes versions of candidates \(version 1: 1 files.*version 2: 1 files'):
        migration.run(_args(mixed, tmp_path / 'out2'))
    with pytest.raises(ConfigError, match='would overlap the input'):
        migration.run(_args(source, source.parent))


def test_the_plan_changes_nothing_and_masks_personal_data(tmp_path, v1, capsys):
    source, records = v1
    before = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
    summary = migration.run(_args(source, tmp_path / 'out', '--plan', '--plan_sample', '20'))
    printed = capsys.readouterr().out
    assert {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()} == before
    assert not (tmp_path / 'out').exists()
    assert summary['rows_migrated'] == len(GOOD) and summary['rows_dead_lettered'] == len(BAD)
    assert f'{len(GOOD) + len(BAD)} rows in 1 files: {len(GOOD)} would be migrated, {len(BAD)} dead-lettered' in printed
    assert 'dead letters of MigrateCandidatesV1ToV2 naming phone: 2' in printed
    assert 'full_name J.-P. D. L. F. -> first_name J.-P., last_name D. L. F.' in printed
    assert 'phone 0* ** ** ** 78 -> +33 6** ** ** 78' in printed
    # No name, e-mail or phone number of the input appears, as typed or normalised.
    personal = set()
    for record in records:
        personal.add(record['email'])
        personal.update(word for word in (record['full_name'] or '').split() if len(word) > 2)
        if record['phone']:
            personal.update({record['phone'], record['phone'].replace(' ', '')})
    personal.update(case[3][0] for case in GOOD)
    personal.update(case[3][1] for case in GOOD)
    personal.update(case[3][2] for case in GOOD if case[3][2])
    leaked = sorted(value for value in personal if value and value in printed)
    assert not leaked


# ------------------------------------------------------------------------------------------------
# Crash and resume

SEED = 20261204
KILLS = 4
_RUN = 'import sys; from pipelines import migration; migration.run(sys.argv[1:])'


@pytest.fixture(scope='module')
def big_v1(tmp_path_factory):
    rng = random.Random(7)
    codes = [line.split(',')[0] for line in migrations.SKILL_CODES_CSV.read_text().splitlines()[1:]]
    records = []
    for i in range(3000):
        name = rng.choice(['Jean-Pierre DE LA FONTAINE', 'marie curie', 'Paul MARTIN', 'Madonna'])
        phone = rng.choice([f'06 12 34 {i // 100 % 100:02d} {i % 100:02d}', None, '12 34', f'+33 (0)7 00 00 {i % 100:02d} 11'])
        record = v1_record(i, name, phone, rng.sample(codes + ['XX-OLD'], 2))
        record['candidate_id'] = f'cand-{i:05d}'
        records.append(record)
    directory = tmp_path_factory.mktemp('big') / 'candidates'
    return write_v1(directory, records, row_group_size=200)  # 15 read tasks


def _command(source, output, *extra):
    return [sys.executable, '-c', _RUN, *_args(source, output, '--run_key', 'migration:faults',
                                              '--direct_num_workers', '2', '--direct_running_mode',
                                              'multi_processing', *extra)]


def _letters(output):
    return sorted((letter['step'], letter['error'], letter['payload'], letter['source'])
                  for letter in _dead_letters(output))


def test_a_killed_run_resumes_to_exactly_the_clean_result(tmp_path, big_v1):
    clean = tmp_path / 'clean'
    done = subprocess.run(_command(big_v1, clean), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    expected, expected_letters = _files(clean), _letters(clean)
    assert len(expected) > 1 and expected_letters
    rng = random.Random(SEED)
    killed = resumed_work = 0
    for attempt in range(KILLS):
        output = tmp_path / f'killed-{attempt}'
        process = subprocess.Popen(_command(big_v1, output), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, 'PYTHONWARNINGS': 'ignore'}, start_new_session=True)
        wait_for_commits(output, rng.randint(1, 14), process)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            killed += 1
        process.wait()
        resumed = subprocess.run(_command(big_v1, output, '--resume'), capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        resumed_work += 'were committed by the run that died' in resumed.stdout
        assert _files(output) == expected, f'kill point {attempt} gave another result'
        assert _letters(output) == expected_letters
        assert not list((output / '.checkpoints').rglob('*.json'))
    assert killed >= KILLS // 2 and resumed_work >= KILLS // 2

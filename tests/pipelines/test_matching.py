"""The matching pipeline end to end, on generated data and on bad inputs."""
import filecmp
import json
import math
import os
import sqlite3
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import generate
from pipelines import matching
from transforms import schemas
from transforms import scoring
from transforms.errors import ConfigError
from transforms.keyed_write import read_parquet_dataset

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp('data')
    generate.generate(str(directory), candidates=600, offers=25, seed=11, formats=generate.FORMATS)
    return directory


def _run(tmp_path, candidates, offers, *extra, name='out', force=True):
    """Runs matching into ``tmp_path / name``; ``force``: recompute even if the run key succeeded."""
    output = tmp_path / name
    summary = matching.run(['--candidates', str(candidates), '--offers', str(offers), '--output', str(output),
                            *(['--force'] if force else []), *extra])
    return output, summary


def _expected(candidates_path, offers_path, top_k):
    """The matches computed directly by the scoring kernel on the whole input."""
    config = scoring.ScoringConfig.create(top_k=top_k)
    index = scoring.OfferIndex.build(pq.read_table(offers_path).sort_by('offer_id'))
    parts = [block for batch in pq.read_table(candidates_path).to_batches(max_chunksize=97)
             for _, block in scoring.score_candidates(batch, index, config)]
    merged = scoring.merge_top_k(parts, top_k) if top_k else pa.concat_batches(parts)
    return scoring.to_match_rows(merged, config, ranked=bool(top_k))


def _rows(table, columns=('offer_id', 'candidate_id', 'score', 'rank')):
    return sorted(tuple(r[c] for c in columns) for r in table.to_pylist())


@pytest.mark.parametrize('top_k', [None, 5])
def test_matches_equal_the_kernel_on_the_whole_input_in_parquet_and_sqlite(tmp_path, data, top_k):
    extra = ['--top_k', str(top_k)] if top_k else []
    output, summary = _run(tmp_path, data / 'candidates.parquet', data / 'offers.parquet', *extra,
                           '--batch_rows', '128', '--pair_budget', '999')
    expected = _expected(data / 'candidates.parquet', data / 'offers.parquet', top_k)
    written = read_parquet_dataset(str(output / 'matches'))
    assert expected.num_rows > 0
    assert _rows(written) == _rows(expected)
    assert written.schema.names == list(schemas.MATCHES.names)
    with sqlite3.connect(output / 'hrbatch.db') as db:
        sql_rows = sorted(db.execute('SELECT offer_id, candidate_id, score, rank FROM matches').fetchall())
    assert [(o, c, r) for o, c, _, r in sql_rows] == [(o, c, r) for o, c, _, r in _rows(written)]
    assert all(math.isclose(a[2], b[2], rel_tol=1e-6) for a, b in zip(sql_rows, _rows(written)))
    assert summary['candidates_read'] == 600 and summary['offers_read'] == 25
    assert summary['pairs_scored'] == 600 * 25
    assert summary['matches_written'] == expected.num_rows
    assert summary['dead_letters'] == 0
    # Every match explains itself: components in [0, 1] and the weights used.
    row = written.to_pylist()[0]
    assert json.loads(row['weights']) == json.loads(scoring.ScoringConfig.create().weights_json())
    assert all(0 <= row[f'score_{c}'] <= 1 for c in schemas.SCORE_COMPONENTS)


def test_every_input_format_gives_the_same_matches(tmp_path, data):
    results = {}
    for fmt in generate.FORMATS:
        output, _ = _run(tmp_path, data / f'candidates.{fmt}', data / f'offers.{fmt}', '--top_k', '3',
                         '--database', 'none', name=fmt)
        results[fmt] = _rows(read_parquet_dataset(str(output / 'matches')))
    assert results['parquet']
    assert results['avro'] == results['csv'] == results['jsonl'] == results['parquet']


def test_running_twice_leaves_the_same_rows_and_byte_identical_files(tmp_path, data):
    args = (data / 'candidates.parquet', data / 'offers.parquet', '--top_k', '4')
    output, _ = _run(tmp_path, *args, name='first')
    files = sorted(p.relative_to(output / 'matches') for p in (output / 'matches').rglob('*.parquet'))
    before = [(output / 'matches' / f).read_bytes() for f in files]
    with sqlite3.connect(output / 'hrbatch.db') as db:
        rows_before = sorted(db.execute('SELECT * FROM matches').fetchall())
    _run(tmp_path, *args, name='first')
    after_files = sorted(p.relative_to(output / 'matches') for p in (output / 'matches').rglob('*.parquet'))
    assert after_files == files
    assert [(output / 'matches' / f).read_bytes() for f in files] == before
    with sqlite3.connect(output / 'hrbatch.db') as db:
        assert sorted(db.execute('SELECT * FROM matches').fetchall()) == rows_before
    # A second, separate output from the same input is byte-identical too.
    other, _ = _run(tmp_path, *args, name='second')
    comparison = filecmp.dircmp(output / 'matches', other / 'matches')
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only


def _write_offers(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=schemas.OFFERS.arrow_schema()), path)


def _write_candidates(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=schemas.CANDIDATES.arrow_schema()), path)


def _dead_letters(output):
    lines = []
    for path in sorted((output / 'dead_letters').glob('*.jsonl')):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line]
    return lines


def test_bad_records_go_to_dead_letters_and_every_valid_record_is_scored(tmp_path, data):
    candidates = pq.read_table(data / 'candidates.parquet').slice(0, 40).to_pylist()
    offers = pq.read_table(data / 'offers.parquet').to_pylist()
    candidates[3]['latitude'] = float('nan')
    candidates[5]['skills'] = candidates[5]['skills'] + ['not-an-esco-skill']
    candidates[7] = {**candidates[8], 'first_name': 'Copy'}  # same candidate_id as row 8, earlier
    offers[2]['minimum_match_score'] = 1.5
    offers[4]['employer_siret'] = '12345678901234'
    _write_candidates(tmp_path / 'c.parquet', candidates)
    _write_offers(tmp_path / 'o.parquet', offers)
    output, summary = _run(tmp_path, tmp_path / 'c.parquet', tmp_path / 'o.parquet', '--database', 'none')

    letters = {(d['step'], d['source'].rsplit('#', 1)[1]): d for d in _dead_letters(output)}
    assert set(letters) == {('ReadCandidates', 'row=3'), ('ReadCandidates', 'row=5'),
                            ('DropDuplicateCandidates', 'row=8'), ('ReadOffers', 'row=2'), ('ReadOffers', 'row=4')}
    assert 'latitude' in letters[('ReadCandidates', 'row=3')]['error']
    assert 'not-an-esco-skill' in letters[('ReadCandidates', 'row=5')]['error']
    assert 'minimum_match_score' in letters[('ReadOffers', 'row=2')]['error']
    assert 'employer_siret' in letters[('ReadOffers', 'row=4')]['error']
    assert candidates[8]['candidate_id'] in letters[('DropDuplicateCandidates', 'row=8')]['error']
    assert all(d['run_id'] == summary['run_id'] and d['payload'] for d in letters.values())
    assert summary['dead_letters'] == 5
    # The 37 valid, distinct candidates (40 less rows 3, 5 and the repeat at 8) met the 23 valid offers.
    assert summary['pairs_scored'] == 37 * 23
    valid_offers = {o['offer_id'] for i, o in enumerate(offers) if i not in (2, 4)}
    written = read_parquet_dataset(str(output / 'matches'))
    assert set(written.column('offer_id').to_pylist()) <= valid_offers
    kept = {c['candidate_id'] for i, c in enumerate(candidates) if i not in (3, 5, 8)}
    assert set(written.column('candidate_id').to_pylist()) <= kept


@pytest.mark.parametrize('case, expected', [
    ('missing', 'no file'),
    ('empty', 'empty'),
    ('corrupt', 'corrupt'),
    ('wrong_schema', 'latitude'),
])
def test_unusable_inputs_fail_at_launch_naming_the_input(tmp_path, data, case, expected):
    bad = tmp_path / 'candidates.parquet'
    if case == 'empty':
        bad.write_bytes(b'')
    elif case == 'corrupt':
        bad.write_bytes(b'PAR1 this is not a parquet file at all' * 10)
    elif case == 'wrong_schema':
        pq.write_table(pq.read_table(data / 'candidates.parquet').drop(['latitude']), bad)
    with pytest.raises(ConfigError) as caught:
        _run(tmp_path, bad, data / 'offers.parquet')
    message = str(caught.value)
    assert 'candidates.parquet' in message and expected in message.lower()


@pytest.mark.parametrize('args, expected', [
    (['--top_k', '0'], '--top_k'),
    (['--weights', '{"colour": 1}'], 'colour'),
    (['--weights', 'not json'], '--weights'),
    (['--max_distance_km', 'far'], '--max_distance_km'),
    (['--no_such_option', '1'], 'unknown option --no_such_option'),
    (['--database', 'mysql://x'], '--database'),
])
def test_bad_options_fail_at_launch_with_a_clear_message(tmp_path, data, args, expected):
    with pytest.raises(ConfigError, match=expected.replace('{', r'\{').replace('}', r'\}')):
        _run(tmp_path, data / 'candidates.parquet', data / 'offers.parquet', *args)


def test_cli_reports_configuration_errors_and_module_entry_point_runs(tmp_path, data):
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    bad = subprocess.run([sys.executable, '-m', 'pipelines.cli', 'run', 'matching', '--candidates', 'x',
                          '--offers', 'y', '--output', str(tmp_path), '--frobnicate'],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and 'unknown option --frobnicate' in bad.stderr
    good = subprocess.run([sys.executable, '-m', 'pipelines.matching', '--candidates',
                           str(data / 'candidates.parquet'), '--offers', str(data / 'offers.parquet'),
                           '--output', str(tmp_path / 'cli'), '--top_k', '2'],
                          capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stderr
    assert 'pairs scored' in good.stdout and str(tmp_path / 'cli' / 'matches') in good.stdout


def test_matches_upserted_into_postgresql_equal_the_parquet_output_and_survive_a_rerun(tmp_path, data, postgres_url):
    args = (data / 'candidates.parquet', data / 'offers.parquet', '--top_k', '3', '--database', postgres_url)
    output, _ = _run(tmp_path, *args)
    import psycopg
    with psycopg.connect(postgres_url) as conn:
        first = sorted(conn.execute('SELECT offer_id, candidate_id, rank FROM matches').fetchall())
    _run(tmp_path, *args)
    with psycopg.connect(postgres_url) as conn:
        second = sorted(conn.execute('SELECT offer_id, candidate_id, rank FROM matches').fetchall())
    parquet = sorted((r['offer_id'], r['candidate_id'], r['rank'])
                     for r in read_parquet_dataset(str(output / 'matches')).to_pylist())
    assert first == second == parquet and parquet


def test_inputs_and_outputs_on_gcs_give_the_same_results_as_local_files(tmp_path, data, gcs_emulator):
    bucket = gcs_emulator.create_bucket('hrbatch-matching')
    candidates = gcs_emulator.upload_file(data / 'candidates.parquet', f'gs://{bucket}/in/candidates.parquet')
    offers = gcs_emulator.upload_file(data / 'offers.csv', f'gs://{bucket}/in/offers.csv')
    # A second offers file repeating the first offer: the copy goes to the dead letters.
    repeated = b''.join((data / 'offers.csv').read_bytes().splitlines(keepends=True)[:2])
    gcs_emulator.upload_bytes(repeated, f'gs://{bucket}/in/repeated-offers.csv')
    output = f'gs://{bucket}/out'
    ledger = f'sqlite:///{tmp_path}/ledger.db'
    with pytest.raises(ConfigError, match='--ledger is required when --output is on gs://'):
        matching.run(['--candidates', candidates, '--offers', offers, '--output', output])
    remote = matching.run(['--candidates', candidates, '--offers', f'gs://{bucket}/in/*offers*', '--output', output,
                           '--top_k', '3', '--database', 'none', '--ledger', ledger])
    local_offers = tmp_path / 'offers'
    local_offers.mkdir()
    os.symlink(data / 'offers.csv', local_offers / 'offers.csv')
    (local_offers / 'repeated-offers.csv').write_bytes(repeated)
    local, _ = _run(tmp_path, data / 'candidates.parquet', local_offers / '*offers*', '--top_k', '3',
                    '--database', 'none')
    assert _rows(read_parquet_dataset(f'{output}/matches')) == _rows(read_parquet_dataset(str(local / 'matches')))
    letters = [json.loads(line) for blob in gcs_emulator.client.list_blobs(bucket, prefix='out/dead_letters/')
               for line in blob.download_as_text().splitlines()]
    assert [(d['step'], d['source'].replace(f'gs://{bucket}/in/', '')) for d in letters] == [
        (d['step'], os.path.basename(d['source'])) for d in _dead_letters(local)]
    assert remote['matches_written'] > 0 and remote['dead_letters'] == len(letters) == 1
    # The run is in the ledger, and its checkpoints on GCS were removed when it succeeded.
    assert not list(gcs_emulator.client.list_blobs(bucket, prefix='out/.checkpoints/'))
    again = matching.run(['--candidates', candidates, '--offers', f'gs://{bucket}/in/*offers*', '--output', output,
                          '--top_k', '3', '--database', 'none', '--ledger', ledger])
    assert again == {"skipped": True, "run_key": again["run_key"]}


def test_the_first_occurrence_of_an_id_is_kept_even_when_it_is_itself_rejected(tmp_path, data):
    candidates = pq.read_table(data / 'candidates.parquet').slice(0, 10).to_pylist()
    candidates[6] = {**candidates[2], 'latitude': float('nan')}  # an invalid copy, later in the file
    candidates[1] = {**candidates[2], 'longitude': float('nan')}  # an invalid copy, first in the file
    _write_candidates(tmp_path / 'c.parquet', candidates)
    output, summary = _run(tmp_path, tmp_path / 'c.parquet', data / 'offers.parquet', '--database', 'none')
    letters = sorted((d['step'], d['source'].rsplit('#', 1)[1]) for d in _dead_letters(output))
    # Row 1 holds the id first and is rejected for its longitude; row 2, valid, repeats that id and
    # is dropped as a duplicate (a person decides which copy is right); row 6 fails validation first.
    assert letters == [('DropDuplicateCandidates', 'row=2'), ('ReadCandidates', 'row=1'), ('ReadCandidates', 'row=6')]
    assert summary['pairs_scored'] == 7 * 25

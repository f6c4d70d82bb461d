"""Migration steps, version rule and masking, without Beam."""
import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import sample_records
from transforms import migrations
from transforms import schemas
from transforms import taxonomy
from transforms.errors import ConfigError

JAVA = '19a8293b-8e95-4de3-983f-77484079c389'
PYTHON = 'ccd0a1d9-afda-43d9-b901-96344886e14d'


@pytest.mark.parametrize('full_name, first, last', [
    ('Jean-Pierre DE LA FONTAINE', 'Jean-Pierre', 'DE LA FONTAINE'),   # trailing capitals
    ('Anne Marie DUPONT', 'Anne Marie', 'DUPONT'),
    ('Jean P. DUPONT', 'Jean P.', 'DUPONT'),                            # an initial is not a last name
    ("Aïcha N'DIAYE", 'Aïcha', "N'DIAYE"),
    ('Élodie ÉTIENNE-MARTIN', 'Élodie', 'ÉTIENNE-MARTIN'),
    ('Jean de LA FONTAINE', 'Jean', 'de LA FONTAINE'),                  # a particle joins the last name
    ('  marie   de la tour ', 'marie', 'de la tour'),                  # no case signal: last word + particles
    ('JEAN DUPONT', 'JEAN', 'DUPONT'),
    ('jean dupont', 'jean', 'dupont'),
    ('Jean Pierre Martin', 'Jean Pierre', 'Martin'),
    ('Anne-Marie McDONALD', 'Anne-Marie', 'McDONALD'),
])
def test_full_names_are_split_by_the_stated_rule(full_name, first, last):
    firsts, lasts, empty, one_word = migrations.split_full_name(pa.array([full_name]))
    assert (firsts.to_pylist(), lasts.to_pylist()) == ([first], [last])
    assert not empty.any() and not one_word.any()


def test_empty_and_one_word_names_are_flagged():
    firsts, lasts, empty, one_word = migrations.split_full_name(pa.array(['Madonna', '', '   ', None, 'A B']))
    assert empty.tolist() == [False, True, True, True, False]
    assert one_word.tolist() == [True, False, False, False, False]
    assert firsts.to_pylist() == [None, None, None, None, 'A']


def test_skill_codes_map_to_esco_ids_once_each_and_unknown_codes_are_found():
    codes = pa.array([['INF-JAVA', ' inf-jee ', 'INF-PY'], [], ['XX', 'INF-PY', None], ['INF-PY']]).slice(0)
    skills, unknown, positions = migrations.map_skill_codes(codes)
    assert skills.to_pylist() == [[JAVA, PYTHON], [], [PYTHON], [PYTHON]]
    assert unknown.tolist() == [False, False, True, False] and positions == [3, 5]
    sliced, unknown, _ = migrations.map_skill_codes(codes.slice(2))
    assert sliced.to_pylist() == [[PYTHON], [PYTHON]] and unknown.tolist() == [True, False]


def test_the_shipped_table_maps_real_esco_skills_and_bad_tables_fail(tmp_path):
    with open(migrations.SKILL_CODES_CSV, newline='') as handle:
        rows = list(csv.DictReader(handle))
    assert rows and taxonomy.is_esco_skill(pa.array([r['esco_id'] for r in rows])).all()
    bad = tmp_path / 'bad.csv'
    bad.write_text('old_code,esco_id\nA,not-esco\n')
    with pytest.raises(ConfigError, match=r"\['not-esco'\] are not ESCO skill ids"):
        migrations.skill_code_mapping(str(bad))
    bad.write_text(f'old_code,esco_id\nA,{JAVA}\na ,{PYTHON}\n')
    with pytest.raises(ConfigError, match=r"repeated: \['A'\]"):
        migrations.skill_code_mapping(str(bad))


def _v1_batch(rows: list[dict]) -> pa.RecordBatch:
    table = pa.Table.from_pylist(rows, schema=migrations.CANDIDATES_V1.arrow_schema())
    table = table.append_column('_source', pa.array(['in.parquet'] * len(rows)))
    table = table.append_column('_row', pa.array(np.arange(len(rows)), pa.int64()))
    return table.combine_chunks().to_batches()[0]


def _v1(i, full_name, phone, codes):
    record = sample_records.candidate(i)
    for name in ('first_name', 'last_name', 'skills'):
        del record[name]
    return {**record, 'full_name': full_name, 'phone': phone, 'skill_codes': codes}


def test_candidates_v1_to_v2_migrates_good_rows_and_dead_letters_bad_ones_with_every_reason():
    batch = _v1_batch([_v1(0, 'Jean-Pierre DE LA FONTAINE', '06 12 34 56 78', ['INF-JAVA']),
                       _v1(1, 'Cher', 'abc', ['NOPE']),
                       _v1(2, 'marie curie', None, [])])
    migrated, letters = migrations.candidates_v1_to_v2(batch)
    assert migrated.schema.names == [*schemas.CANDIDATES.names, '_source', '_row']
    rows = migrated.to_pylist()
    assert [(r['first_name'], r['last_name'], r['phone'], r['skills']) for r in rows] == [
        ('Jean-Pierre', 'DE LA FONTAINE', '+33612345678', [JAVA]), ('Marie', 'CURIE', None, [])]
    assert rows[0]['email'] == sample_records.candidate(0)['email']
    (letter,) = letters
    assert letter.step == migrations.STEP_CANDIDATES_V1_TO_V2 and letter.source == 'in.parquet#row=1'
    assert letter.error.split('; ') == [
        "full_name: 'Cher' is one word: must hold a first and a last name",
        "phone: 'abc' is not a phone number libphonenumber accepts: must be a French number or +country code",
        "skill_codes: unknown old codes ['NOPE']: must be an old_code of skill_codes_v1_to_esco.csv"]
    assert '"full_name": "Cher"' in letter.payload and '_row' not in letter.payload


def test_the_chain_of_steps_or_a_clear_error():
    assert [s.name for s in migrations.chain('candidates', 1, 2)] == ['MigrateCandidatesV1ToV2']
    with pytest.raises(ConfigError, match='none starts at version 2'):
        migrations.chain('candidates', 1, 3)
    with pytest.raises(ConfigError, match='--to must be above --from'):
        migrations.chain('candidates', 2, 2)
    assert migrations.current_version('candidates') == 2


def test_the_version_rule_file_by_file(tmp_path):
    v1 = pa.Table.from_pylist([_v1(0, 'A B', None, [])], schema=migrations.CANDIDATES_V1.arrow_schema())
    v2 = pa.Table.from_pylist([sample_records.candidate(0)], schema=schemas.CANDIDATES.arrow_schema())
    assert migrations.file_version(v1.schema, 'candidates', 'f') == 1                 # unmarked: version 1
    assert migrations.file_version(migrations.stamp(v2, 'candidates', 2).schema, 'candidates', 'f') == 2
    with pytest.raises(ConfigError, match='lacks the fields'):                       # unmarked, not v1 fields
        migrations.file_version(v2.schema, 'candidates', 'f')
    with pytest.raises(ConfigError, match="holds the dataset 'offers'"):
        migrations.file_version(migrations.stamp(v2, 'offers', 2).schema, 'candidates', 'f')
    (tmp_path / 'b=1').mkdir()
    pq.write_table(migrations.stamp(v2, 'candidates', 2), tmp_path / 'b=1' / 'part-00000.parquet')
    assert migrations.dataset_version(str(tmp_path), 'candidates') == (2, [str(tmp_path / 'b=1' / 'part-00000.parquet')])
    with pytest.raises(ConfigError, match='holds no Parquet file'):
        migrations.dataset_version(str(tmp_path / 'nothing'), 'candidates')


def test_controls_count_and_sum_and_add_up():
    table = pa.table({'candidate_id': ['a', 'b', 'c'], 'phone': ['1', None, None],
                      'expected_salary': [1.5, 2.5, None]})
    totals = migrations.controls(table, schemas.CANDIDATES)
    assert totals == {'rows': 3, 'non_null': {'candidate_id': 3, 'phone': 1, 'expected_salary': 2},
                      'sums': {'expected_salary': 4.0}}
    both = migrations.add_controls(migrations.add_controls({}, totals), totals)
    assert both['rows'] == 6 and both['non_null']['phone'] == 2 and both['sums']['expected_salary'] == 8.0


@pytest.mark.parametrize('function, value, masked', [
    (migrations.mask_name, 'Jean-Pierre DE LA FONTAINE', 'J.-P. D. L. F.'),
    (migrations.mask_email, 'jean.dupont@example.fr', 'j***@e***.fr'),
    (migrations.mask_phone, '+33612345678', '+33 6** ** ** 78'),
    (migrations.mask_phone, '06 12 34 56 78', '0* ** ** ** 78'),
    (migrations.mask_phone, '+442079460958', '+4*********58'),
    (migrations.mask_phone, None, ''),
])
def test_masks_keep_no_more_than_initials_and_a_few_digits(function, value, masked):
    assert function(value) == masked

"""ETL of HR exports: French CSV conventions, JSON lines and Avro, mapping checks at launch,
validation and normalisation, latest-update-wins de-duplication and the per-file reconciliation."""
import codecs
import gzip
import json
import sqlite3

import fastavro
import pyarrow as pa
import pytest

from pipelines import etl
from transforms import etl_mapping
from transforms.errors import ConfigError
from transforms.keyed_write import read_parquet_dataset

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')

EMPLOYEES_MAPPING = """
dataset: employees
source: {encoding: latin-1, delimiter: ';', date_format: '%d/%m/%Y'}
updated_at: {column: date_maj, format: '%d/%m/%Y %H:%M'}
fields:
  employee_id: matricule
  nir: num_secu
  last_name: {column: nom, normalize: upper_name}
  first_name: {column: prenom, normalize: name}
  birth_date: date_naissance
  email: {column: courriel, normalize: email}
  phone: {column: telephone, normalize: phone}
  postcode: {column: code_postal, normalize: postcode}
  cadre: {column: statut, values: {Cadre: true, 'Non cadre': false}}
  alsace_moselle: {column: regime_local, default: false}
  low_qualification: {default: false}
"""
HEADER = 'matricule;num_secu;nom;prenom;date_naissance;courriel;telephone;code_postal;statut;regime_local;commentaire;date_maj'


def _nir(body: str) -> str:
    """``body`` (13 digits) with its key, as DOMAIN.md computes it."""
    return body + f'{97 - int(body) % 97:02d}'


NIR_1, NIR_2, NIR_3 = _nir('1850578006084'), _nir('2690549588157'), _nir('1870326855582')
ROWS = [
    # A quoted comment holding a line break and a ';' must not split the record.
    f'E001;{NIR_1};  le  gall ;jean-PIERRE;05/05/1985;Jean.LeGall@Example.FR ;06 12 34 56 78;1000;Cadre;non;"ligne 1\nligne; 2";01/03/2026 09:00',
    f'E002;{NIR_2};Dupré;Zoé;12/06/1969;zoe@example.fr;+33 (0)7 55 66 77 88;67000;Non cadre;oui;;02/03/2026 10:00',
    f'E001;{NIR_1};Le Gall;Jean-Pierre;05/05/1985;jp@example.fr;0612345679;01000;Cadre;non;;15/03/2026 08:30',  # newer
    f'E003;185057800608499;Martin;Luc;01/01/1985;luc@example.fr;0612345670;75001;Cadre;non;;01/03/2026 09:00',  # bad NIR key
    f'E004;{NIR_3};Petit;Ana;31/02/1987;ana@example.fr;12;75001;Stagiaire;non;;01/03/2026 09:00',  # 3 bad cells
    'E005;too;few;fields',
    f'E002;{NIR_2};Dupré;Zoé;12/06/1969;old@example.fr;;67000;Non cadre;oui;;01/01/2026 10:00',  # older
]


def _write(path, text, encoding):
    path.write_bytes(text.encode(encoding))
    return str(path)


@pytest.fixture()
def exports(tmp_path):
    mapping = tmp_path / 'employees.yaml'
    mapping.write_text(EMPLOYEES_MAPPING, encoding='utf-8')
    folder = tmp_path / 'exports'
    folder.mkdir()
    _write(folder / 'salaries_1.csv', HEADER + '\n' + '\n'.join(ROWS[:4]) + '\n', 'latin-1')
    # The second file is gzipped, as exports often travel, with Windows line ends.
    (folder / 'salaries_2.csv.gz').write_bytes(
        gzip.compress((HEADER + '\r\n' + '\r\n'.join(ROWS[4:]) + '\r\n').encode('latin-1')))
    return {'mapping': str(mapping), 'input': str(folder / 'salaries_*'), 'folder': folder, 'tmp': tmp_path}


def _run(mapping, pattern, output, *extra):
    return etl.run(['--mapping', mapping, '--input', pattern, '--output', str(output), *extra])


def test_a_french_csv_export_is_loaded_validated_normalised_and_deduplicated(exports):
    output = exports['tmp'] / 'out'
    summary = _run(exports['mapping'], exports['input'], output)
    rows = {r['employee_id']: r for r in read_parquet_dataset(str(output / 'employees')).to_pylist()}
    assert sorted(rows) == ['E001', 'E002']
    jean = rows['E001']  # the row updated on 15/03 wins over the one of 01/03, in another position
    assert (jean['last_name'], jean['first_name'], jean['email'], jean['phone'], jean['postcode']) == (
        'LE GALL', 'Jean-Pierre', 'jp@example.fr', '+33612345679', '01000')
    zoe = rows['E002']  # latin-1 accents read right; the older duplicate in the second file loses
    assert (zoe['last_name'], zoe['first_name'], zoe['email'], zoe['phone'], zoe['postcode'], zoe['cadre'],
            zoe['alsace_moselle'], str(zoe['birth_date'])) == (
        'DUPRÉ', 'Zoé', 'zoe@example.fr', '+33755667788', '67000', False, True, '1969-06-12')
    files = {f['file'].rsplit('/', 1)[1]: f for f in summary['files']}
    assert files['salaries_1.csv'] == {'file': files['salaries_1.csv']['file'], 'read': 4, 'written': 2,
                                       'dead_lettered': 1, 'merged': 1}
    assert files['salaries_2.csv.gz'] == {'file': files['salaries_2.csv.gz']['file'], 'read': 3, 'written': 0,
                                       'dead_lettered': 2, 'merged': 1}
    reconciliation = json.loads((output / 'reconciliation' / 'reconciliation.json').read_text())
    assert reconciliation == summary['files']
    assert (output / 'reconciliation' / 'reconciliation.csv').read_text().splitlines()[0] == \
        'file,read,written,dead_lettered,merged'
    letters = [json.loads(line) for path in (output / 'dead_letters').glob('*') for line in path.read_text().splitlines()]
    def who(payload):  # a source record, a canonical record (validation) or a raw CSV line
        if payload.startswith('{'):
            record = json.loads(payload)
            return record.get('matricule') or record.get('employee_id')
        return payload[:4]

    errors = {who(letter['payload']): letter['error'] for letter in letters}
    assert set(errors) == {'E003', 'E004', 'E005'}
    assert 'nir' in errors['E003']
    assert all(part in errors['E004'] for part in ('birth_date', 'phone', 'cadre'))  # every reason, not the first
    assert 'fields' in errors['E005']
    with sqlite3.connect(output / 'hrbatch.db') as db:
        assert db.execute('SELECT employee_id, email FROM employees ORDER BY 1').fetchall() == [
            ('E001', 'jp@example.fr'), ('E002', 'zoe@example.fr')]


def test_a_rerun_rewrites_the_same_rows(exports):
    output = exports['tmp'] / 'out'
    _run(exports['mapping'], exports['input'], output)
    first = {p.relative_to(output): p.read_bytes() for p in output.rglob('*.parquet')}
    _run(exports['mapping'], exports['input'], output, '--force')
    assert {p.relative_to(output): p.read_bytes() for p in output.rglob('*.parquet')} == first
    with sqlite3.connect(output / 'hrbatch.db') as db:
        assert db.execute('SELECT COUNT(*) FROM employees').fetchone()[0] == 2


def test_utf8_with_a_bom_decimal_commas_json_lines_and_avro(tmp_path):
    mapping = tmp_path / 'contracts.json'
    mapping.write_text(json.dumps({
        'dataset': 'contracts', 'source': {'delimiter': ';', 'decimal': ',', 'date_format': '%d/%m/%Y'},
        'fields': {'contract_id': 'id', 'employee_id': 'matricule', 'establishment_siret': 'siret',
                   'contract_type': 'type', 'start_date': 'debut', 'end_date': 'fin',
                   'weekly_hours': 'horaire', 'monthly_salary': 'salaire'}}))
    (tmp_path / 'in').mkdir()
    csv_text = ('id;matricule;siret;type;debut;fin;horaire;salaire\n'
                'K1;E001;73282932000074;CDI;01/09/2020;;35;2 345,67\n'
                'K2;E002;73282932000074;CDD;01/11/2026;30/11/2026;17,5;1 900,5\n'
                'K3;E003;73282932000074;CDD;01/11/2026;30/10/2026;35;abc\n')  # ends before it starts, bad salary
    (tmp_path / 'in' / 'contrats.csv').write_bytes(codecs.BOM_UTF8 + csv_text.encode('utf-8'))
    output = tmp_path / 'out'
    summary = _run(str(mapping), str(tmp_path / 'in' / '*.csv'), output, '--database', 'none')
    rows = {r['contract_id']: r for r in read_parquet_dataset(str(output / 'contracts')).to_pylist()}
    assert (rows['K1']['monthly_salary'], rows['K1']['weekly_hours'], rows['K1']['end_date']) == (2345.67, 35.0, None)
    assert (rows['K2']['monthly_salary'], rows['K2']['weekly_hours'], str(rows['K2']['end_date'])) == (
        1900.5, 17.5, '2026-11-30')
    assert summary['dead_lettered'] == 1 and summary['written'] == 2

    variable = tmp_path / 'variable.yaml'
    variable.write_text('dataset: variable_elements\nfields: {employee_id: emp, period: mois, overtime_hours: hs, '
                        'bonus: {column: prime, default: 0}, unpaid_absence_hours: {column: abs, default: 0}}\n')
    (tmp_path / 'jv').mkdir()
    (tmp_path / 'jv' / 'a.jsonl').write_text(
        '{"emp": "E001", "mois": "2026-11", "hs": 4.5, "prime": 100}\n\n{"emp": "E002", "mois": "2026-13", "hs": 1}\n'
        'not json\n')
    schema = {'type': 'record', 'name': 'v', 'fields': [{'name': n, 'type': ['null', t]} for n, t in (
        ('emp', 'string'), ('mois', 'string'), ('hs', 'double'), ('prime', 'double'), ('abs', 'double'))]}
    with open(tmp_path / 'jv' / 'b.avro', 'wb') as handle:
        fastavro.writer(handle, schema, [{'emp': 'E003', 'mois': '2026-11', 'hs': 2.0, 'prime': None, 'abs': 7.0}])
    summary = _run(str(variable), str(tmp_path / 'jv' / '*'), tmp_path / 'out2', '--database', 'none')
    rows = {r['employee_id']: r for r in read_parquet_dataset(str(tmp_path / 'out2' / 'variable_elements')).to_pylist()}
    assert rows == {
        'E001': {'employee_id': 'E001', 'period': '2026-11', 'overtime_hours': 4.5, 'bonus': 100.0,
                 'unpaid_absence_hours': 0.0},
        'E003': {'employee_id': 'E003', 'period': '2026-11', 'overtime_hours': 2.0, 'bonus': 0.0,
                 'unpaid_absence_hours': 7.0}}
    assert {f['file'].rsplit('/', 1)[1]: (f['read'], f['written'], f['dead_lettered']) for f in summary['files']} == {
        'a.jsonl': (3, 1, 2), 'b.avro': (1, 1, 0)}


def test_bad_exports_and_mappings_fail_at_launch_with_the_reason(exports):
    folder, tmp = exports['folder'], exports['tmp']
    with pytest.raises(ConfigError, match=r'is not UTF-8: byte 0x[0-9a-f]{2} at offset \d+.*encoding: latin-1'):
        _run(str(_mapping(tmp, EMPLOYEES_MAPPING.replace('encoding: latin-1', 'encoding: utf-8'))),
             exports['input'], tmp / 'o1')
    _write(folder / 'utf8.csv', HEADER + '\n' + ROWS[1] + '\n', 'utf-8')
    with pytest.raises(ConfigError, match='declared latin-1 but reads as UTF-8'):
        _run(exports['mapping'], str(folder / 'utf8.csv'), tmp / 'o2')
    with pytest.raises(ConfigError, match=r"names columns \['telephone'\] that the export does not have"):
        _run(str(_mapping(tmp, EMPLOYEES_MAPPING.replace('column: telephone', 'column: telephone'))),
             str(_header_without(folder, 'telephone')), tmp / 'o3')
    with pytest.raises(ConfigError, match="field 'salary' is not a field of employees"):
        _run(str(_mapping(tmp, EMPLOYEES_MAPPING + '  salary: salaire\n')), exports['input'], tmp / 'o4')
    with pytest.raises(ConfigError, match=r"non-nullable employees fields \['nir'\] are neither mapped"):
        _run(str(_mapping(tmp, EMPLOYEES_MAPPING.replace('  nir: num_secu\n', ''))), exports['input'], tmp / 'o5')
    with pytest.raises(ConfigError, match='matches no file'):
        _run(exports['mapping'], str(folder / 'nothing_*.csv'), tmp / 'o6')
    with pytest.raises(ConfigError, match="normalize 'phone_number' is not one of"):
        _run(str(_mapping(tmp, EMPLOYEES_MAPPING.replace('normalize: phone', 'normalize: phone_number'))),
             exports['input'], tmp / 'o7')


def _mapping(tmp, text):
    path = tmp / f'mapping_{abs(hash(text))}.yaml'
    path.write_text(text)
    return path


def _header_without(folder, column):
    path = folder / 'no_phone.csv'
    names = HEADER.split(';')
    keep = [i for i, name in enumerate(names) if name != column]
    line = ROWS[1].split(';')
    _write(path, ';'.join(names[i] for i in keep) + '\n' + ';'.join(line[i] for i in keep) + '\n', 'latin-1')
    return path


def test_duplicates_without_an_update_time_keep_the_row_read_last():
    rows = pa.table({'employee_id': ['A', 'B', 'A', 'A'], '_source': ['f1', 'f1', 'f2', 'f1'], '_row': [0, 1, 0, 5]})
    winners, merged = etl.latest_per_key(rows, ('employee_id',))
    assert winners.to_pylist() == [{'employee_id': 'A', '_source': 'f2', '_row': 0},
                                   {'employee_id': 'B', '_source': 'f1', '_row': 1}]
    assert sorted((r['_source'], r['_row']) for r in merged.to_pylist()) == [('f1', 0), ('f1', 5)]
    stamped = rows.append_column(etl_mapping.UPDATED_AT, pa.array([3, None, 1, 2], pa.timestamp('s')))
    winners, _ = etl.latest_per_key(stamped, ('employee_id',))
    assert winners.column('_row').to_pylist() == [0, 1]  # A updated at 3 wins; B alone
    assert winners.column('_source').to_pylist() == ['f1', 'f1']

"""Mapping files: what is refused at launch, and the column conversions (numbers with decimal
commas, strict dates, code tables, booleans, defaults, lists)."""
import datetime
import re

import pyarrow as pa
import pytest

from transforms import etl_mapping
from transforms import schemas
from transforms.errors import ConfigError


def test_impossible_dates_are_refused_not_rolled_over():
    dates = etl_mapping.parse_dates(
        pa.array(['31/02/1987', '5/5/1985', ' 29/02/2024 ', '29/02/2023', None, 'x', '01/03/2026']), '%d/%m/%Y')
    assert dates.to_pylist() == [None, datetime.datetime(1985, 5, 5), datetime.datetime(2024, 2, 29), None, None,
                                 None, datetime.datetime(2026, 3, 1)]
    # Formats without a plain day are checked by formatting back.
    assert etl_mapping.parse_dates(pa.array(['31 Feb 2026', '1 Mar 2026']), '%d %b %Y').to_pylist() == [
        None, datetime.datetime(2026, 3, 1)]


def _contracts(**fields):
    base = {'contract_id': 'id', 'employee_id': 'emp', 'establishment_siret': 'siret', 'contract_type': 'type',
            'start_date': 'start', 'weekly_hours': 'hours', 'monthly_salary': 'salary'}
    return etl_mapping.from_dict({'dataset': 'contracts', 'source': {'decimal': ',', 'date_format': '%d/%m/%Y'},
                                  'fields': {**base, **fields}})


def test_convert_gives_typed_columns_and_one_reason_per_bad_cell():
    mapping = _contracts(contract_type={'column': 'type', 'values': {'Indéterminé': 'CDI', 'Déterminé': 'CDD'}},
                         end_date={'column': 'end'})
    batch = pa.RecordBatch.from_pydict({
        'id': ['K1', 'K2', 'K3'], 'emp': ['E1', 'E2', 'E3'], 'siret': ['73282932000074'] * 3,
        'type': ['Indéterminé', 'Déterminé', 'Intérim'], 'start': ['01/09/2020', '31/11/2026', '01/01/2026'],
        'end': [None, '30/11/2026', ''], 'hours': ['35', '17,5', 'trente'], 'salary': ['2 345,67', '1\u202f900,5', '0'],
        '_source': ['f'] * 3, '_row': [0, 1, 2]})
    converted, reasons = etl_mapping.convert(batch, mapping)
    assert converted.column('contract_type').to_pylist() == ['CDI', 'CDD', None]
    assert converted.column('weekly_hours').to_pylist() == [35.0, 17.5, None]
    assert converted.column('monthly_salary').to_pylist() == [2345.67, 1900.5, 0.0]
    assert converted.column('start_date').to_pylist()[0] == datetime.date(2020, 9, 1)
    assert converted.column('end_date').to_pylist() == [None, datetime.date(2026, 11, 30), None]
    assert converted.schema.field('start_date').type == pa.date32()
    assert sorted(reasons) == [1, 2]
    assert reasons[1] == ["start_date: not a date written %d/%m/%Y ('31/11/2026')"]
    assert len(reasons[2]) == 2 and 'contract_type' in reasons[2][0] and 'weekly_hours' in reasons[2][1]


def test_defaults_booleans_and_lists():
    mapping = etl_mapping.from_dict({'dataset': 'employees', 'source': {'true_values': ['O'], 'false_values': ['N']},
                                     'fields': {'employee_id': 'id', 'nir': 'nir', 'last_name': 'nom',
                                                'first_name': 'prenom', 'birth_date': 'naissance', 'cadre': 'cadre',
                                                'alsace_moselle': {'default': False},
                                                'low_qualification': {'column': 'lq', 'default': True}}})
    batch = pa.RecordBatch.from_pydict({'id': ['E1', 'E2'], 'nir': ['x', 'y'], 'nom': ['a', 'b'], 'prenom': ['c', 'd'],
                                        'naissance': ['1980-01-01', '1990-12-31'], 'cadre': ['o', 'peut-être'],
                                        'lq': [None, 'N'], '_source': ['f', 'f'], '_row': [0, 1]})
    converted, reasons = etl_mapping.convert(batch, mapping)
    assert converted.column('cadre').to_pylist() == [True, None]
    assert converted.column('alsace_moselle').to_pylist() == [False, False]
    assert converted.column('low_qualification').to_pylist() == [True, False]
    assert list(reasons) == [1] and 'cadre' in reasons[1][0]
    lists = etl_mapping.from_dict({'dataset': 'candidates', 'source': {'list_separator': ','}, 'fields': {
        name: name for name in schemas.CANDIDATES.names if name not in ('phone', 'postcode')}})
    skills = etl_mapping._typed(pa.array(['a, b', None, 'c']), schemas.CANDIDATES.field('skills'), lists, None, {})
    assert skills.to_pylist() == [['a', 'b'], [], ['c']]


@pytest.mark.parametrize('document, message', [
    ({'dataset': 'payslips', 'fields': {'a': 'b'}}, "dataset 'payslips' is not one of"),
    ({'dataset': 'contracts', 'fields': {}}, 'fields must map'),
    ({'dataset': 'contracts', 'source': {'encoding': 'ebcdic'}, 'fields': {'contract_id': 'x'}}, "encoding 'ebcdic'"),
    ({'dataset': 'contracts', 'source': {'delimiter': ';;'}, 'fields': {'contract_id': 'x'}}, 'one character'),
    ({'dataset': 'contracts', 'source': {'date_format': 'DD/MM/YYYY'}, 'fields': {'contract_id': 'x'}},
     'strptime format'),
    ({'dataset': 'contracts', 'fields': {'contract_id': {'colum': 'x'}}}, 'must be a source column name'),
    ({'dataset': 'contracts', 'fields': {'contract_id': 'x'}, 'extra': 1}, "unknown keys ['extra']"),
    ({'dataset': 'contracts', 'fields': {'contract_id': 'x'}}, 'are neither mapped nor given a default'),
])
def test_bad_mappings_are_refused_with_the_reason(document, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        etl_mapping.from_dict(document)

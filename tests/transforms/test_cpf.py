"""CPF credit rules, with DOMAIN.md's examples."""
import pyarrow as pa
import pytest

from transforms import cpf
from transforms import schemas
from transforms.errors import ConfigError


def _employees(*low_qualification):
    return pa.Table.from_pylist(
        [dict(employee_id=f'E{i}', nir='185057800608436', last_name='N', first_name='P', birth_date=None,
              cadre=False, alsace_moselle=False, low_qualification=low) for i, low in enumerate(low_qualification)],
        schema=schemas.EMPLOYEES.arrow_schema())


def _hours(**hours):
    return pa.table({'employee_id': list(hours), 'hours_paid': [float(h) for h in hours.values()]})


def _absences(*rows):
    return pa.Table.from_pylist([dict(employee_id=e, year=2026, kind=k, hours=float(h)) for e, k, h in rows],
                                schema=schemas.ABSENCES.arrow_schema())


def _balances(*rows):
    return pa.Table.from_pylist([dict(employee_id=e, balance=b, last_credited_year=y) for e, b, y in rows],
                                schema=schemas.CPF_BALANCES.arrow_schema())


def _credit(hours, employees, absences=None, balances=None):
    result = cpf.credit(2026, hours, absences if absences is not None else _absences(), employees,
                        balances if balances is not None else _balances())
    return {row['employee_id']: row for row in result.credits.to_pylist()}, result.dead_letters


def test_domain_examples():
    rows, letters = _credit(_hours(E0=1607, E1=401.75, E2=803.5, E3=803.49), _employees(False, False, False, False))
    assert letters == []
    assert rows['E0']['credit_cents'] == 500_00                 # full time: 500 EUR
    assert rows['E1']['credit_cents'] == 125_00                 # half time for six months -> 125 EUR
    assert rows['E2']['credit_cents'] == 500_00                 # exactly half the reference time
    assert rows['E3']['credit_cents'] == 250_00                 # 500 x 803.49 / 1607 = 249.9969 -> rounded up


def test_below_half_time_is_prorated_and_rounded_up_to_the_cent():
    rows, _ = _credit(_hours(E0=100), _employees(False))
    assert rows['E0']['credit_cents'] == 31_12                  # 500 x 100 / 1607 = 31.1139...


def test_low_qualification_earns_800_up_to_8000():
    rows, _ = _credit(_hours(E0=1607, E1=100), _employees(True, True),
                      balances=_balances(('E0', 7700.0, 2025)))
    assert rows['E0']['annual_credit_cents'] == 800_00 and rows['E0']['credit_cents'] == 300_00
    assert rows['E0']['balance_after_cents'] == 8000_00 and rows['E0']['status'] == 'capped'
    assert rows['E1']['credit_cents'] == 49_79                  # 800 x 100 / 1607 = 49.782...


def test_listed_absences_count_as_worked_and_others_do_not():
    absences = _absences(('E0', 'maternity', 600), ('E0', 'sickness', 300), ('E1', 'work_accident', 200),
                         ('E1', 'parental_leave', 100))
    rows, _ = _credit(_hours(E0=300, E1=300), _employees(False, False), absences=absences)
    assert rows['E0']['hours_absences_counted'] == 600 and rows['E0']['credit_cents'] == 500_00  # 900 h
    assert rows['E1']['hours_absences_counted'] == 300 and rows['E1']['credit_cents'] == 186_69  # 600 h: 186.683... up


def test_cap_and_a_year_already_credited():
    rows, _ = _credit(_hours(E0=1607, E1=1607, E2=1607), _employees(False, False, False),
                      balances=_balances(('E0', 4800.0, 2025), ('E1', 5000.0, 2025), ('E2', 1000.0, 2026)))
    assert (rows['E0']['credit_cents'], rows['E0']['status']) == (200_00, 'capped')
    assert (rows['E1']['credit_cents'], rows['E1']['status']) == (0, 'at_cap')
    assert (rows['E2']['credit_cents'], rows['E2']['status']) == (0, 'already_credited')
    assert rows['E2']['balance_after_cents'] == rows['E2']['balance_before_cents'] == 1000_00


def test_hours_without_employee_are_dead_letters_and_missing_years_are_refused():
    rows, letters = _credit(_hours(E0=1607, X9=1607), _employees(False))
    assert set(rows) == {'E0'}
    assert len(letters) == 1 and 'X9' in letters[0].error
    with pytest.raises(ConfigError, match='CPF of 2018'):
        cpf.parameters(2018)

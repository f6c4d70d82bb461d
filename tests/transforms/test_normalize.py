"""Normalisation of names, emails, postcodes and phone numbers; the vectorised French phone path
agrees with libphonenumber on every input."""
import phonenumbers
import pyarrow as pa
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from transforms import normalize


def _e164(value):
    try:
        number = phonenumbers.parse(value, 'FR')
    except phonenumbers.NumberParseException:
        return None
    return (phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
            if phonenumbers.is_valid_number(number) else None)


def test_french_numbers_in_every_usual_writing_become_e164():
    written = ['06 12 34 56 78', '06.12.34.56.78', '+33 6 12 34 56 78', '+33 (0)6 12 34 56 78', '0033612345678',
               '0612345678', ' 01-23-45-67-89 ', '+44 20 7946 0958', '+1 (650) 253-0000', None, '',
               '06 12 34', '00 00 00 00 00', 'not a phone', '+33 6 12 34 56 78 9']
    out, invalid = normalize.phone(pa.array(written))
    assert out.to_pylist() == ['+33612345678'] * 6 + ['+33123456789', '+442079460958', '+16502530000',
                                                      None, None, None, None, None, None]
    assert invalid.tolist() == [False] * 11 + [True] * 4


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.from_regex(r'\A(0|\+33 ?|0033|\+33 ?\(0\))[1-9]([ .-]?\d\d){4}\Z'),
    st.from_regex(r'\A\+?\d{6,14}\Z'),
    st.text(alphabet='0123456789+ .-()', max_size=18)), min_size=1, max_size=40))
def test_the_fast_path_gives_libphonenumbers_answer(values):
    out, invalid = normalize.phone(pa.array(values))
    expected = [_e164(v.strip()) if v.strip() else None for v in values]
    assert out.to_pylist() == expected
    assert invalid.tolist() == [bool(v.strip()) and e is None for v, e in zip(values, expected)]


def test_names_emails_and_postcodes():
    first, _ = normalize.name(pa.array(['  jean-PIERRE ', 'marie  claire', None, '  ']))
    assert first.to_pylist() == ['Jean-Pierre', 'Marie Claire', None, None]
    last, _ = normalize.upper_name(pa.array(['de la  Fontaine', 'Ébert']))
    assert last.to_pylist() == ['DE LA FONTAINE', 'ÉBERT']
    emails, bad = normalize.email(pa.array([' Jean.Dupont@Example.FR ', 'no-at-sign', None, 'a@b']))
    assert emails.to_pylist() == ['jean.dupont@example.fr', None, None, None]
    assert bad.tolist() == [False, True, False, True]
    codes, bad = normalize.postcode(pa.array(['75001', '1000', ' 13 008', '2A004', '99999', None, '123']))
    assert codes.to_pylist() == ['75001', '01000', '13008', None, None, None, None]
    assert bad.tolist() == [False, False, False, True, True, False, True]

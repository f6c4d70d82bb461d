"""Vectorised normalisation of personal contact data on Arrow arrays: names, emails, phone numbers
(E.164) and French postcodes.

Every function takes a string array and returns ``(normalised, invalid)``: the normalised array
(null where the input is null or invalid) and a numpy mask of the non-null values that could not be
normalised, so the caller can dead-letter those rows with a reason instead of keeping a bad value.

Phone numbers are parsed by ``phonenumbers`` (Google's libphonenumber). It takes ~25 us a number and
phone numbers are nearly all distinct, so the common case, a French number written in one of the
usual ways, is done on whole arrays: separators removed, the national or international prefix
replaced by ``+33``, and validity checked against libphonenumber's own French number patterns (read
from its metadata, not copied here). Anything else (a foreign number, letters, an extension) goes to
``phonenumbers`` itself, once per distinct value. tests/transforms/test_normalize.py checks that both
paths give libphonenumber's answer.
"""
import functools

import numpy as np
import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc

_SEPARATORS = r'[\s.\-/()]'
_NAME_SPACES = r'\s+'


def _invalid(values: pa.Array, normalised: pa.Array) -> np.ndarray:
    """Non-null inputs whose normalised value is null."""
    return (pc.is_valid(values).to_numpy(zero_copy_only=False)
            & pc.is_null(normalised).to_numpy(zero_copy_only=False))


def _blank_to_null(values: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(values, ''), pa.scalar(None, pa.string()), values)


def _trimmed(values: pa.Array) -> pa.Array:
    return _blank_to_null(pc.utf8_trim_whitespace(pc.replace_substring_regex(values, _NAME_SPACES, ' ')))


def name(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A first name: spaces trimmed and collapsed, title case ('jean-PIERRE ' -> 'Jean-Pierre')."""
    out = pc.utf8_title(_trimmed(values))
    return out, np.zeros(len(values), dtype=bool)


def upper_name(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A last name as French payroll and the DSN write it: trimmed, collapsed, upper case."""
    out = pc.utf8_upper(_trimmed(values))
    return out, np.zeros(len(values), dtype=bool)


def email(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Trimmed and lower-cased; invalid unless one '@' between a local part and a dotted domain."""
    out = pc.utf8_lower(_blank_to_null(pc.utf8_trim_whitespace(values)))
    ok = pc.match_substring_regex(out, r'^[^@\s]+@[^@\s]+\.[^@\s]+$')
    out = pc.if_else(pc.fill_null(ok, False), out, pa.scalar(None, pa.string()))
    return out, _invalid(values, out)


def postcode(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A French postcode as 5 digits; 4 digits get their leading zero back (lost by spreadsheets:
    '1000' is Bourg-en-Bresse, 01000). Anything else is invalid."""
    compact = _blank_to_null(pc.replace_substring_regex(values, r'\s', ''))
    padded = pc.if_else(pc.fill_null(pc.match_substring_regex(compact, r'^\d{4}$'), False),
                        pc.binary_join_element_wise('0', compact, ''), compact)
    ok = pc.fill_null(pc.match_substring_regex(padded, r'^(?:0[1-9]|[1-8]\d|9[0-8])\d{3}$'), False)
    out = pc.if_else(ok, padded, pa.scalar(None, pa.string()))
    return out, _invalid(values, out)


@functools.cache
def _french_number_pattern() -> str:
    """libphonenumber's valid French national numbers: the union of its per-type patterns."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region('FR')
    kinds = ('fixed_line', 'mobile', 'toll_free', 'premium_rate', 'shared_cost', 'personal_number', 'voip',
             'pager', 'uan', 'voicemail')
    patterns = [desc.national_number_pattern for desc in (getattr(metadata, kind) for kind in kinds)
                if desc is not None and desc.national_number_pattern]
    return '(?:' + '|'.join(f'(?:{p})' for p in patterns) + ')'


def _phonenumbers_e164(value: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def phone(values: pa.Array, region: str = 'FR') -> tuple[pa.Array, np.ndarray]:
    """E.164 ('+33612345678'); numbers without a country code are read as ``region``'s."""
    values = _blank_to_null(pc.utf8_trim_whitespace(values.cast(pa.string())))
    out = pa.nulls(len(values), pa.string())
    fast = np.zeros(len(values), dtype=bool)
    if region == 'FR':
        digits = pc.replace_substring_regex(values, _SEPARATORS, '')
        # 0X XX XX XX XX, +33 X..., 0033 X..., +33 (0)X...: the national number is what follows.
        national = pc.extract_regex(digits, r'^(?:0|\+330?|00330?)(?P<n>\d{9})$').field('n')
        valid = pc.fill_null(pc.match_substring_regex(national, f'^{_french_number_pattern()}$'), False)
        out = pc.if_else(valid, pc.binary_join_element_wise('+33', national, ''), out)
        fast = valid.to_numpy(zero_copy_only=False)
    rest = pc.is_valid(values).to_numpy(zero_copy_only=False) & ~fast
    if rest.any():
        others = values.filter(pa.array(rest))
        distinct = pc.unique(others)
        formatted = pa.array([_phonenumbers_e164(v, region) for v in distinct.to_pylist()], pa.string())
        out = pc.replace_with_mask(out, pa.array(rest), formatted.take(pc.index_in(others, value_set=distinct)))
    return out, _invalid(values, out)


NORMALIZERS = {'name': name, 'upper_name': upper_name, 'email': email, 'postcode': postcode, 'phone': phone}

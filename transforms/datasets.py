"""The catalogue of the personal data hrbatch holds: one ``Dataset`` per kind of file the pipelines write.

Shared by ``pipelines.gdpr_anonymize`` (what to anonymise and how) and ``pipelines.subject_access``
(where a person's records are, and the GDPR article 15 information that goes with them). Each entry
says:

- ``schema`` and ``layout``: Parquet files of a ``transforms.schemas`` schema (a file, or a keyed
  dataset directory of ``*/part-*.parquet`` as ``WriteKeyed``/``WritePartitions`` write it), or the
  DSN text files (``layout='dsn'``);
- ``person_fields``: the fields that identify the person, by identifier kind (``email``, ``nir``,
  ``candidate_id``, ``employee_id``): subject access matches requests on them;
- ``treatments``: what anonymisation does to each personal field (``retention.Treatment``): a keyed
  pseudonym, removal, a generalisation (birth date to its year, postcode to its département, an
  amount to a band), or clearing free text; fields not named are kept as they are;
- ``quasi_identifiers``: the generalised fields whose combination is checked for k-anonymity;
- ``retention``: the default retention (period, the field it counts from or the dataset whose
  person records it follows) and its legal source (DOMAIN.md, GDPR / CNIL);
- ``purposes``, ``categories``, ``recipients``, ``source``, ``legal_basis``: the article 15 text;
- ``operations``: the pipelines that process it (the audit references of a subject-access bundle).

The catalogue names fields; ``check_catalogue`` (run by the tests) proves every name is a field of
its schema, so a schema change that drops one fails there rather than in a run.
"""
import dataclasses
import typing

import pyarrow as pa

from transforms import schemas
from transforms.retention import Treatment

PARQUET = 'parquet'
DSN = 'dsn'

# Identifier kinds a subject-access request may give, and the fields that hold them.
IDENTIFIER_KINDS = ('email', 'nir', 'candidate_id', 'employee_id')


@dataclasses.dataclass(frozen=True)
class Retention:
    period: str                    # '2y', '5y', '6m', '365d'
    date_field: str | None = None  # the field the period counts from (date32, YYYY-MM text or year)
    follows: str | None = None     # or: the dataset whose person records this one expires with
    follow_key: str | None = None  # the person key shared with that dataset
    source: str = ''


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    layout: str
    schema: schemas.RecordSchema | None
    category: str                              # the data category (policy files name it)
    person_fields: dict[str, str]              # field -> identifier kind
    treatments: dict[str, Treatment]
    quasi_identifiers: tuple[str, ...]
    retention: Retention
    purposes: str
    categories: tuple[str, ...]                # categories of personal data (article 15.1.b)
    recipients: str
    source: str
    legal_basis: str
    operations: tuple[str, ...]
    automated_decision: str = ''

    @property
    def date_fields(self) -> tuple[str, ...]:
        """The fields a retention period may count from: dates, YYYY-MM months, years."""
        if self.schema is None:
            return ()
        return tuple(f.name for f in self.schema.fields
                     if pa_kind(f) in ('date', 'month', 'year'))

    def field_names(self) -> tuple[str, ...]:
        return () if self.schema is None else self.schema.names


def pa_kind(field: schemas.Field) -> str | None:
    """'date' (date32), 'month' (a YYYY-MM text field) or 'year' (an integer field named year)."""
    if pa.types.is_date32(field.type):
        return 'date'
    if field.check is schemas.MONTH or (field.name == 'period' and pa.types.is_string(field.type)):
        return 'month'
    if field.name == 'year' and pa.types.is_integer(field.type):
        return 'year'
    return None


_PSEUDO_CANDIDATE = Treatment('pseudonym', 'candidate_id')
_PSEUDO_EMPLOYEE = Treatment('pseudonym', 'employee_id')
_MONEY_BAND_CENTS = 50_000  # 500 EUR
_RIGHTS = ('access (art. 15), rectification (art. 16), erasure (art. 17), restriction (art. 18), '
           'portability (art. 20) and objection (art. 21)')

CATALOGUE: dict[str, Dataset] = {d.name: d for d in (
    Dataset(
        name='candidates', title='Candidate profiles', layout=PARQUET, schema=schemas.CANDIDATES,
        category='recruitment',
        person_fields={'candidate_id': 'candidate_id', 'email': 'email'},
        treatments={
            'candidate_id': _PSEUDO_CANDIDATE,
            'first_name': Treatment('remove'), 'last_name': Treatment('remove'),
            'email': Treatment('pseudonym_email', 'email'), 'phone': Treatment('remove'),
            'postcode': Treatment('departement'), 'city': Treatment('clear'),
            'latitude': Treatment('round', 1), 'longitude': Treatment('round', 1),
            'years_experience': Treatment('band', 5), 'expected_salary': Treatment('band', 10_000),
        },
        quasi_identifiers=('postcode', 'years_experience', 'expected_salary'),
        retention=Retention('2y', date_field='last_contact_date',
                            source='CNIL recruitment guide: 2 years after the last contact'),
        purposes='Recruitment: matching your profile to our job offers and contacting you about them.',
        categories=('identity', 'contact details', 'location', 'skills and experience', 'salary expectations'),
        recipients='The recruitment team and the hiring managers of the offers you match.',
        source='You (your application or profile), or the job board you applied through.',
        legal_basis='Pre-contractual measures at your request and our legitimate interest in recruiting '
                    '(GDPR art. 6.1.b and 6.1.f).',
        operations=('generate', 'etl', 'matching', 'gdpr_anonymize', 'subject_access'),
        automated_decision=(
            'Candidates are ranked automatically against each job offer (the matching pipeline): a score '
            'in [0, 1] is the weighted mean of six components (required skills, nice-to-have skills, '
            'experience, distance, salary, contract type). Each match below lists every component and the '
            'weights used. The ranking prepares a human decision; you may ask for a human review, express '
            'your point of view and contest the outcome (GDPR art. 22; EU AI Act, Annex III 4(a)).')),
    Dataset(
        name='matches', title='Matches with job offers (score explanations)', layout=PARQUET,
        schema=schemas.MATCHES, category='recruitment',
        person_fields={'candidate_id': 'candidate_id'},
        treatments={'candidate_id': _PSEUDO_CANDIDATE, 'distance_km': Treatment('round', 0)},
        quasi_identifiers=(),
        retention=Retention('2y', follows='candidates', follow_key='candidate_id',
                            source='Kept as long as the candidate profile they score'),
        purposes='Recruitment: ranking candidates for each job offer, with an explanation of every score.',
        categories=('matching scores and their components',),
        recipients='The recruitment team and the hiring managers of the offers.',
        source='Computed by us from your profile and the job offers.',
        legal_basis='Legitimate interest in recruiting (GDPR art. 6.1.f).',
        operations=('matching', 'gdpr_anonymize', 'subject_access')),
    Dataset(
        name='employees', title='Employee records', layout=PARQUET, schema=schemas.EMPLOYEES,
        category='personnel',
        person_fields={'employee_id': 'employee_id', 'nir': 'nir', 'email': 'email'},
        treatments={
            'employee_id': _PSEUDO_EMPLOYEE, 'nir': Treatment('pseudonym', 'nir'),
            'last_name': Treatment('remove'), 'first_name': Treatment('remove'),
            'birth_date': Treatment('year'), 'email': Treatment('remove'), 'phone': Treatment('remove'),
            'postcode': Treatment('departement'),
        },
        quasi_identifiers=('birth_date', 'postcode'),
        retention=Retention('5y', follows='contracts', follow_key='employee_id',
                            source='Personnel register: 5 years after departure (the end of the last contract)'),
        purposes='Personnel administration, payroll, social declarations (DSN) and training rights (CPF).',
        categories=('identity', 'social security number (NIR)', 'contact details', 'birth date', 'status'),
        recipients='HR and payroll staff; Urssaf, pension and welfare bodies through the DSN; the CPF '
                   '(Caisse des dépôts).',
        source='You, when you were hired, and later updates.',
        legal_basis='The employment contract and legal obligations (GDPR art. 6.1.b and 6.1.c).',
        operations=('etl', 'payroll', 'cpf', 'dsn', 'gdpr_anonymize', 'subject_access')),
    Dataset(
        name='contracts', title='Employment contracts', layout=PARQUET, schema=schemas.CONTRACTS,
        category='personnel',
        person_fields={'employee_id': 'employee_id'},
        treatments={'contract_id': Treatment('pseudonym', 'contract_id'), 'employee_id': _PSEUDO_EMPLOYEE,
                    'monthly_salary': Treatment('band', 500), 'start_date': Treatment('year')},
        quasi_identifiers=('establishment_siret', 'contract_type', 'monthly_salary', 'start_date'),
        retention=Retention('5y', date_field='end_date',
                            source='Contract and pay documents: 5 years (DOMAIN.md); a running contract is kept'),
        purposes='Personnel administration and payroll.',
        categories=('contract terms', 'salary'),
        recipients='HR and payroll staff.',
        source='Your employment contract.',
        legal_basis='The employment contract (GDPR art. 6.1.b).',
        operations=('etl', 'payroll', 'dsn', 'gdpr_anonymize', 'subject_access')),
    Dataset(
        name='payslips', title='Payslips (totals)', layout=PARQUET, schema=schemas.PAYSLIPS,
        category='pay',
        person_fields={'employee_id': 'employee_id'},
        treatments={'employee_id': _PSEUDO_EMPLOYEE,
                    **{f.name: Treatment('band', _MONEY_BAND_CENTS) for f in schemas.PAYSLIPS.fields
                       if f.name.endswith('_cents')}},
        quasi_identifiers=('establishment_siret', 'period', 'gross_cents'),
        retention=Retention('5y', date_field='period', source='Payslips: 5 years (C. trav. L3243-4)'),
        purposes='Payroll: computing and paying your salary, withholding income tax.',
        categories=('pay', 'social contributions', 'withholding tax'),
        recipients='Payroll staff; Urssaf and the tax administration through the DSN.',
        source='Computed by us from your contract and the month\'s variable elements.',
        legal_basis='The employment contract and legal obligations (GDPR art. 6.1.b and 6.1.c).',
        operations=('payroll', 'cpf', 'dsn', 'gdpr_anonymize', 'subject_access')),
    Dataset(
        name='payslip_lines', title='Payslip lines', layout=PARQUET, schema=schemas.PAYSLIP_LINES,
        category='pay',
        person_fields={'employee_id': 'employee_id'},
        treatments={'employee_id': _PSEUDO_EMPLOYEE,
                    **{name: Treatment('band', _MONEY_BAND_CENTS)
                       for name in ('base_cents', 'employee_cents', 'employer_cents')}},
        quasi_identifiers=(),
        retention=Retention('5y', date_field='period', source='Payslips: 5 years (C. trav. L3243-4)'),
        purposes='Payroll: the detail of every payslip.',
        categories=('pay', 'social contributions'),
        recipients='Payroll staff.',
        source='Computed by us.',
        legal_basis='The employment contract and legal obligations (GDPR art. 6.1.b and 6.1.c).',
        operations=('payroll', 'dsn', 'gdpr_anonymize', 'subject_access')),
    Dataset(
        name='cpf_credits', title='CPF credits', layout=PARQUET, schema=schemas.CPF_CREDITS,
        category='training',
        person_fields={'employee_id': 'employee_id'},
        treatments={'employee_id': _PSEUDO_EMPLOYEE, 'hours_worked': Treatment('band', 100)},
        quasi_identifiers=(),
        retention=Retention('5y', date_field='year', source='Pay documents: 5 years (DOMAIN.md); check your '
                            "organisation's own rule"),
        purposes='Crediting your Compte personnel de formation each year.',
        categories=('hours worked', 'training rights'),
        recipients='The Caisse des dépôts (Mon Compte Formation) through the DSN.',
        source='Computed by us from your payslips.',
        legal_basis='Legal obligation (GDPR art. 6.1.c; Code du travail L6323-1 and following).',
        operations=('cpf', 'gdpr_anonymize', 'subject_access')),
    Dataset(
        name='dsn', title='DSN lines (monthly social declarations)', layout=DSN, schema=None,
        category='social declarations',
        person_fields={'nir': 'nir', 'employee_id': 'employee_id'},
        treatments={}, quasi_identifiers=(),
        retention=Retention('3y', source='Social-charges documents: 3 years (DOMAIN.md)'),
        purposes='The monthly social declaration (DSN) of your employer.',
        categories=('identity', 'social security number (NIR)', 'pay', 'contributions'),
        recipients='Urssaf, pension and welfare bodies, France Travail and the tax administration '
                   '(net-entreprises.fr).',
        source='Computed by us from your payslips.',
        legal_basis='Legal obligation (GDPR art. 6.1.c; CSS L133-5-3).',
        operations=('dsn', 'subject_access')),
)}

POLICY_CATEGORIES = tuple(sorted({d.category for d in CATALOGUE.values()}))


def get(name: str) -> Dataset:
    from transforms.errors import ConfigError
    if name not in CATALOGUE:
        raise ConfigError(f'unknown dataset {name!r}: the datasets hrbatch holds are {", ".join(CATALOGUE)}')
    return CATALOGUE[name]


def check_catalogue(catalogue: typing.Mapping[str, Dataset] = CATALOGUE) -> list[str]:
    """Problems with the catalogue (fields it names that its schemas lack, bad follows); [] if none."""
    problems = []
    for dataset in catalogue.values():
        if dataset.schema is None:
            continue
        names = set(dataset.schema.names)
        named = [*dataset.person_fields, *dataset.treatments, *dataset.quasi_identifiers]
        if dataset.retention.date_field:
            named.append(dataset.retention.date_field)
        if dataset.retention.follow_key:
            named.append(dataset.retention.follow_key)
        problems += [f'{dataset.name}: no field {n!r}' for n in named if n not in names]
        followed = dataset.retention.follows
        if followed and (followed not in catalogue or dataset.retention.follow_key not in
                         (catalogue[followed].schema.names if catalogue[followed].schema else ())):
            problems.append(f'{dataset.name}: follows {followed!r} on a key it lacks')
        for qi in dataset.quasi_identifiers:
            treatment = dataset.treatments.get(qi)
            if treatment is not None and not treatment.generalises:
                problems.append(f'{dataset.name}: quasi-identifier {qi!r} is not generalised but {treatment.kind}')
    return problems

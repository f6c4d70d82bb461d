"""The operations ``hrbatch run`` knows, by name. Each module has ``NAME``, ``OPTIONS``, ``build`` and ``run``."""
import importlib
import types

PIPELINES = {
    'matching': 'pipelines.matching',
    'payroll': 'pipelines.payroll',
    'cpf': 'pipelines.cpf',
    'dsn': 'pipelines.dsn',
    'etl': 'pipelines.etl',
    'reports': 'pipelines.reports',
    'migration': 'pipelines.migration',
    'gdpr_anonymize': 'pipelines.gdpr_anonymize',
    'subject_access': 'pipelines.subject_access',
}


def load(name: str) -> types.ModuleType:
    from transforms.errors import ConfigError
    if name not in PIPELINES:
        raise ConfigError(f'unknown pipeline {name!r}; available: {", ".join(sorted(PIPELINES))}')
    return importlib.import_module(PIPELINES[name])

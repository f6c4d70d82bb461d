#!/usr/bin/env bash
# Installs OpenFisca-France into a virtualenv of its own, .openfisca/venv, for the payslip
# cross-check (tests/transforms/test_openfisca_crosscheck.py runs tests/openfisca/net_salaries.py
# with .openfisca/venv/bin/python). It cannot share .venv: openfisca-france 176 requires
# numpy<2.4 and the project is locked on a newer numpy.
# Pinned: a new openfisca-france release changes rates and formulas, so the cross-check's list of
# explained differences is only valid for this version. Idempotent: does nothing when the pinned
# versions are already installed; pip keeps its downloads in its cache.
set -euo pipefail
cd "$(dirname "$0")/.."

OPENFISCA_FRANCE_VERSION=176.1.8
OPENFISCA_CORE_VERSION=44.7.1

if .openfisca/venv/bin/python -c "
import importlib.metadata as m
assert m.version('openfisca-france') == '$OPENFISCA_FRANCE_VERSION'
assert m.version('openfisca-core') == '$OPENFISCA_CORE_VERSION'" 2>/dev/null; then
    echo "install_openfisca: openfisca-france $OPENFISCA_FRANCE_VERSION already in .openfisca/venv"
    exit 0
fi

mkdir -p .openfisca
python3 -m venv .openfisca/venv
.openfisca/venv/bin/pip install --quiet \
    "openfisca-france==$OPENFISCA_FRANCE_VERSION" "openfisca-core==$OPENFISCA_CORE_VERSION"
echo "install_openfisca: openfisca-france $OPENFISCA_FRANCE_VERSION, openfisca-core $OPENFISCA_CORE_VERSION in .openfisca/venv"

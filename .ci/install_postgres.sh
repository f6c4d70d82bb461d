#!/usr/bin/env bash
# Installs the PostgreSQL server binaries (initdb, pg_ctl, postgres) that the tests' fixture
# (tests/fixtures/postgres.py) starts a throw-away server with. Idempotent: does nothing when a
# server is already installed. Debian/Ubuntu only (apt-get); run as root or with sudo available.
set -euo pipefail

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "install_postgres: PostgreSQL server already installed: $(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' ')"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
else
    SUDO="sudo"
fi

# The tests start their own server: stop the package from creating (and starting) a system-wide
# "main" cluster, which would only take a port and memory.
$SUDO mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/hrbatch-no-main-cluster.conf >/dev/null

$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
ls -d /usr/lib/postgresql/*/bin

#!/usr/bin/env bash
# Installs what the Celery baseline needs (benchmark-only, not part of the project's lock):
# the Redis server from apt-get if missing, then the exact Celery lock into .venv.
# Idempotent: run it again and it does nothing new. Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/../.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if ! command -v redis-server >/dev/null 2>&1; then
    if ! apt-cache show redis-server >/dev/null 2>&1; then
        $SUDO apt-get update
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
fi

.venv/bin/pip install --quiet --no-deps -r benchmarks/celery_baseline/requirements.txt
.venv/bin/python -c "import celery, redis; print('celery', celery.__version__, 'redis-py', redis.__version__)"
redis-server --version

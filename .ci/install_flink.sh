#!/usr/bin/env bash
# Installs a local Apache Flink cluster and Beam's Flink job server into .flink/, for the Flink tests
# and `hrbatch flink up`:
#   .flink/venv/.../pyflink                 FLINK_HOME: Flink's bin/, conf/ and lib/ (PyPI packages
#                                           apache-flink and apache-flink-libraries, without their
#                                           Python dependencies, in a virtualenv of their own)
#   .flink/beam-runners-flink-1.19-job-server-<beam>.jar   built by Maven from .ci/flink/pom.xml
# Needs a JDK 17 and Maven (installed with apt-get when missing). Idempotent; Maven keeps its
# downloads in ~/.m2 and pip in its cache, so a second run on the same machine downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

FLINK_VERSION=1.19.3   # the Flink minor must be the one .ci/flink/pom.xml builds the job server for

missing=()
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

mkdir -p .flink
if ! .flink/venv/bin/python -c "import importlib.metadata as m; assert m.version('apache-flink') == '$FLINK_VERSION'" 2>/dev/null; then
    python3 -m venv .flink/venv
    .flink/venv/bin/pip install --quiet --no-deps "apache-flink==$FLINK_VERSION" "apache-flink-libraries==$FLINK_VERSION"
fi
chmod +x .flink/venv/lib/python3*/site-packages/pyflink/bin/*

stamp=.flink/job-server.pom.sha256
if ! sha256sum --check --status "$stamp" 2>/dev/null || ! ls .flink/beam-runners-flink-*-job-server-*.jar >/dev/null 2>&1; then
    rm -f .flink/beam-runners-flink-*-job-server-*.jar
    mvn -B -q -Dstyle.color=never -f .ci/flink/pom.xml package
    mv .ci/flink/target/beam-runners-flink-*-job-server-*.jar .flink/
    rm -rf .ci/flink/target
    sha256sum .ci/flink/pom.xml > "$stamp"
fi
echo "install_flink: Flink $FLINK_VERSION in .flink/venv, job server $(basename .flink/beam-runners-flink-*-job-server-*.jar)"

#!/usr/bin/env bash
# Installs fake-gcs-server, the GCS emulator that the tests start (tests/fixtures/gcs.py), at a pinned
# version into Go's bin directory (~/go/bin by default), building it with the Go toolchain from the Go
# module proxy. Idempotent: when that version is already there it does nothing. Prints the binary's path
# on stdout (progress goes to stderr), so callers can do: binary="$(bash .ci/install_fake_gcs_server.sh)".
# .ci/run calls it before the tests; the fixture calls it too when it finds no binary.
set -euo pipefail

FAKE_GCS_SERVER_MODULE=github.com/fsouza/fake-gcs-server
FAKE_GCS_SERVER_VERSION=v1.56.1
# go.sum hash of the module at that version (checked by the Go checksum database on download too).
FAKE_GCS_SERVER_SUM='h1:K03sAvbLvDz4hAynpCCUqnNRp+ik9JFSvHbkD/wTPOU='

if ! command -v go >/dev/null 2>&1; then
    echo "install_fake_gcs_server: the Go toolchain (go) is not on PATH; it is needed to build" \
         "${FAKE_GCS_SERVER_MODULE}@${FAKE_GCS_SERVER_VERSION}. Install Go, then run .ci/run." >&2
    exit 1
fi

bin_dir="$(go env GOBIN)"
if [ -z "$bin_dir" ]; then
    bin_dir="$(go env GOPATH)/bin"
fi
binary="$bin_dir/fake-gcs-server"

installed_version() {
    # "mod <module> <version> <sum>" in the build info Go embeds in every binary.
    go version -m "$binary" 2>/dev/null | awk -v m="$FAKE_GCS_SERVER_MODULE" '$1 == "mod" && $2 == m {print $3, $4}'
}

if [ -x "$binary" ] && [ "$(installed_version)" = "$FAKE_GCS_SERVER_VERSION $FAKE_GCS_SERVER_SUM" ]; then
    echo "$binary"
    exit 0
fi

echo "install_fake_gcs_server: building ${FAKE_GCS_SERVER_MODULE}@${FAKE_GCS_SERVER_VERSION} into $bin_dir" >&2
# -mod=mod: build from the module's own go.mod/go.sum, whatever GOFLAGS the machine sets.
GOFLAGS="${GOFLAGS:-} -mod=mod" go install "${FAKE_GCS_SERVER_MODULE}@${FAKE_GCS_SERVER_VERSION}" >&2

if [ "$(installed_version)" != "$FAKE_GCS_SERVER_VERSION $FAKE_GCS_SERVER_SUM" ]; then
    echo "install_fake_gcs_server: $binary is not ${FAKE_GCS_SERVER_VERSION} with sum ${FAKE_GCS_SERVER_SUM}" \
         "after go install (found: '$(installed_version)')." >&2
    exit 1
fi
echo "$binary"

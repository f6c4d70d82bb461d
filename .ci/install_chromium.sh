#!/usr/bin/env bash
# Installs headless Chromium (Debian package) and a basic font, which tests/pipelines/test_reports.py
# starts with --headless to open each HTML report, read its DOM after the scripts ran and save a
# screenshot. Idempotent: does nothing when `chromium` is already on the PATH. Debian/Ubuntu only
# (apt-get); run as root or with sudo available.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "install_chromium: already installed: $(command -v chromium)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
else
    SUDO="sudo"
fi

# apt-get update only when the package lists have never been fetched or do not know chromium.
if ! apt-cache show chromium >/dev/null 2>&1; then
    $SUDO apt-get update
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core
command -v chromium

#!/bin/sh
# Install headless Chromium for tests/test_report_browser.py (Debian / Ubuntu).
# Idempotent: does nothing when a Chromium binary is already on PATH.
set -eu
for b in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$b" >/dev/null 2>&1; then
        echo "chromium.sh: found $(command -v "$b")"
        exit 0
    fi
done
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "chromium.sh: not root and no sudo: install Debian's 'chromium' package by hand" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Debian ships it as 'chromium'; Ubuntu's 'chromium-browser' is a snap stub, so try Debian's name first.
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core \
    || $SUDO apt-get install -y -qq --no-install-recommends chromium-browser fonts-dejavu-core
command -v chromium || command -v chromium-browser

#!/usr/bin/env bash
# Chromium for the browser test of tests/test_space.py: Debian's package, driven by the `playwright` Python package
# (never `playwright install`, which downloads a browser). Idempotent and quiet: does nothing when
# /usr/bin/chromium is there; without apt-get it says so and leaves the test to skip.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: no apt-get here; install Chromium at /usr/bin/chromium for the browser test" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null

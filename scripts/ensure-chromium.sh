#!/usr/bin/env bash
# Make Debian's chromium available for the browser test (tests/test_console_browser.py), which Playwright
# drives through executable_path: nothing here or there ever downloads a browser (no `playwright install`).
# Idempotent and quiet, like ensure-nginx.sh: does nothing when a chromium binary is already there.
set -euo pipefail

have_chromium() { command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; }

have_chromium && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: no chromium and no apt-get; the browser test will be skipped (failed under CI=true)" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
have_chromium || { echo "ensure-chromium: chromium still missing after apt-get install" >&2; exit 1; }

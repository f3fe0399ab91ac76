#!/usr/bin/env bash
# Make what the systemd tests need available (tests/test_deploy_systemd.py, tests/test_systemd_real.py):
# systemd (systemd-analyze, and the real systemd booted as PID 1 in namespaces), python3-venv (the service's
# virtualenv is built from Debian's /usr/bin/python3, as on a VPS), util-linux (unshare, nsenter) and iproute2
# (`ip link set lo up` in the fresh network namespace). Idempotent and quiet: installs only what is missing.
set -euo pipefail

missing=()
command -v systemd-analyze >/dev/null 2>&1 && [ -x /lib/systemd/systemd ] || missing+=(systemd)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
command -v unshare >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || missing+=(iproute2)

[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-systemd: missing ${missing[*]} and no apt-get; the systemd tests skip (and fail under CI=true)" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# --no-install-recommends: no dbus, no extra units; the tests boot systemd only inside their own namespaces.
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v systemd-analyze >/dev/null 2>&1 || { echo "ensure-systemd: systemd still missing after apt-get" >&2; exit 1; }

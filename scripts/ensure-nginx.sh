#!/usr/bin/env bash
# Make Debian's nginx available for the deployment tests (tests/test_deploy_nginx.py).
# Idempotent and quiet: does nothing when an nginx binary is already there; otherwise one
# `apt-get update` and an install of nginx-light (bookworm) or nginx (trixie dropped -light).
set -euo pipefail

have_nginx() { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }

have_nginx && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-nginx: no nginx and no apt-get; the nginx tests will be skipped" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# Where an init system runs, the package's postinst may start Debian's default site on port 80; the tests
# never use it (they run their own nginx on free loopback ports with their own configuration).
$SUDO apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 \
    || $SUDO apt-get install -y -qq --no-install-recommends nginx >/dev/null
have_nginx || { echo "ensure-nginx: nginx still missing after apt-get install" >&2; exit 1; }

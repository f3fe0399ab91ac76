#!/usr/bin/env bash
# Make Debian's PostgreSQL server binaries available for the tests (tests/pg.py runs its own throwaway server:
# initdb in a temp dir, a free loopback port, torn down afterwards; the machine's own cluster is never used).
# Idempotent and quiet: does nothing when initdb is already there; otherwise one `apt-get update` and an
# install of the `postgresql` package.
set -euo pipefail

have_postgres() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1; }

have_postgres && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgresql: no PostgreSQL and no apt-get; the PostgreSQL tests will be skipped (failed under CI=true)" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# Debian's postinst creates (and, where an init system runs, starts) a default cluster on port 5432; the tests
# never use it: they run their own server, as an unprivileged user, in a temporary directory.
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
have_postgres || { echo "ensure-postgresql: PostgreSQL still missing after apt-get install" >&2; exit 1; }

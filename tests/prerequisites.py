"""Tests that need something from the machine (nginx, systemd, namespaces): skip with the reason, or fail in CI.

`make test` installs what these tests need (scripts/ensure-nginx.sh, scripts/ensure-systemd.sh). Under CI=true
a test that still cannot run fails loudly: a skipped deployment test is a promise nobody checked.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True under CI (GitHub Actions, GitLab and most others set CI=true)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Skip the test naming `reason`; under CI fail instead, since `make test` should have provided it."""
    if in_ci():
        pytest.fail(f"cannot run under CI: {reason}", pytrace=False)
    pytest.skip(reason)

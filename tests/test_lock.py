"""requirements.lock, the hash-locked runtime dependencies the VPS and CI install, matches pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _locked() -> dict[str, tuple[str, int]]:
    """name -> (pinned version, number of hashes) from the lock file."""
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    pins: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=\S)", text):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            name = re.sub(r"[-_.]+", "-", match[1]).lower()
            pins[name] = (match[2], block.count("--hash=sha256:"))
    return pins


def test_every_runtime_dependency_is_pinned_with_hashes_within_pyprojects_range() -> None:
    """Each dependency of pyproject.toml is in the lock, pinned to a version its range allows, with hashes."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = _locked()
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{requirement.name} is missing from requirements.lock: run make lock"
        version, hashes = pins[name]
        assert requirement.specifier.contains(version), f"{name}=={version} is outside {requirement.specifier}"
        assert hashes >= 1, f"{name} has no hash in requirements.lock"


def test_every_locked_package_carries_a_hash() -> None:
    """pip's --require-hashes refuses a lock with any unhashed line, so none may exist."""
    assert all(hashes for _, hashes in _locked().values())
    assert "--index-url" not in (ROOT / "requirements.lock").read_text(encoding="utf-8")

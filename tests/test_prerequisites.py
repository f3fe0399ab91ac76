"""A deployment test that cannot run skips with its reason on a workstation and fails under CI."""

from __future__ import annotations

import pytest

from tests.prerequisites import unavailable


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_under_ci_a_missing_tool_fails(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="cannot run under CI: no frobnicator"):
        unavailable("no frobnicator")


@pytest.mark.parametrize("value", [None, "", "false"])
def test_elsewhere_a_missing_tool_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match="no frobnicator"):
        unavailable("no frobnicator")

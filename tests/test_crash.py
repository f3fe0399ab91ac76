"""SIGKILL the real gateway process again and again: the vault always decrypts and no token is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def run_script(name: str, tmp_path: Path, *args: str, timeout: float) -> dict[str, Any]:
    """Run an evidence script with its own sandbox and gateways; return the figures it reports."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *args, "--report", str(report)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert report.exists(), done.stderr[-3000:]
    figures: dict[str, Any] = json.loads(report.read_text())
    print(json.dumps(figures, indent=2))  # shown by pytest -s / on failure: the measured figures
    return figures


def assert_no_token_lost(figures: dict[str, Any], kills: int) -> None:
    """The crash loop's invariants, as the script measured them."""
    assert figures["failures"] == []
    assert figures["kills"] == kills
    assert sum(figures["modes"].values()) + sum(figures["missed_moments"].values()) == kills
    assert sum(figures["outcomes"].values()) == kills
    assert figures["vault_always_decrypted"] is True
    assert figures["vaults_judged"] == kills + 1  # after every kill, and once more after the final stop
    assert set(figures["outcomes"]) <= {"connected", "reauth_refresh_answer_lost"}
    assert figures["final_state"] == "connected"
    # a spent token is presented again only to learn that its answer was lost, once per such loss
    assert figures["refresh_tokens_reused"] <= figures["outcomes"].get("reauth_refresh_answer_lost", 0)
    # every lost pair produced exactly one alert, correctly signed, and none was left undelivered
    alerts = figures["alerts"]
    assert alerts["refresh_answer_lost"] == figures["outcomes"].get("reauth_refresh_answer_lost", 0)
    assert alerts["bad_signatures"] == 0 and alerts["pending_at_end"] == 0


@pytest.mark.slow
def test_twenty_sigkills_leave_a_decryptable_vault_and_a_connected_gateway(tmp_path: Path) -> None:
    """20 kills (random, mid-write, mid-refresh, answer lost): every comeback is connected or provably lost."""
    figures = run_script("crashloop.py", tmp_path, "--kills", "20", "--seed", "3", "--max-seconds", "150",
                         timeout=220)
    assert_no_token_lost(figures, 20)
    assert figures["refreshes_sent"] >= 10  # refreshes really were constant while it was being killed
    assert figures["outcomes"].get("reauth_refresh_answer_lost", 0) > 0  # seed 3 drops answers, then kills
    # the chosen kinds of moment were really reached, not just waited for
    for mode in ("vault_write", "mid_refresh", "lost_answer"):
        assert figures["modes"].get(mode, 0) > 0, (mode, figures["modes"], figures["missed_moments"])


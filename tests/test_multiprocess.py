"""Several gateway processes on one vault under short-lived tokens: no refresh token is ever sent twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_crash import run_script


@pytest.mark.slow
def test_three_processes_on_one_vault_never_send_a_refresh_token_twice(tmp_path: Path) -> None:
    """3 processes, 3 s tokens, /token hammered on each for 15 s: 0 reused, all connected, few refreshes."""
    figures = run_script("multiproc.py", tmp_path, "--processes", "3", "--seconds", "15", "--access-ttl", "3",
                         timeout=90)
    assert figures["failures"] == []
    assert figures["refresh_tokens_reused"] == 0
    assert figures["final_status_per_process"] == [200, 200, 200]
    assert figures["token_answers"] == {"200": figures["token_calls"]}
    assert figures["refreshes"] >= 5  # the pair really rotated during the run (every ttl/2)
    # ~6000 callers' requests, yet about one refresh per half-life: callers do not each spend a token. The
    # lifetime is the token's own whole-second `exp`, 2-3 s after it arrives, so a half-life is 1-1.5 s.
    assert figures["token_calls"] > 1000
    assert figures["refreshes"] <= 15 / 1.0 + 4
    # the locks were contended: more than one process did refresh (all were started before the connect)
    assert sum(1 for n in figures["refreshes_per_process"] if n) >= 2, figures["refreshes_per_process"]
    assert sum(figures["refreshes_per_process"]) == figures["refreshes"]


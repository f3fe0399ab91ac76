"""Three replicas on one PostgreSQL, quickly: kills, a database restart and a proxy burst (scripts/replicas.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.pg import _bindir
from tests.test_crash import run_script


@pytest.mark.slow
def test_three_replicas_survive_kills_and_a_database_restart_and_share_one_rate_budget(tmp_path: Path) -> None:
    """~20 s of kill -9 and restart, one database restart held 2 s, then 3 x 8 proxied calls at once."""
    if _bindir() is None:
        reason = "PostgreSQL server binaries not found (make test installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs a real PostgreSQL: {reason}")
        pytest.skip(reason)
    figures = run_script("replicas.py", tmp_path, "--scenario", "both", "--seconds", "20", "--kill-every", "1", "2",
                         "--db-down", "2", "--calls", "8", timeout=90)
    assert figures["failures"] == []
    run = figures["kill_restart"]
    assert run["kills"] >= 3 and run["restarts"] == run["kills"]
    assert run["database_restarts"] == 1 and run["database_window_s"]["stop_to_accepting"] >= 2
    assert run["refresh_tokens_reused"] == 0
    assert run["refreshes_seen_by_sandbox"] >= 20 / 1.5 / 2  # the pair rotated all along (every ttl/2 = 1.5 s)
    steady = run["token_answers_by_phase"]["steady"]
    assert set(steady) == {"200"} and steady["200"] > 500  # pollers really hit the replicas all the time
    assert run["least_token_life_left_at_receipt_s"] > 0
    assert run["final_token_status_per_replica"] == [200, 200, 200] and run["account_status"] == "connected"
    burst = figures["budget"]
    assert burst["max_requests_in_any_1s_window"] <= 7
    assert burst["requests_seen_by_sandbox"] == 24 and burst["sandbox_429s"] == 0
    assert burst["served_per_replica"] == [{"200": 8}] * 3

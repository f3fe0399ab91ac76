"""Restoring a vault backup: pure marking of every restored pair as due for verification."""

from __future__ import annotations

from dataclasses import replace

from amo_gateway.tokens import CONNECTED, VaultData

RESTORED_NOTE = "restored from a backup: its refresh token is being verified with amoCRM"


def mark_for_verification(data: VaultData, now: float) -> int:
    """Make every connected, refreshable pair due now (its access token expired); return how many.

    Spending the refresh token is the only way to learn whether amoCRM still accepts it: a live one yields
    a new pair, a spent one a definitive refusal (reauth_required) at once. Long-lived tokens are left alone.
    """
    marked = 0
    for account_id, account in data.accounts.items():
        pair = account.tokens
        if account.status != CONNECTED or account.long_lived or pair is None or pair.refresh_token is None:
            continue
        expired = replace(pair, expires_at=min(pair.expires_at, now - 1))
        data.accounts[account_id] = replace(account, tokens=expired, in_flight=None, last_error=RESTORED_NOTE)
        marked += 1
    return marked


def replace_accounts(data: VaultData, restored: VaultData) -> None:
    """The backup's accounts in place of the vault's; pending states and exchange slots stay (they are newer)."""
    data.accounts.clear()
    data.accounts.update(restored.accounts)

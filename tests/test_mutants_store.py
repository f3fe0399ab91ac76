"""The store's cached snapshot (store.py): fast when nothing changed, never blind to another writer.

"Another process" is a second Vault object on the same file, which is what another gateway process is
from the file's point of view.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from amo_gateway import store as store_module
from amo_gateway.errors import IdempotencyConflict, UpstreamUnavailable, VaultUndecryptable
from amo_gateway.manager import Outcome
from amo_gateway.store import RECHECK, Store
from amo_gateway.tokens import Account, PendingState, VaultData
from amo_gateway.vault import KeyRing, Vault


def _add(account_id: str) -> object:
    def change(data: VaultData) -> None:
        data.accounts[account_id] = Account(account_id, "https://x.amocrm.ru")
    return change


class Counting(Vault):
    """A vault that counts how often the store stats and reads it."""

    stats = 0
    reads = 0

    def signature(self) -> tuple[int, int, int, int] | None:
        self.stats += 1
        return super().signature()

    def read(self) -> tuple[VaultData, tuple[int, int, int, int] | None]:
        self.reads += 1
        return super().read()


@pytest.fixture
def paths(tmp_path: Path) -> Path:
    return tmp_path / "vault.enc"


async def test_hot_path_reads_come_from_memory_between_rechecks(paths: Path, keys: KeyRing,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Within RECHECK seconds the store neither stats nor reads the file; after it, one stat and no read."""
    monkeypatch.setattr(store_module, "RECHECK", 60.0)  # no scheduling delay on a loaded machine reaches this
    vault = Counting(paths, keys)
    vault.update(_add("1"))  # type: ignore[arg-type]
    store = Store(vault)
    first = await store.snapshot()
    assert (vault.stats, vault.reads) == (2, 1)  # one stat to compare, one read (which stats under the lock)
    for _ in range(3):
        assert await store.snapshot() is first
    assert (vault.stats, vault.reads) == (2, 1)
    monkeypatch.setattr(store_module, "RECHECK", 0.0)  # as if RECHECK seconds had passed
    assert await store.snapshot() is first
    assert (vault.stats, vault.reads) == (3, 1), "an unchanged file is stat'ed, not read again"


async def test_another_writers_change_shows_up_after_recheck(paths: Path, keys: KeyRing,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process's write is seen once RECHECK has passed, without anyone asking for a recheck."""
    store, other = Store(Vault(paths, keys)), Vault(paths, keys)
    other.update(_add("1"))  # type: ignore[arg-type]
    assert set((await store.snapshot()).accounts) == {"1"}
    other.update(_add("2"))  # type: ignore[arg-type]
    await asyncio.sleep(RECHECK * 1.5)
    assert set((await store.snapshot()).accounts) == {"1", "2"}


async def test_recheck_sees_another_writer_at_once(paths: Path, keys: KeyRing) -> None:
    """Probes ask for recheck=True: the change of a moment ago is seen, RECHECK or not."""
    store, other = Store(Vault(paths, keys)), Vault(paths, keys)
    other.update(_add("1"))  # type: ignore[arg-type]
    await store.snapshot()
    other.update(_add("2"))  # type: ignore[arg-type]
    assert set((await store.snapshot(recheck=True)).accounts) == {"1", "2"}


async def test_missing_vault_is_an_empty_one(paths: Path, keys: KeyRing) -> None:
    """Before the first connect there is no file: the snapshot is empty, twice, and the file is not created."""
    store = Store(Vault(paths, keys))
    assert await store.snapshot() == VaultData()
    assert await store.snapshot(recheck=True) == VaultData()
    assert not await asyncio.to_thread(paths.exists)


async def test_store_picks_up_rotated_keys_once_and_goes_on(paths: Path, keys: KeyRing) -> None:
    """After rotate-key re-encrypted the vault elsewhere, the store asks its key source and reads on."""
    other = Vault(paths, keys)
    other.update(_add("1"))  # type: ignore[arg-type]
    rotated = keys.rotated()
    other.reencrypt(KeyRing([rotated.keys[0]]))  # the old key no longer opens the file
    asked: list[int] = []

    def key_source() -> KeyRing:
        asked.append(1)
        return rotated

    store = Store(Vault(paths, keys), key_source)
    assert set((await store.snapshot()).accounts) == {"1"}
    assert asked == [1]
    assert store.vault.keys is rotated


async def test_undecryptable_vault_without_new_keys_still_fails_loudly(paths: Path, keys: KeyRing) -> None:
    """With no key source, or one that offers the same keys, an unreadable vault raises VaultUndecryptable."""
    Vault(paths, KeyRing([Fernet.generate_key().decode()])).update(_add("1"))  # type: ignore[arg-type]
    for store in (Store(Vault(paths, keys)), Store(Vault(paths, keys), lambda: keys)):
        with pytest.raises(VaultUndecryptable):
            await store.snapshot()


async def test_waiting_for_a_change_sleeps_while_the_file_is_unchanged(paths: Path, keys: KeyRing) -> None:
    """A store that has read nothing yet, and one that has read the file as it is: both sleep until a write."""
    Vault(paths, keys).update(_add("1"))  # type: ignore[arg-type]
    fresh, read = Store(Vault(paths, keys)), Store(Vault(paths, keys))
    await read.snapshot()
    waiters = [asyncio.ensure_future(s.wait_for_change(0.01)) for s in (fresh, read)]
    await asyncio.sleep(0.3)
    assert not any(w.done() for w in waiters)
    Vault(paths, keys).update(_add("2"))  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(*waiters), 5)


async def test_a_write_between_the_last_read_and_the_wait_wakes_it_at_once(paths: Path, keys: KeyRing) -> None:
    """The refresher planned from what it read; a write that lands before it starts waiting must still wake it."""
    Vault(paths, keys).update(_add("1"))  # type: ignore[arg-type]
    store = Store(Vault(paths, keys))
    await store.snapshot()
    Vault(paths, keys).update(_add("2"))  # type: ignore[arg-type]
    await asyncio.wait_for(store.wait_for_change(0.01), 2)


def _add_state(key: str) -> object:
    def change(data: VaultData) -> None:
        data.states[key] = PendingState("authorize", 1.0, 2e9, label=key)
    return change


async def test_a_state_is_peeked_from_memory_and_a_miss_rechecks_the_file(
        paths: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hit costs no stat; a state issued a moment ago by another process is still found (one recheck)."""
    monkeypatch.setattr(store_module, "RECHECK", 60.0)
    vault = Counting(paths, keys)
    vault.update(_add_state("mine"))  # type: ignore[arg-type]
    store = Store(vault)
    await store.snapshot()
    stats = vault.stats
    assert await store.peek_state("mine") == PendingState("authorize", 1.0, 2e9, label="mine")
    assert vault.stats == stats  # served from memory
    Vault(paths, keys).update(_add_state("theirs"))  # type: ignore[arg-type]
    assert await store.peek_state("theirs") == PendingState("authorize", 1.0, 2e9, label="theirs")
    assert await store.peek_state("nobody's") is None


async def test_the_file_backends_answers_keep_their_window_byte_cap_and_eviction_callback(
        paths: Path, keys: KeyRing) -> None:
    evicted: list[int] = []
    answers = Store(Vault(paths, keys)).answers(0.3, 10, on_evict=lambda: evicted.append(1))
    for key in ("a", "b"):
        assert await answers.begin("c", key, "fp") is None
        await answers.finish("c", key, 200, (), b"x" * 8)
    assert evicted == [1] and answers.size == 8  # two 8-byte answers do not fit under 10 bytes: "a" lost its body
    with pytest.raises(IdempotencyConflict, match="evicted"):
        await answers.begin("c", "a", "fp")
    replay = await answers.begin("c", "b", "fp")
    assert replay is not None and replay.body == b"x" * 8
    await asyncio.sleep(0.35)
    assert await answers.begin("c", "b", "fp") is None  # the window has passed: the key is free again


def _disk_full_once(vault: Vault, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The vault's next save fails with ENOSPC once, then saves go through; the list counts the attempts."""
    saves = [0]
    save = vault.save

    def full_once(data: VaultData) -> None:
        saves[0] += 1
        if saves[0] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        save(data)

    monkeypatch.setattr(vault, "save", full_once)
    return saves


def _one_account_disk_full_once(paths: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch
                                ) -> tuple[Vault, list[int]]:
    """A vault holding account 1 with its disk reserve in place, whose next save finds the disk full once."""
    vault = Vault(paths, keys)
    vault.update(_add("1"))  # type: ignore[arg-type]
    vault.reserve.ensure()
    return vault, _disk_full_once(vault, monkeypatch)


async def test_storing_what_amocrm_answered_may_spend_the_disk_reserve(
        paths: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer exists nowhere else: a full disk frees the reserve and the write is tried again."""
    vault, saves = _one_account_disk_full_once(paths, keys, monkeypatch)
    failure = Outcome("1", "transient", error=UpstreamUnavailable("amoCRM failed with HTTP 502"))
    stored = await Store(vault).store_outcomes([failure], 1234.0)
    assert stored["1"].failing_since == 1234.0 and stored["1"].last_error == "amoCRM failed with HTTP 502"
    assert saves[0] == 2 and not vault.reserve.path.exists()
    assert Vault(paths, keys).load().accounts["1"].failing_since == 1234.0


async def test_a_claim_first_puts_the_disk_reserve_in_place(paths: Path, keys: KeyRing) -> None:
    """Before a refresh is sent, room for its answer is set aside (the reserve the answer's write may spend)."""
    vault = Vault(paths, keys)
    vault.update(_add("1"))  # type: ignore[arg-type]
    assert not vault.reserve.path.exists()
    await Store(vault).claim(["1"], 0.0, 600, None, skip_locked=False)
    assert vault.reserve.path.stat().st_size >= vault.reserve.needed()


async def test_storing_a_new_pair_may_spend_the_disk_reserve(
        paths: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    """put_account stores the pair an exchange bought with a code that is now spent: it may use the reserve."""
    vault = Vault(paths, keys)
    vault.reserve.ensure()
    saves = _disk_full_once(vault, monkeypatch)
    await Store(vault).put_account(Account("7", "https://x.amocrm.ru"))
    assert saves[0] == 2 and not vault.reserve.path.exists()
    assert set(Vault(paths, keys).load().accounts) == {"7"}


async def test_opening_on_a_full_disk_goes_on_without_the_reserve(
        paths: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reserve is made early if there is room; a disk already full does not stop the gateway starting."""
    Vault(paths, keys).update(_add("1"))  # type: ignore[arg-type]
    store = Store(Vault(paths, keys))

    def no_room() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.vault.reserve, "ensure", no_room)
    await store.open()
    assert set((await store.snapshot()).accounts) == {"1"}


async def test_an_ordinary_update_on_a_full_disk_keeps_the_reserve_and_refuses(
        paths: Path, keys: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what amoCRM answered may spend the reserve: any other write (a state, a forget) is refused instead."""
    vault, saves = _one_account_disk_full_once(paths, keys, monkeypatch)
    with pytest.raises(OSError):
        await Store(vault).update(_add("2"))  # type: ignore[arg-type]
    assert saves[0] == 1 and vault.reserve.path.exists()
    assert set(Vault(paths, keys).load().accounts) == {"1"}

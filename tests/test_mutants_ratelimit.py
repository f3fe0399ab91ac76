"""The limiter's exact arithmetic (ratelimit.py) on a fake clock: defaults, the window's edge, Retry-After."""

from __future__ import annotations

import pytest

from amo_gateway.errors import QueueFull
from amo_gateway.ratelimit import Limiters, SlidingWindowLimiter


class Timeline:
    """A clock that moves only by the sleeps it is asked for; a sleep of nothing is a spin and fails the test."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0, "the limiter slept for nothing: it would spin at the window's edge"
        self.sleeps.append(seconds)
        self.now += seconds


async def test_default_window_is_one_second_and_the_slot_frees_exactly_then() -> None:
    """Seven sends at one instant; the eighth waits one full second (amoCRM's window) and not a tick more."""
    timeline = Timeline()
    limiter = SlidingWindowLimiter(7, 10, clock=timeline.clock, sleep=timeline.sleep)
    for _ in range(8):
        await limiter.acquire()
    assert timeline.sleeps == [1.0]
    assert timeline.now == 101.0


def test_limiters_hand_out_the_configured_budget() -> None:
    """Every account's limiter gets the configured limit, queue bound and window (amoCRM's second by default)."""
    limiter = Limiters(7, 25, window=2.5).get("31920194")
    assert (limiter.limit, limiter.queue, limiter.window) == (7, 25, 2.5)
    assert Limiters(7, 25).get("31920194").window == 1.0


@pytest.mark.parametrize(("waiting", "window", "seconds"), [
    (0, 1.0, 1), (6, 1.0, 1), (7, 1.0, 2), (13, 1.0, 2), (14, 1.0, 3), (20, 1.0, 3), (13, 2.0, 4), (0, 0.1, 1),
])
def test_retry_after_is_the_time_the_queue_ahead_needs(waiting: int, window: float, seconds: int) -> None:
    """With `waiting` callers ahead and 7 per window, a new caller's turn comes after ceil((waiting+1)/7) windows."""
    limiter = SlidingWindowLimiter(7, 100, window=window)
    limiter.waiting = waiting
    assert limiter.retry_after() == seconds


async def test_full_queue_answer_says_why_in_words() -> None:
    """The 429's detail tells the caller the account's queue is full and to retry later."""
    limiter = SlidingWindowLimiter(7, 0)
    with pytest.raises(QueueFull) as caught:
        await limiter.acquire()
    assert caught.value.detail == "too many requests are queued for this amoCRM account; retry later"
    assert caught.value.retry_after == 1

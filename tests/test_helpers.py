"""The waiting helpers (tests/helpers.py): they wait as long as needed and no longer."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers import eventually, never_within


async def test_eventually_returns_the_checks_value_once_it_passes():
    start = time.monotonic()
    assert await eventually(lambda: time.monotonic() - start > 0.1 and "done") == "done"
    assert time.monotonic() - start < 1.0


async def test_eventually_takes_async_and_asserting_checks():
    box = []
    asyncio.get_running_loop().call_later(0.05, box.append, 1)

    async def check():
        assert box == [1]
        return True

    assert await eventually(check, timeout=2) is True


async def test_eventually_fails_with_the_last_assertion_after_the_timeout():
    def check():
        assert 1 == 2, "still wrong"

    with pytest.raises(AssertionError, match="still wrong"):
        await eventually(check, timeout=0.1)
    with pytest.raises(AssertionError, match="the flag"):
        await eventually(lambda: False, timeout=0.1, what="the flag")


async def test_never_within_watches_the_whole_window_and_fails_as_soon_as_it_happens():
    start = time.monotonic()
    await never_within(0.15, lambda: False)
    assert time.monotonic() - start >= 0.15
    box = []
    asyncio.get_running_loop().call_later(0.05, box.append, 1)
    start = time.monotonic()
    with pytest.raises(AssertionError, match="happened"):
        await never_within(5, lambda: box)
    assert time.monotonic() - start < 1.0

"""Staging ring: never overlaps, never leaks, back-pressure with FIFO fairness."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvd.ring import AsyncRing, RingAllocator, RingError, RingSlot, split_into_chunks

ALIGN = 64


# --- plain behaviour ---------------------------------------------------------------
def test_in_order_then_wrap_to_the_lowest_gap() -> None:
    ring = RingAllocator(1024, align=ALIGN)
    a = ring.alloc(400)  # rounded to 448
    b = ring.alloc(400)
    assert a == RingSlot(0, 0, 448, 0)
    assert b is not None and (b.offset, b.size, b.round) == (448, 448, 0)
    assert ring.alloc(200) is None  # 128 left at the tail, [0, 448) still live
    ring.free(a.slot_id)
    c = ring.alloc(200)  # wraps to the gap a left
    assert c is not None and (c.offset, c.round) == (0, 1)
    assert ring.used == 448 + 256 and ring.max_alloc() == 192  # [256, 448)
    d = ring.alloc(100)  # ring order: just after c
    assert d is not None and (d.offset, d.round) == (256, 1)
    ring.free(b.slot_id)
    ring.free(c.slot_id)
    ring.free(d.slot_id)
    assert ring.is_whole() and ring.used == 0


def test_a_slot_never_freed_pins_only_itself() -> None:
    """Out-of-order frees are reusable at once: a region a stalled sender never writes does not
    stop the ring from handing out the space around it (a strict ring would wait for it)."""
    ring = RingAllocator(1024, align=ALIGN)
    slots = [ring.alloc(256) for _ in range(4)]
    assert all(s is not None for s in slots) and ring.alloc(1) is None
    ring.free(slots[2].slot_id)  # type: ignore[union-attr]
    ring.free(slots[1].slot_id)  # type: ignore[union-attr]
    assert ring.live == 2 and ring.used == 512 and ring.max_alloc() == 512
    pinned = slots[0]
    assert pinned is not None
    for _ in range(50):  # round after round around the slot that is never freed
        got = ring.alloc(256)
        assert got is not None and not (got.offset < pinned.end and pinned.offset < got.end)
        ring.free(got.slot_id)
    ring.free(slots[3].slot_id)  # type: ignore[union-attr]
    assert ring.used == 256 and ring.max_alloc() == 768


def test_errors() -> None:
    ring = RingAllocator(1024, align=ALIGN)
    for bad in (0, -1, 1025, 1.5, True):
        with pytest.raises(RingError):
            ring.alloc(bad)  # type: ignore[arg-type]
    slot = ring.alloc(10)
    assert slot is not None and slot.size == ALIGN and slot.end == ALIGN
    ring.free(slot.slot_id)
    with pytest.raises(RingError):
        ring.free(slot.slot_id)
    with pytest.raises(RingError):
        ring.free(12345)
    for capacity, align in ((0, 64), (1000, 64), (1024, 48), (1024, 0)):
        with pytest.raises(RingError):
            RingAllocator(capacity, align)
    assert isinstance(RingError("x"), ValueError)


def test_full_capacity_and_contains() -> None:
    ring = RingAllocator(1024, align=ALIGN)
    slot = ring.alloc(1024)
    assert slot is not None and ring.free_bytes == 0 and ring.max_alloc() == 0
    assert ring.contains(0, 1024) and ring.contains(1000, 24)
    assert not ring.contains(1000, 25) and not ring.contains(-1, 2) and not ring.contains(0, 0)
    assert not ring.contains(2**70, 1) and not ring.contains("0", 1)  # type: ignore[arg-type]


def test_split_into_chunks() -> None:
    assert split_into_chunks(0, 4) == []
    assert split_into_chunks(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert split_into_chunks(8, 4) == [(0, 4), (4, 4)]
    with pytest.raises(RingError):
        split_into_chunks(10, 0)
    with pytest.raises(RingError):
        split_into_chunks(-1, 4)


@given(st.integers(0, 10_000), st.integers(1, 2_000))
def test_split_into_chunks_covers_exactly(total: int, max_chunk: int) -> None:
    chunks = split_into_chunks(total, max_chunk)
    pos = 0
    for start, length in chunks:
        assert start == pos and 0 < length <= max_chunk
        pos += length
    assert pos == total


# --- properties --------------------------------------------------------------------
def _check_no_overlap(ring: RingAllocator, live: dict[int, RingSlot]) -> None:
    spans = sorted((s.offset, s.end) for s in live.values())
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"overlap in {spans}"
    for s in live.values():
        assert 0 <= s.offset < s.end <= ring.capacity
        assert s.offset % ring.align == 0 and s.size % ring.align == 0
    assert ring.live == len(live)
    assert ring.used + ring.free_bytes == ring.capacity
    assert ring.used >= sum(s.size for s in live.values())


class RingMachine(RuleBasedStateMachine):
    """Random alloc/free in random order against the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.ring = RingAllocator(ALIGN * 32, align=ALIGN)
        self.live: dict[int, RingSlot] = {}

    @rule(size=st.integers(1, ALIGN * 32))
    def alloc(self, size: int) -> None:
        could = self.ring.max_alloc()
        slot = self.ring.alloc(size)
        if slot is None:
            assert self.live, "an empty ring refused a size within capacity"
            assert could < size
            return
        assert slot.size >= size and slot.slot_id not in self.live
        self.live[slot.slot_id] = slot

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        slot_id = data.draw(st.sampled_from(sorted(self.live)))
        self.ring.free(slot_id)
        del self.live[slot_id]
        with pytest.raises(RingError):
            self.ring.free(slot_id)

    @invariant()
    def no_overlap_inside_pool(self) -> None:
        _check_no_overlap(self.ring, self.live)

    @invariant()
    def used_is_the_live_slots(self) -> None:
        assert self.ring.used == sum(slot.size for slot in self.live.values())

    def teardown(self) -> None:
        for slot_id in list(self.live):
            self.ring.free(slot_id)
        assert self.ring.is_whole() and self.ring.used == 0
        slot = self.ring.alloc(self.ring.capacity - self.ring.align)
        assert slot is not None
        self.ring.free(slot.slot_id)
        assert self.ring.is_whole()


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@pytest.mark.parametrize("seed", range(20))
def test_random_sequences_never_overlap_and_never_leak(seed: int) -> None:
    rng = random.Random(seed)
    ring = RingAllocator(ALIGN * 128, align=ALIGN)
    live: dict[int, RingSlot] = {}
    for _ in range(2000):
        if live and rng.random() < 0.45:
            slot_id = rng.choice(list(live))
            ring.free(slot_id)
            del live[slot_id]
        else:
            slot = ring.alloc(rng.randint(1, ALIGN * rng.choice((2, 8, 40))))
            if slot is not None:
                live[slot.slot_id] = slot
        _check_no_overlap(ring, live)
    for slot_id in rng.sample(list(live), len(live)):
        ring.free(slot_id)
    assert ring.is_whole()
    assert ring.alloc(ring.capacity - ALIGN) is not None


# --- async back-pressure -----------------------------------------------------------
async def test_waiter_gets_space_when_another_frees() -> None:
    ring = AsyncRing(RingAllocator(1024, align=ALIGN))
    first = await ring.alloc(1024, timeout=1)
    task = asyncio.create_task(ring.alloc(512, timeout=5))
    await asyncio.sleep(0)
    assert ring.waiting == 1 and not task.done()
    ring.free(first.slot_id)
    slot = await asyncio.wait_for(task, 1)
    assert slot.size == 512 and ring.waiting == 0


async def test_timeout_raises_and_leaves_nothing_behind() -> None:
    ring = AsyncRing(RingAllocator(1024, align=ALIGN))
    first = await ring.alloc(800, timeout=1)
    with pytest.raises(TimeoutError):
        await ring.alloc(800, timeout=0.05)
    assert ring.waiting == 0
    with pytest.raises(asyncio.TimeoutError):
        await ring.alloc(800, timeout=0)
    ring.free(first.slot_id)
    assert ring.allocator.is_whole()


async def test_oversized_raises_at_once() -> None:
    ring = AsyncRing(RingAllocator(1024, align=ALIGN))
    with pytest.raises(RingError):
        await ring.alloc(2048, timeout=10)
    with pytest.raises(RingError):
        await ring.alloc(0, timeout=10)


async def test_fifo_big_request_is_not_starved() -> None:
    ring = AsyncRing(RingAllocator(1024, align=ALIGN))
    held = [await ring.alloc(256, timeout=1) for _ in range(4)]
    order: list[str] = []

    async def want(name: str, size: int) -> RingSlot:
        slot = await ring.alloc(size, timeout=5)
        order.append(name)
        return slot

    big = asyncio.create_task(want("big", 768))
    await asyncio.sleep(0)
    small = asyncio.create_task(want("small", 64))
    await asyncio.sleep(0)
    assert ring.waiting == 2
    ring.free(held[0].slot_id)  # 256 free: small would fit, but big is first in line
    await asyncio.sleep(0.01)
    assert order == [] and ring.waiting == 2
    ring.free(held[1].slot_id)
    ring.free(held[2].slot_id)  # 768 free at the front: big, then small after it
    big_slot = await asyncio.wait_for(big, 1)
    assert order[0] == "big" and big_slot.size == 768
    ring.free(held[3].slot_id)
    small_slot = await asyncio.wait_for(small, 1)
    assert order == ["big", "small"]
    ring.free(big_slot.slot_id)
    ring.free(small_slot.slot_id)
    assert ring.allocator.is_whole()


async def test_new_request_queues_behind_waiters_and_timed_out_head_unblocks_others() -> None:
    ring = AsyncRing(RingAllocator(1024, align=ALIGN))
    held = await ring.alloc(768, timeout=1)
    big = asyncio.create_task(ring.alloc(1024, timeout=0.05))
    await asyncio.sleep(0)
    small = asyncio.create_task(ring.alloc(128, timeout=5))  # would fit, but big is queued
    await asyncio.sleep(0)
    assert not small.done() and ring.waiting == 2
    with pytest.raises(TimeoutError):
        await big
    slot = await asyncio.wait_for(small, 1)  # big gave up: small is served without a free
    ring.free(slot.slot_id)
    ring.free(held.slot_id)
    assert ring.allocator.is_whole()


async def test_cancelled_waiter_leaks_nothing() -> None:
    ring = AsyncRing(RingAllocator(1024, align=ALIGN))
    held = await ring.alloc(1024, timeout=1)
    task = asyncio.create_task(ring.alloc(512, timeout=5))
    await asyncio.sleep(0)
    ring.free(held.slot_id)  # grants the waiter its slot ...
    task.cancel()  # ... but it is cancelled before it runs: the slot must come back
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ring.waiting == 0 and ring.allocator.is_whole()


async def test_many_concurrent_allocs_all_complete() -> None:
    ring = AsyncRing(RingAllocator(ALIGN * 16, align=ALIGN))
    rng = random.Random(7)

    async def worker() -> None:
        for _ in range(20):
            slot = await ring.alloc(rng.randint(1, ALIGN * 8), timeout=5)
            await asyncio.sleep(rng.random() * 0.001)
            ring.free(slot.slot_id)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(16))), 20)
    assert ring.waiting == 0 and ring.allocator.is_whole()


async def test_fail_waiters_on_shutdown() -> None:
    ring = AsyncRing(RingAllocator(1024, align=ALIGN))
    held = await ring.alloc(1024, timeout=1)
    task = asyncio.create_task(ring.alloc(512, timeout=5))
    await asyncio.sleep(0)
    assert ring.fail_waiters("daemon stopping") == 1
    with pytest.raises(RingError, match="daemon stopping"):
        await task
    ring.free(held.slot_id)
    assert ring.waiting == 0 and ring.allocator.is_whole()

"""Staging ring allocator: hands out byte ranges of the receiver's staging pool, in ring order.

The receiver owns one staging pool (design.md section 2). Senders ask for a chunk's
space, the receiver answers with an offset from this ring, the sender writes its block
there, the receiver scatters it into the KV pool and frees the slot. Slots are handed out
in ring order with wrap-around and may be freed in any order; a freed slot's space is
reusable at once (a slot that is never freed pins only itself, not the ring behind it).

What this module must never do: hand out space that overlaps a live slot. SGLang's
``StagingAllocator`` overcommits and relies on the writer's watermark check; here
``alloc`` answers ``None`` instead and the caller waits (``AsyncRing`` turns that into
back-pressure). ``RingAllocator`` is pure (no I/O, no clock, no locks); ``AsyncRing``
must only be used from its event loop's thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

__all__ = ["AsyncRing", "RingAllocator", "RingError", "RingSlot", "split_into_chunks"]


class RingError(ValueError):
    """A request the ring can never satisfy, or a free of a slot it does not hold."""


@dataclass(frozen=True)
class RingSlot:
    """One live range of the pool: ``[offset, offset + size)`` handed out in ``round``.

    ``size`` is the reserved size (the request rounded up to the ring's alignment), so a
    writer may use any prefix of it.
    """

    slot_id: int
    offset: int
    size: int
    round: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise RingError(f"{name} must be a positive integer, got {value!r}")
    return value


class RingAllocator:
    """Next-fit over ``capacity`` bytes ("ring order" with holes reused); never overlaps live slots.

    Slots are handed out in ring order from ``head`` (just past the last slot handed out) and,
    when the tail has no room, from the lowest gap that fits (a wrap: ``round`` counts them).
    They may be freed in any order, and a freed slot's space can be handed out again at once.
    A strict ring reclaims space only from its oldest slot: one region that a stalled sender
    never writes then pins it, and after one wrap nothing behind that region can be handed out,
    so every staged room of the node waits on one peer (tests/redteam/test_staging_hoard.py).
    """

    def __init__(self, capacity: int, align: int = 256) -> None:
        _positive_int("capacity", capacity)
        _positive_int("align", align)
        if align & (align - 1):
            raise RingError(f"align must be a power of two, got {align}")
        if capacity % align:
            raise RingError(f"capacity {capacity} is not a multiple of align {align}")
        self._capacity = capacity
        self._align = align
        self._head = 0
        self._round = 0
        self._next_id = 0
        self._slots: dict[int, RingSlot] = {}
        self._used = 0

    # --- queries -----------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def align(self) -> int:
        return self._align

    @property
    def live(self) -> int:
        """Number of slots handed out and not yet freed."""
        return len(self._slots)

    @property
    def used(self) -> int:
        """Bytes of live slots."""
        return self._used

    @property
    def free_bytes(self) -> int:
        """``capacity - used``; not necessarily contiguous (see ``max_alloc``)."""
        return self._capacity - self._used

    def _gaps(self) -> list[tuple[int, int]]:
        """Free ``(start, end)`` ranges between live slots, in offset order."""
        gaps, pos = [], 0
        for slot in sorted(self._slots.values(), key=lambda x: x.offset):
            if slot.offset > pos:
                gaps.append((pos, slot.offset))
            pos = slot.end
        if pos < self._capacity:
            gaps.append((pos, self._capacity))
        return gaps

    def max_alloc(self) -> int:
        """Largest size ``alloc`` would satisfy right now (0 when the ring is full)."""
        return max((end - start for start, end in self._gaps()), default=0)

    def is_whole(self) -> bool:
        """True when nothing is live (nothing leaked)."""
        return not self._slots and self._used == 0

    def contains(self, offset: int, size: int) -> bool:
        """Whether ``[offset, offset + size)`` lies inside the pool (for peer-supplied offsets)."""
        for value in (offset, size):
            if not isinstance(value, int) or isinstance(value, bool):
                return False
        return offset >= 0 and size > 0 and offset + size <= self._capacity

    def check_size(self, size: int) -> None:
        """RingError for a size no wait can satisfy: not a positive int, or over capacity."""
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise RingError(f"alloc size must be a positive integer, got {size!r}")
        if size > self._capacity:
            raise RingError(f"alloc of {size} bytes exceeds the staging ring's capacity of "
                            f"{self._capacity} bytes: split it into chunks")

    def slot(self, slot_id: int) -> RingSlot | None:
        """The live slot with this id, or None."""
        return self._slots.get(slot_id)

    # --- changes -----------------------------------------------------------------
    def alloc(self, size: int) -> RingSlot | None:
        """A new slot of at least ``size`` bytes, or None if it does not fit now.

        Raises RingError for a size that can never fit (``<= 0`` or ``> capacity``): the
        caller must split it (``split_into_chunks``) instead of waiting forever.
        """
        self.check_size(size)
        need = -(-size // self._align) * self._align
        gaps = self._gaps()
        offset = next((max(start, self._head) for start, end in gaps
                       if end - max(start, self._head) >= need), None)
        if offset is None:  # nothing at or after the head: the lowest gap that fits (a wrap)
            offset = next((start for start, end in gaps if end - start >= need), None)
            if offset is None:
                return None
            self._round += 1
        self._head = offset + need
        slot = RingSlot(slot_id=self._next_id, offset=offset, size=need, round=self._round)
        self._next_id += 1
        self._slots[slot.slot_id] = slot
        self._used += need
        return slot

    def free(self, slot_id: int) -> None:
        """Give a slot back (any order). RingError for an unknown or already freed id."""
        slot = self._slots.pop(slot_id, None) if isinstance(slot_id, int) else None
        if slot is None:
            raise RingError(f"free of unknown or already freed staging slot {slot_id!r}")
        self._used -= slot.size

    def __repr__(self) -> str:
        return (f"RingAllocator(capacity={self._capacity}, align={self._align}, live={self.live}, "
                f"used={self.used}, head={self._head})")


def split_into_chunks(total: int, max_chunk: int) -> list[tuple[int, int]]:
    """``(start, length)`` pieces of ``[0, total)``, each at most ``max_chunk`` long.

    Used to send a context bigger than the ring (or than one staging slot) chunk by chunk.
    """
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise RingError(f"total must be a non-negative integer, got {total!r}")
    _positive_int("max_chunk", max_chunk)
    return [(start, min(max_chunk, total - start)) for start in range(0, total, max_chunk)]


class _Waiter:
    __slots__ = ("future", "size")

    def __init__(self, size: int, future: asyncio.Future[RingSlot]) -> None:
        self.size = size
        self.future = future


class AsyncRing:
    """Back-pressure over a ``RingAllocator``: ``alloc`` waits for space instead of failing.

    Waiters are served strictly first come, first served: while one waits, later requests
    queue behind it even if they would fit, so a big chunk is never starved by small ones.
    Loop-thread only.
    """

    def __init__(self, allocator: RingAllocator) -> None:
        self._ring = allocator
        self._waiters: deque[_Waiter] = deque()

    @property
    def allocator(self) -> RingAllocator:
        return self._ring

    @property
    def waiting(self) -> int:
        """Number of ``alloc`` calls waiting for space."""
        return sum(1 for w in self._waiters if not w.future.done())

    async def alloc(self, size: int, timeout: float | None) -> RingSlot:
        """A slot of ``size`` bytes, waiting up to ``timeout`` seconds for space.

        Raises RingError at once if the size can never fit, TimeoutError when the time is up.
        """
        self._ring.check_size(size)
        self._wake()  # drop waiters that gave up, so an idle queue does not block us
        if not self._waiters:
            slot = self._ring.alloc(size)
            if slot is not None:
                return slot
        future: asyncio.Future[RingSlot] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(size, future)
        self._waiters.append(waiter)
        try:
            # Not asyncio.wait_for: on 3.11 it swallows a cancellation that races a grant.
            async with asyncio.timeout(timeout):
                return await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                # Lost a race: space was granted just as we timed out or were cancelled.
                self.free(future.result().slot_id)
            else:
                if not future.done():
                    future.cancel()
                self._drop(waiter)
                self._wake()  # the head may have left: the next waiter may fit now
            raise

    def free(self, slot_id: int) -> None:
        """Give a slot back and hand the space to waiters in arrival order."""
        self._ring.free(slot_id)
        self._wake()

    def fail_waiters(self, reason: str) -> int:
        """Fail every waiting ``alloc`` with RingError(reason) (shutdown); returns how many."""
        failed = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(RingError(reason))
                failed += 1
        return failed

    def _drop(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():  # timed out or cancelled
                self._waiters.popleft()
                continue
            slot = self._ring.alloc(waiter.size)
            if slot is None:
                return  # strict FIFO: nobody overtakes the head
            self._waiters.popleft()
            waiter.future.set_result(slot)

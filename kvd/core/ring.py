"""Staging ring allocator: hands out byte ranges of the receiver's staging pool, in order.

The receiver owns one staging pool (design.md section 2). Senders ask for a chunk's
space, the receiver answers with an offset from this ring, the sender writes its block
there, the receiver scatters it into the KV pool and frees the slot. Slots are handed out
in ring order with wrap-around (the slack at the end of the pool is wasted until the next
wrap) and may be freed in any order; space comes back when the oldest live slot goes.

What this module must never do: hand out space that overlaps a live slot. SGLang's
``StagingAllocator`` overcommits and relies on the writer's watermark check; here
``alloc`` answers ``None`` instead and the caller waits (``AsyncRing`` turns that into
back-pressure). ``RingAllocator`` is pure (no I/O, no clock, no locks); ``AsyncRing``
must only be used from its event loop's thread.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
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
    """In-order ring over ``capacity`` bytes; never overlaps live slots.

    State: ``head`` is where the next slot starts, ``round`` counts wraps. Live slots are
    kept in allocation order; freed slots stay in that order (as holes) until every older
    slot is freed too, because space is only reclaimed from the oldest end. Hence the
    occupied span is always ``[oldest.offset, head)`` in ring order, plus the wasted tail
    slack of the previous round while the oldest slot is still in it.
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
        # slot_id -> (slot, still live); insertion order is allocation order.
        self._order: OrderedDict[int, tuple[RingSlot, bool]] = OrderedDict()
        self._live = 0

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
        return self._live

    @property
    def used(self) -> int:
        """Bytes not available to new slots: live slots, holes behind the oldest, tail slack."""
        oldest = self._oldest()
        if oldest is None:
            return 0
        if oldest.round == self._round:
            return self._head - oldest.offset
        # Wrapped: [oldest.offset, capacity) (incl. the wasted tail slack) and [0, head).
        return self._capacity - oldest.offset + self._head

    @property
    def free_bytes(self) -> int:
        """``capacity - used``; not necessarily contiguous (see ``max_alloc``)."""
        return self._capacity - self.used

    def max_alloc(self) -> int:
        """Largest size ``alloc`` would satisfy right now (0 when the ring is full)."""
        oldest = self._oldest()
        if oldest is None:
            return self._capacity
        if oldest.round == self._round:
            return max(self._capacity - self._head, oldest.offset)
        return oldest.offset - self._head

    def watermark(self) -> tuple[int, int]:
        """``(round, offset)`` of the oldest live slot, or ``(round, head)`` if none is live.

        Everything before the watermark in ring order is free; it never moves backwards.
        """
        oldest = self._oldest()
        if oldest is None:
            return (self._round, self._head)
        return (oldest.round, oldest.offset)

    def is_whole(self) -> bool:
        """True when nothing is live and no space is held (nothing leaked)."""
        return self._live == 0 and not self._order and self.used == 0

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
        entry = self._order.get(slot_id)
        return entry[0] if entry is not None and entry[1] else None

    # --- changes -----------------------------------------------------------------
    def alloc(self, size: int) -> RingSlot | None:
        """A new slot of at least ``size`` bytes, or None if it does not fit now.

        Raises RingError for a size that can never fit (``<= 0`` or ``> capacity``): the
        caller must split it (``split_into_chunks``) instead of waiting forever.
        """
        self.check_size(size)
        need = -(-size // self._align) * self._align
        oldest = self._oldest()
        if oldest is None or oldest.round == self._round:
            limit_here = self._capacity
            # Wrapping is allowed up to the oldest live slot (or the whole pool if none).
            limit_wrapped = self._capacity if oldest is None else oldest.offset
        else:
            # Already wrapped: free space is [head, oldest.offset); no second wrap.
            limit_here = oldest.offset
            limit_wrapped = -1
        if self._head + need <= limit_here:
            offset = self._head
        elif need <= limit_wrapped:
            self._round += 1
            offset = 0
        else:
            return None
        self._head = offset + need
        slot = RingSlot(slot_id=self._next_id, offset=offset, size=need, round=self._round)
        self._next_id += 1
        self._order[slot.slot_id] = (slot, True)
        self._live += 1
        return slot

    def free(self, slot_id: int) -> None:
        """Give a slot back (any order). RingError for an unknown or already freed id."""
        entry = self._order.get(slot_id)
        if entry is None or not entry[1]:
            raise RingError(f"free of unknown or already freed staging slot {slot_id!r}")
        self._order[slot_id] = (entry[0], False)
        self._live -= 1
        # Reclaim from the oldest end: drop every freed slot in front.
        while self._order:
            first_id, (_, live) = next(iter(self._order.items()))
            if live:
                break
            del self._order[first_id]

    def _oldest(self) -> RingSlot | None:
        if not self._order:
            return None
        return next(iter(self._order.values()))[0]

    def __repr__(self) -> str:
        return (f"RingAllocator(capacity={self._capacity}, align={self._align}, live={self._live}, "
                f"used={self.used}, watermark={self.watermark()})")


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

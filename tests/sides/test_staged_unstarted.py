"""The unstarted share of staged receive rooms (kvd.sides.staged_recv): what a room takes it
gives back, by every ending."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from kvd.sides.staged_recv import StagedReceiver

RING = 1 << 20


def _room(stage: Any, final: bool = False) -> tuple[Any, Any]:
    machine = SimpleNamespace(state=SimpleNamespace(final=final), deadline=time.monotonic() + 30)
    rr = SimpleNamespace(senders={0: SimpleNamespace(daemon="tcp://prefill:1")}, machine=machine)
    st = SimpleNamespace(writers=[SimpleNamespace(sender_rank=0)], stage=stage, started=False,
                         unstarted_bytes=0, slots={}, landed={})
    return rr, st


async def test_a_room_released_while_waiting_for_its_share_takes_none_after() -> None:
    """Two rooms of one stalled prefill end in one pass (its heartbeat lost): the one holding the
    share is released first, then the one waiting for it. The waiter is cancelled, but its wait
    had just been granted (Python 3.11's wait_for then returns instead of raising): it must not
    take a share after its release, or the peer set's share shrinks for good."""
    ctx = SimpleNamespace(now=time.monotonic)
    recv = StagedReceiver(ctx, SimpleNamespace())  # type: ignore[arg-type]
    stage = SimpleNamespace(recv_bytes=RING)
    holder, waiter = _room(stage), _room(stage)
    await recv._unstarted_share(*holder, RING // 2)
    task = asyncio.ensure_future(recv._unstarted_share(*waiter, RING // 2))
    await asyncio.sleep(0.01)
    assert not task.done()
    # One pass (SideBase.peer_dead -> fail -> ReceiverSide.maybe_release, room after room).
    for rr, st, tasks in ((*holder, []), (*waiter, [task])):
        rr.machine.state.final = True
        for t in tasks:
            t.cancel()
        recv.release(rr, st)
    for _ in range(5):
        await asyncio.sleep(0)
    assert task.done()
    assert dict(recv._unstarted) == {}, "a released room still holds unstarted ring bytes"

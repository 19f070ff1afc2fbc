"""Red team: the sender's synchronous drain_now (kvd.sides.direct_send) plans a batch and hands it to a drain task
(sr.handoff). An AbortTransfer handled just before that chunk (its _abort task spawned, not yet
run) sets req.aborted, takes the *free* room lock at once, and answers AbortAck(unsure=False),
"every write of the room has finished or will never be issued": the receiver releases its pages.
The drain task then writes the handed-off batch, planned with the aborted request, into them.

Prefill TP 1 -> decode TP 2: the sender room has two receivers, so one receiver's abort does not
fail the sender room. The aborting receiver's RoomOutcome(ok=False) would fail it, but it is a
separate message (handled in a later receive batch here; an older receiver never sends one).
In-process pair harness (tests/sides/pair.py): deterministic ordering, memcpy transport."""

from __future__ import annotations

from kvd.wire import peer as wp
from tests.sides.pair import Cluster
from tests.sides.test_pair import CANARY, Transfer


async def test_no_transport_write_lands_after_the_abort_ack() -> None:
    c = Cluster()  # inline_max_bytes 0: transport writes, so the chunk is handed to _drain
    try:
        t = Transfer(c, 1, 2)
        t.recv()
        await c.settle()
        (pool0, arrays0), _ = t.dst
        c.hold = lambda d: isinstance(d.msg, wp.AbortTransfer | wp.RoomOutcome)
        t.decode.receivers.abort_from_engine(pool0, 1)  # decode rank 0's engine gives up
        await c.settle()
        abort = next(d.msg for d in c.held if isinstance(d.msg, wp.AbortTransfer))
        later = [d for d in c.held if not isinstance(d.msg, wp.AbortTransfer)]
        c.held.clear()
        c.hold = lambda d: False
        t.prefill.transport.hold()  # a write, once issued, lands when we say
        # One loop pass at the prefill daemon: the peer loop handles the abort, the engine loop
        # the room's only chunk (planned for both receivers, handed to the drain task).
        t.prefill.route(abort)
        t.send(chunks=1)
        await c.settle()
        acks = c.sent(wp.AbortAck)
        assert len(acks) == 1 and not acks[0].unsure
        ev = t.decode.final_event(pool0, 1)
        assert ev is not None and ev.state == "failed" and ev.released, ev  # pages back to the engine
        assert (arrays0.array == CANARY).all()
        t.prefill.transport.release()  # the write issued after the AbortAck lands
        c.held = later
        c.release_held()
        await c.settle()
        changed = int((arrays0.array != CANARY).sum())
        assert changed == 0, f"{changed} bytes landed in decode rank 0's released pages after its AbortAck"
    finally:
        await c.close()

"""Red team (in-memory transport and peers, tests/sides/pair.py): a prefill rank serving two
decode ranks must never tell its engine "success" when one of those decode rooms failed.

Prefill TP 1 -> decode TP 2: the sender wrote every chunk and sent both final statuses. Decode
rank 0 completed and confirmed; decode rank 1's engine aborted its room before its final status
arrived, so it sent an AbortTransfer and then RoomOutcome(ok=False). The sender handles the abort
in a task: when that task ran before the failed outcome was read (a separate read on the peer
socket, or an outcome lost with a reconnect), the abort took rank 1 out of the count, rank 0's
confirmation was all that was left, and the prefill engine heard success for a request whose
decode side failed."""

from __future__ import annotations

import asyncio

from kvd.wire import peer as wp
from tests.sides.test_pair import Transfer


async def _spin(rounds: int = 300) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_an_abort_handled_before_the_failed_outcome_never_reads_as_success(cluster):
    t = Transfer(cluster, 1, 2)
    t.recv()
    await cluster.settle()
    pool1 = t.dst[1][0]
    cluster.hold = lambda d: (isinstance(d.msg, wp.TransferStatus) and d.msg.final and d.msg.pool_key == pool1.key) \
        or (isinstance(d.msg, wp.RoomOutcome) and not d.msg.ok)
    t.send()
    await cluster.settle()
    assert t.decode_events()[0] is not None and t.decode_events()[0].state == "success"
    t.decode.receivers.abort_from_engine(pool1, 1)  # rank 1's room fails before its final status
    await _spin()
    await cluster.settle()
    assert t.decode_events()[1] is not None and t.decode_events()[1].state == "failed"
    cluster.hold = lambda d: False
    cluster.release_held()  # the failed outcome (and rank 1's final status) come late
    await cluster.settle()
    told = [ev.state for _, ev in t.prefill.events if ev.released]
    assert told == ["failed"], f"the prefill engine heard {told} for a room decode rank 1 failed"

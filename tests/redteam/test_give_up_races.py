"""Red team: the decode side's give-up (AbortTransfer naming the prefill engine, protocol 7) and
the prefill side's memory of rooms that ended before any request, against reissued room ids,
late give-ups and hostile reasons. Uses the in-memory transport and peers of tests/sides/pair.py
(no sockets, no Mooncake)."""

from __future__ import annotations

import asyncio

from kvd.core.rooms import MAX_REASON
from kvd.wire import peer as wp
from tests.sides.test_pair import Transfer


def _give_up(t: Transfer, room: int, *, reason: str = "aborted by the decode engine", rank: int = 0,
             transfer_id: int = 4242, src: str | None = None) -> None:
    pool = t.dst[0][0]
    t.cluster.send(src or t.decode.address, t.prefill.address, wp.AbortTransfer(
        room=room, transfer_id=transfer_id, pool_key=pool.key, sender_rank=rank, reason=reason,
        prefill_engine_id="prefill-0"))


def _released(t: Transfer, room: int) -> list[str]:
    return [ev.state for _, ev in t.decode.events if ev.released and ev.room == room]


async def test_a_peers_long_give_up_reason_is_cut_before_it_is_kept(cluster):
    """A give-up for a room the engine has not started is remembered (4,096 rooms) with its
    reason, which is then the reason of the engine's failed room (and of the answer to a late
    request of another daemon). The peer's reason was kept whole: up to peer.max_message_bytes
    (64 MiB) per entry, 4,096 entries. In-memory transport and peers."""
    t = Transfer(cluster, 1, 1)
    junk = "x" * (1 << 20)
    for room in range(1, 9):
        _give_up(t, room, reason=junk, transfer_id=1000 + room)
    await cluster.settle()
    kept = t.prefill.senders._ended_unasked
    assert kept, "the give-ups were not remembered"
    assert all(len(reason) <= MAX_REASON for reason, _ in kept.values()), \
        max(len(r) for r, _ in kept.values())
    t.send(room=1, chunks=1)  # the engine starts the room given up: it fails with the kept reason
    await cluster.settle()
    cluster.clock.advance(cluster.config.bootstrap_timeout_s + 0.1)
    cluster.expire()
    await cluster.settle()
    finals = [ev for _, ev in t.prefill.events if ev.released and ev.room == 1]
    assert finals and all(ev.state == "failed" and 0 < len(ev.reason) <= MAX_REASON for ev in finals), finals


async def test_a_give_up_after_the_engine_ended_its_room_does_not_fail_the_reissue(cluster):
    """SGLang's abort: both engines abort the request. The prefill engine had started its room
    (a chunk) and ends it first; the decode room, still bootstrapping, sends its give-up, which
    arrives after. The engine was told its room ended, so the next first chunk of that id is a
    reissue (the SGLang client may reuse a bootstrap_room), and a reissue whose chunk comes
    first is served (test_a_request_after_the_prefill_room_ended_unasked_fails_at_once). The
    late give-up turned the ended room's memory into "fail its first chunk": the reissue failed.
    In-memory transport and peers."""
    t = Transfer(cluster, 1, 1)
    t.send(chunks=2)
    await cluster.settle()
    for pool, _ in t.src:
        t.prefill.senders.abort_from_engine(pool, 1, "aborted by the prefill engine")
    await cluster.settle()
    _give_up(t, 1)
    await cluster.settle()
    # The reissue: the prefill engine's chunk first, then the decode side's room.
    t.send(room=1, chunks=1)
    t.recv(room=1)
    await cluster.settle()
    assert _released(t, 1) == ["success"], (_released(t, 1), t.prefill.events[-1])
    assert t.verify() == []


async def test_a_give_up_racing_another_ranks_abort_does_not_fail_the_reissue(cluster):
    """Decode TP 2 on one daemon, prefill TP 1 (both decode ranks ask prefill rank 0). The decode
    engine aborts while rank 0 has asked and rank 1 still bootstraps: rank 0's abort fails the
    prefill room (which the engine had started), taken out of the room table at once (every
    receiver gone), and rank 1's give-up arrives after. The engine heard its room failed: a
    reissue of the id (its chunk first) must be served, not failed by that give-up.
    In-memory transport and peers."""
    t = Transfer(cluster, 1, 2)
    t.send(chunks=2)
    await cluster.settle()
    first = t.dst[0][0]
    await t.decode.announce_pool(t.prefill.address, first, "prefill-0", None)  # rank 0 asks at once
    t.recv(room=1)
    assert t.decode.receivers.rooms[(first.pool_id, 1)].requested
    assert not t.decode.receivers.rooms[(t.dst[1][0].pool_id, 1)].requested
    for pool, _ in t.dst:
        t.decode.receivers.abort_from_engine(pool, 1)
    await cluster.settle()
    finals = [ev for _, ev in t.prefill.events if ev.released and ev.room == 1]
    assert [ev.state for ev in finals] == ["failed"], finals
    assert all(s == "failed" for s in _released(t, 1)) and len(_released(t, 1)) == 2
    # The reissue, on both sides.
    t.decode.events.clear()
    t.send(room=1, chunks=1)
    await asyncio.sleep(0)
    t.recv(room=1)
    await cluster.settle()
    assert _released(t, 1) == ["success", "success"], (_released(t, 1), t.prefill.events[-1])
    assert t.verify() == []


async def test_a_room_given_up_mid_announce_sends_no_request_and_ends_both_sides(cluster):
    """The decode room fails while its pool announce waits (here: on a revocation of the prefill
    daemon's session, held open by the pair harness's gate). It is released at once (nothing was
    asked), its give-up fails the prefill engine's room, and when the announce would go on no
    request goes out for it. In-memory transport and peers."""
    t = Transfer(cluster, 1, 1)
    t.send(chunks=1)
    await cluster.settle()
    gate = t.decode.revoke_gate = asyncio.Event()
    t.decode.receivers.fence_peer(t.prefill.address, "test")
    for _ in range(20):
        await asyncio.sleep(0)
    assert t.decode.revoking
    t.recv(room=1)
    for _ in range(20):
        await asyncio.sleep(0)
    pool = t.dst[0][0]
    assert not t.decode.receivers.rooms[(pool.pool_id, 1)].requested
    t.decode.receivers.abort_from_engine(pool, 1)
    await cluster.settle()
    assert _released(t, 1) == ["failed"]
    gate.set()
    await cluster.settle()
    assert not cluster.sent(wp.TransferRequest), "a request went out for a released room"
    finals = [ev for _, ev in t.prefill.events if ev.released and ev.room == 1]
    assert [ev.state for ev in finals] == ["failed"], finals
    assert not t.prefill.senders.rooms and not t.decode.receivers.rooms
    assert not t.decode.errors.get("task_crash") and not t.prefill.errors.get("task_crash")

"""The room sides in one process: real SenderSide/ReceiverSide, in-memory peers, memcpy transport.

Uses the pair harness of tests/sides/pair.py (no sockets, no daemons, no Mooncake): every
test asserts on the bytes in the decode pools (tools.kvpattern patterns, a canary
everywhere else) and on the events the engines get.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import pytest

from kvd.core.planner import map_heads
from kvd.sides.records import ReceiverRoom
from kvd.wire import engine as we
from kvd.wire import peer as wp
from tests.sides.pair import Cluster, FakeDaemon, layout
from tools.kvpattern import fill_prefill, pages_to_tokens, verify_decode

CANARY = 0xA5
SEED = 7


class Transfer:
    """Prefill ranks on one daemon, decode ranks on another, one room."""

    def __init__(self, cluster: Cluster, prefill_tp: int, decode_tp: int, *, kv_heads: int = 4,
                 staged: bool = False, hisparse: bool = False, pages: int = 6, page_size: int = 4) -> None:
        self.cluster = cluster
        self.prefill: FakeDaemon = cluster.daemon("prefill")
        self.decode: FakeDaemon = cluster.daemon("decode")
        if staged:
            self.prefill.enable_staging()
            self.decode.enable_staging()
        self.src = [self.prefill.add_pool(layout("prefill", prefill_tp, r, kv_heads=kv_heads, page_size=page_size))
                    for r in range(prefill_tp)]
        self.dst = [self.decode.add_pool(layout("decode", decode_tp, r, kv_heads=kv_heads, page_size=page_size,
                                                hisparse=hisparse), fill=CANARY) for r in range(decode_tp)]
        for pool, arrays in self.src:
            fill_prefill(arrays, pool.layout, SEED)
        rng = np.random.default_rng(1)
        self.src_pages = rng.choice(32, pages, replace=False).astype(np.int64)
        self.hisparse = hisparse
        self.page_size = page_size
        n_dst = pages * page_size if hisparse else pages
        self.dst_index = rng.choice(32 * (page_size if hisparse else 1), n_dst, replace=False).astype(np.int64)

    def recv(self, room: int = 1, timeout_s: float = 0.0) -> None:
        for pool, _ in self.dst:
            self.decode.receivers.start(pool, we.RecvRoom(
                req_id=1, pool_id=pool.pool_id, room=room, bootstrap_addr=self.prefill.address,
                prefill_engine_id="prefill-0", pages=self.dst_index, timeout_s=timeout_s,
                enable_hisparse=self.hisparse))

    def send(self, room: int = 1, chunks: int = 2, aux: bytes = b"first-token") -> None:
        parts = np.array_split(self.src_pages, chunks)
        offset = 0
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            for pool, _ in self.src:
                self.prefill.senders.on_chunk(pool, we.SendChunk(
                    req_id=1, pool_id=pool.pool_id, room=room, pages=part, is_last=last,
                    aux=aux if last else b"", page_offset=offset))
            offset += len(part)

    def verify(self) -> list[str]:
        problems = []
        src_tokens = pages_to_tokens(self.src_pages, self.page_size)
        dst_tokens = self.dst_index if self.hisparse else pages_to_tokens(self.dst_index, self.page_size)
        for pool, arrays in self.dst:
            problems += verify_decode(arrays, pool.layout, src_tokens, dst_tokens, SEED, CANARY)
        return problems

    def decode_events(self, room: int = 1) -> list[we.RoomEvent | None]:
        return [self.decode.final_event(pool, room) for pool, _ in self.dst]


@pytest.fixture
async def cluster():
    c = Cluster()
    yield c
    await c.close()


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "kv_heads"),
                         [(1, 1, 4), (2, 1, 4), (1, 2, 4), (4, 2, 4), (3, 1, 3), (4, 1, 2), (1, 4, 2), (2, 4, 8)])
async def test_direct_transfer_is_exact_for_every_tp_pair(cluster, prefill_tp, decode_tp, kv_heads):
    t = Transfer(cluster, prefill_tp, decode_tp, kv_heads=kv_heads)
    t.recv()
    await cluster.settle()
    t.send()
    await cluster.settle()
    assert t.verify() == []
    events = t.decode_events()
    assert all(ev is not None and ev.state == "success" and ev.aux == b"first-token" for ev in events), events
    assert not t.decode.receivers.rooms and not t.prefill.senders.rooms
    assert not t.decode.errors and not t.prefill.errors


async def test_completion_is_counted_per_sender_rank(cluster):
    """TP 2 -> 1: one sender's final report is not enough; each rank reports once."""
    t = Transfer(cluster, 2, 1)
    t.recv()
    await cluster.settle()
    cluster.hold = lambda d: isinstance(d.msg, wp.TransferStatus) and d.msg.final and d.msg.sender_rank == 1
    t.send()
    await cluster.settle()
    rr: ReceiverRoom = next(iter(t.decode.receivers.rooms.values()))
    assert rr.tracker is not None and rr.tracker.missing == [1]
    assert not rr.machine.state.final
    cluster.hold = lambda d: False
    cluster.release_held()
    await cluster.settle()
    assert t.decode_events()[0].state == "success"
    assert t.verify() == []


async def test_gqa_replicas_get_dummy_requests_and_send_each_head_once(cluster):
    """4 prefill ranks, 2 KV heads: ranks 0/1 and 2/3 are replicas; one of each pair writes."""
    t = Transfer(cluster, 4, 1, kv_heads=2)
    t.recv()
    await cluster.settle()
    requests = cluster.sent(wp.TransferRequest)
    mapping = map_heads(2, 4, 1)
    assert sorted(r.sender_rank for r in requests if not r.dummy) == sorted(mapping.required_senders(0))
    assert sorted(r.sender_rank for r in requests) == sorted(mapping.notified_senders(0))
    assert any(r.dummy for r in requests)
    t.send()
    await cluster.settle()
    assert t.verify() == []
    assert t.decode_events()[0].state == "success"


async def test_abort_releases_only_after_the_sender_fenced_and_nothing_lands_after(cluster):
    t = Transfer(cluster, 1, 1)
    t.recv()
    await cluster.settle()
    t.prefill.transport.hold()  # the first write stays in flight
    t.send(chunks=1)
    await cluster.settle(50)
    pool, arrays = t.dst[0]
    t.decode.receivers.abort_from_engine(pool, 1)
    await cluster.settle(50)
    assert t.decode.final_event(pool, 1) is None, "released while a write could still land"
    failed = [ev for _, ev in t.decode.events if ev.state == "failed"]
    assert failed and "aborted" in failed[0].reason
    t.prefill.transport.release()
    await cluster.settle()
    ev = t.decode.final_event(pool, 1)
    assert ev is not None and ev.state == "failed" and ev.released
    snapshot = arrays.array.copy()
    await cluster.settle()
    assert np.array_equal(snapshot, arrays.array), "bytes landed after release"


async def test_late_messages_after_release_never_touch_a_new_room_with_the_same_id(cluster):
    t = Transfer(cluster, 1, 1)
    t.recv()
    await cluster.settle()
    t.send()
    await cluster.settle()
    old = cluster.sent(wp.TransferStatus)[-1]
    assert t.decode_events()[0].state == "success"
    t.decode.events.clear()
    t.recv()  # the engine reuses room 1
    await cluster.settle()
    t.decode.route(old)  # a replayed final status of the first transfer
    await cluster.settle()
    assert t.decode.errors["stale_message"] == 0, "a late message of a room just released is expected"
    rr = next(iter(t.decode.receivers.rooms.values()))
    assert not rr.machine.state.final and rr.tracker is not None and not rr.tracker.reported
    t.decode.route(dataclasses.replace(old, transfer_id=old.transfer_id ^ 1))  # one never seen here
    await cluster.settle()
    assert t.decode.errors["stale_message"] == 1
    assert not rr.machine.state.final and not rr.tracker.reported


async def test_a_room_whose_prefill_never_sends_ends_at_its_deadline(cluster):
    t = Transfer(cluster, 2, 1)
    t.recv(timeout_s=3.0)
    await cluster.settle()
    cluster.clock.advance(2.0)
    cluster.expire()
    assert t.decode.receivers.rooms, "ended before its deadline"
    cluster.clock.advance(1.5)
    cluster.expire()
    await cluster.settle()
    ev = t.decode_events()[0]
    assert ev is not None and ev.state == "failed" and "timed out" in ev.reason
    assert t.decode.errors["timeout"] == 1
    assert t.verify() != [] and all("canary" not in p for p in t.verify())  # nothing written, nothing stray
    assert not t.prefill.senders.rooms  # the abort reached the senders


async def test_staged_room_goes_chunk_by_chunk_and_frees_its_staging(cluster):
    t = Transfer(cluster, 2, 1, staged=True, pages=12)
    t.recv()
    await cluster.settle()
    rr = next(iter(t.decode.receivers.rooms.values()))
    assert rr.staged is not None
    chunks = rr.staged.ledger.geometry.num_chunks
    assert chunks > 1
    grants = cluster.sent(wp.StagingGrant)
    assert grants, "regions are granted (prefetched) before prefill sends anything"
    t.send(chunks=3)
    await cluster.settle()
    assert t.verify() == []
    assert t.decode_events()[0].state == "success"
    assert len(cluster.sent(wp.ChunkWritten)) == chunks * 2
    assert t.decode._stage.whole and t.prefill._stage.whole
    assert t.decode.receivers.paths


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "kv_heads"), [(1, 1, 4), (2, 2, 4), (4, 4, 2)])
@pytest.mark.parametrize("fragmented", [True, False])
async def test_a_fragmented_same_tp_room_is_staged_and_exact(cluster, prefill_tp, decode_tp, kv_heads, fragmented):
    """Same TP with receiver pages in many one-page runs: per-run writes would be one transport
    op per page and buffer, so the room is staged (gathered into bulk writes). The same room on
    contiguous pages stays direct. Every byte and canary checked either way."""
    from kvd.core.rooms import TransferPath

    # Opted in (staging.same_tp_run_bytes); these pools are tiny: any room counts as long.
    cluster.config = dataclasses.replace(cluster.config, staging_same_tp_run_bytes=256 << 10,
                                         staging_same_tp_min_bytes=1)
    t = Transfer(cluster, prefill_tp, decode_tp, kv_heads=kv_heads, staged=True, pages=24)  # random: ~24 runs
    if not fragmented:
        t.src_pages = np.arange(4, 28, dtype=np.int64)
        t.dst_index = np.arange(8, 32, dtype=np.int64)
    t.recv()
    await cluster.settle()
    rr = next(iter(t.decode.receivers.rooms.values()))
    assert rr.path is (TransferPath.STAGED if fragmented else TransferPath.DIRECT)
    assert (rr.staged is not None) == fragmented
    t.send(chunks=3)
    await cluster.settle()
    assert t.verify() == []
    assert all(ev is not None and ev.state == "success" for ev in t.decode_events())
    assert t.decode._stage.whole and t.prefill._stage.whole


async def test_one_pass_answer_skips_staging_and_writes_row_copies(cluster):
    """Senders that answer one_pass (same node, GPU pools) get a direct request although both
    sides stage: each head slice goes as one row copy per batch (expanded to ops by the
    in-memory transport, which cannot run the kernel), every byte and canary checked."""
    from kvd.core.rooms import TransferPath

    cluster.one_pass = True
    t = Transfer(cluster, 4, 1, staged=True, pages=12)
    t.recv()
    await cluster.settle()
    rr = next(iter(t.decode.receivers.rooms.values()))
    assert rr.staged is None and rr.path is TransferPath.DIRECT
    assert not cluster.sent(wp.StagingGrant)
    t.send(chunks=3)
    await cluster.settle()
    assert t.verify() == []
    assert t.decode_events()[0].state == "success"
    assert all(r.chunk_tokens == 0 for r in cluster.sent(wp.TransferRequest))


async def test_hisparse_writes_token_indices_into_the_host_pool(cluster):
    t = Transfer(cluster, 2, 1, hisparse=True)
    t.recv()
    await cluster.settle()
    t.send()
    await cluster.settle()
    assert t.verify() == []
    assert t.decode_events()[0].state == "success"


@pytest.mark.parametrize("prefill_tp", [1, 2])
async def test_a_burst_of_chunks_plans_as_one_and_the_last_may_end_short(cluster, prefill_tp):
    """Chunks that arrive while a batch is in flight are planned as one batch (HiSparse too):
    the room ends three tokens into its last page, and every byte still lands where it should."""
    t = Transfer(cluster, prefill_tp, 1, hisparse=True, pages=10)
    t.dst_index = t.dst_index[:-3]
    t.prefill.transport.hold()  # the first batch stays in flight: the rest queue up behind it
    t.recv()
    await cluster.settle()
    t.send(chunks=5)
    await cluster.settle()
    t.prefill.transport.release()
    await cluster.settle()
    src = pages_to_tokens(t.src_pages, t.page_size)[:len(t.dst_index)]
    problems = [p for pool, arrays in t.dst
                for p in verify_decode(arrays, pool.layout, src, t.dst_index, SEED, CANARY)]
    assert problems == []
    assert t.decode_events()[0].state == "success"


async def test_a_burst_of_chunks_is_drained_by_one_task(cluster):
    """Chunks an engine sent without waiting arrive together: the first starts the room's drain
    task and the rest are that task's (planned as one batch), not one task each."""
    t = Transfer(cluster, 1, 1, pages=10)
    t.recv()
    await cluster.settle()
    spawned: list[str] = []
    spawn = t.prefill.spawn

    def counting_spawn(coro: Any, name: str) -> Any:
        spawned.append(name)
        return spawn(coro, name)

    t.prefill.spawn = counting_spawn  # type: ignore[method-assign]
    t.send(chunks=5)
    await cluster.settle()
    assert t.verify() == []
    assert t.decode_events()[0].state == "success"
    assert spawned.count("drain-1") == 1, spawned


async def test_a_burst_whose_earlier_chunks_overflow_a_hisparse_room_fails_it(cluster):
    """Only the room's last chunk may end short: a burst planned as one still refuses earlier
    chunks that do not fit (the room fails with the reason; nothing lands outside its tokens)."""
    t = Transfer(cluster, 1, 1, hisparse=True, pages=10)
    t.dst_index = t.dst_index[:t.page_size * 2 + 1]  # room for two pages and a token
    t.prefill.transport.hold()
    t.recv()
    await cluster.settle()
    t.send(chunks=5)  # two pages per chunk
    await cluster.settle()
    t.prefill.transport.release()
    await cluster.settle()
    event = t.decode_events()[0]
    assert event is not None and event.state == "failed"
    none = np.zeros(0, dtype=np.int64)  # the room's tokens may be partly written; the rest hold the canary
    problems = [p for pool, arrays in t.dst
                for p in verify_decode(arrays, pool.layout, none, none, SEED, CANARY, ignore_tokens=t.dst_index)]
    assert problems == []
    assert "more tokens" in event.reason


async def test_a_sender_rank_reporting_twice_fails_the_room_not_the_side(cluster):
    t = Transfer(cluster, 2, 1)
    t.recv()
    await cluster.settle()
    t.send()
    await cluster.settle()
    final = [m for m in cluster.sent(wp.TransferStatus) if m.final][0]
    t.decode.events.clear()
    t.recv(room=2)
    await cluster.settle()
    rr = next(iter(t.decode.receivers.rooms.values()))
    forged = wp.TransferStatus(src=final.src, room=2, transfer_id=rr.transfer_id, pool_key=rr.pool.key,
                               sender_rank=0, ok=True, final=True)
    t.decode.route(forged)
    t.decode.route(forged)
    await cluster.settle()
    assert t.decode.errors["bad_peer_message"] >= 1
    assert t.decode.receivers.rooms == {} or all(r.machine.state.final for r in t.decode.receivers.rooms.values())


async def test_a_stalled_sender_is_fenced_off_and_no_byte_lands_after_release(cluster):
    """Defect 1: the sender stalls mid-write (its write held), the room fails at its deadline,
    the abort is never answered; after the fence time the receiver revokes the sender's receive
    session and only then releases; the stalled write resumes and lands nothing."""
    t = Transfer(cluster, 1, 1)
    t.recv(timeout_s=3.0)
    await cluster.settle()
    t.prefill.transport.hold()  # the sender's write is in flight and stays there (a SIGSTOP)
    cluster.hold = lambda d: isinstance(d.msg, wp.AbortAck)  # and it never answers the abort
    t.send(chunks=1)
    await cluster.settle(50)
    pool, arrays = t.dst[0]
    cluster.clock.advance(3.5)  # transferring deadline (3 s) passes
    cluster.expire()
    await cluster.settle(50)
    assert t.decode.final_event(pool, 1) is None, "released while the stalled sender could still write"
    cluster.clock.advance(cluster.config.abort_fence_s + 0.1)
    cluster.expire()
    await cluster.settle()
    ev = t.decode.final_event(pool, 1)
    assert ev is not None and ev.state == "failed" and ev.released
    assert t.decode.revoked == [t.prefill.address]
    arrays.array[:] = 0x5A  # the engine reuses its pages: a sentinel that must survive
    t.prefill.transport.release()  # the stalled sender resumes
    await cluster.settle()
    assert (arrays.array == 0x5A).all(), "bytes of the dead room landed after release"
    prefill_final = [ev for _, ev in t.prefill.events if ev.released]
    assert prefill_final and prefill_final[0].state == "failed", "prefill told success for a failed room"


async def _spin(rounds: int = 300) -> None:
    """Let queued messages and tasks run, without waiting for a held write to end."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_a_room_id_reissued_after_a_healed_partition_is_a_new_room(cluster):
    """Red team round 7: a partition (both daemons declare the other dead) while a sender's write
    is in flight. The prefill engine hears the room failed at once, but the room stayed in the
    sender's table under its id until that write ended (a transport timeout later), so the same
    room id re-issued after the heal was refused ("chunk at page offset 0, expected N") or its
    request joined the dead room ("asked twice"). Re-issued, it is a new room: exact, and the
    stalled write of the old one lands nothing in the same pages."""
    t = Transfer(cluster, 1, 1)
    t.recv()
    await cluster.settle()
    t.prefill.transport.hold()  # the write is on the wire when the link goes down
    t.send(chunks=1)
    await _spin()  # settle() waits out a held write (seconds)
    t.prefill.senders.peer_dead(t.decode.address, "decode daemon")  # heartbeats missed, both ways
    t.decode.receivers.peer_dead(t.prefill.address, "prefill daemon")
    await _spin()
    src_pool, _ = t.src[0]
    told = [ev for pid, ev in t.prefill.events if pid == src_pool.pool_id and ev.room == 1 and ev.released]
    assert told and told[0].state == "failed", "the prefill engine must hear the failure at once"
    pool, arrays = t.dst[0]
    ev = t.decode.final_event(pool, 1)
    assert ev is not None and ev.state == "failed" and t.decode.revoked == [t.prefill.address]
    assert t.prefill.senders.busy_pools() == {src_pool.pool_id}, "the stalled write keeps its pool busy"
    # The link heals; both engines issue room 1 again, the same decode pages, other source pages.
    t.src_pages = np.setdiff1d(np.arange(32), t.src_pages)[:len(t.src_pages)]
    t.recv()
    t.send(chunks=1)
    await _spin()
    t.prefill.transport.release()  # the old write resumes: its session is revoked
    await cluster.settle()
    evs = [e for pid, e in t.decode.events if pid == pool.pool_id and e.room == 1 and e.released]
    assert [e.state for e in evs] == ["failed", "success"], evs
    assert t.verify() == []
    told = [ev for pid, ev in t.prefill.events if pid == src_pool.pool_id and ev.room == 1 and ev.released]
    assert [e.state for e in told] == ["failed", "success"], told
    assert not t.prefill.senders.rooms and not t.prefill.senders.busy_pools() and not t.decode.receivers.rooms


async def test_the_prefill_engine_hears_the_receivers_verdict_not_its_own(cluster):
    """Defect 7: sender rank 0 finished and reported; rank 1 fails; the decode room fails, so
    rank 0's engine must hear failed, not success."""
    t = Transfer(cluster, 2, 1)
    t.recv()
    await cluster.settle()
    src1, _ = t.src[1]
    for pool, _ in t.src[:1]:  # only rank 0's engine produces its chunks
        t.prefill.senders.on_chunk(pool, we.SendChunk(req_id=1, pool_id=pool.pool_id, room=1, pages=t.src_pages,
                                                      is_last=True, aux=b"x", page_offset=0))
    await cluster.settle()
    assert any(m.final and m.ok and m.sender_rank == 0 for m in cluster.sent(wp.TransferStatus))
    t.prefill.senders.abort_from_engine(src1, 1, "rank 1 engine gave up")
    await cluster.settle()
    decode_ev = t.decode_events()[0]
    assert decode_ev is not None and decode_ev.state == "failed"
    states = {pid: ev.state for pid, ev in t.prefill.events if ev.released}
    assert states == {t.src[0][0].pool_id: "failed", src1.pool_id: "failed"}


async def test_staged_chunks_fit_the_smallest_senders_send_ring(cluster):
    """Defect 8: a sender whose send ring is smaller than the receiver's chunk region; the
    receiver plans chunks that fit, and the room succeeds."""
    t = Transfer(cluster, 1, 2, staged=False, pages=24, kv_heads=4)
    t.prefill.enable_staging(8 * 1024)  # send ring of 2 KiB: a few tokens per block
    t.decode.enable_staging(1 << 20)
    for i, (pool, arrays) in enumerate(t.src):  # re-register the pools for the staged path
        from kvd.mem.stagemem import pool_tensors
        pool.tensors, pool.device = pool_tensors(pool.layout, arrays.opened()), "cpu"
        t.src[i] = (pool, arrays)
    for pool, arrays in t.dst:
        from kvd.mem.stagemem import pool_tensors
        pool.tensors, pool.device = pool_tensors(pool.layout, arrays.opened()), "cpu"
    for reg in (t.prefill._stage, t.decode._stage):
        assert reg is not None
    t.prefill.transport.register(t.prefill._stage.base, t.prefill._stage.nbytes)
    t.decode.transport.register(t.decode._stage.base, t.decode._stage.nbytes)
    t.recv()
    await cluster.settle()
    rooms = list(t.decode.receivers.rooms.values())
    assert all(rr.staged is not None for rr in rooms)
    block = max(rr.staged.ledger.geometry.block_bytes(0) for rr in rooms)
    assert block <= t.prefill._stage.send_capacity // 2
    t.send(chunks=2)
    await cluster.settle()
    assert [ev.state for ev in t.decode_events()] == ["success", "success"]
    assert t.verify() == []


async def test_an_engine_timeout_never_outlives_the_configured_maximum(cluster):
    """Defect 6: timeout_s = inf (or nan) is clamped to the configured waiting timeout."""
    t = Transfer(cluster, 1, 1)
    t.recv(timeout_s=float("inf"))
    await cluster.settle()
    rr = next(iter(t.decode.receivers.rooms.values()))
    assert rr.machine.deadlines.waiting_for_input == cluster.config.waiting_timeout_s
    cluster.clock.advance(cluster.config.waiting_timeout_s + 0.1)
    cluster.expire()
    await cluster.settle()
    ev = t.decode_events()[0]
    assert ev is not None and ev.state == "failed"


async def test_one_sender_rank_serving_several_receivers_reports_each_its_own_bytes(cluster):
    """Small defect: with one prefill rank and k decode ranks, bytes_done is per receiver."""
    t = Transfer(cluster, 1, 4, kv_heads=4)
    t.recv()
    await cluster.settle()
    t.send()
    await cluster.settle()
    events = t.decode_events()
    assert all(ev is not None and ev.state == "success" for ev in events)
    assert all(ev.bytes_done == ev.bytes_total for ev in events), [(e.bytes_done, e.bytes_total) for e in events]


async def test_a_failed_write_is_fenced_by_revocation_not_by_the_senders_word(cluster):
    """A write that failed mid-flight (a timeout: its bytes may still sit in the receiver's socket
    buffers) cannot be vouched for by the sender; the receiver revokes its session before release."""
    t = Transfer(cluster, 1, 1)
    t.recv()
    await cluster.settle()
    released_before_revoke: list[bool] = []
    revoke = t.decode.revoke_peer

    async def revoke_and_look(peer: str, reason: str) -> None:
        # The CI-found race (stalled_peer on HiSparse): the failed final status released the room
        # before "unsure" was read, so the fence came after the pages were the engine's again.
        released_before_revoke.append(t.decode.final_event(t.dst[0][0], 1) is not None)
        await revoke(peer, reason)

    t.decode.revoke_peer = revoke_and_look  # type: ignore[method-assign]
    t.prefill.transport.fail_next(1)
    t.send(chunks=1)
    await cluster.settle()
    assert released_before_revoke == [False], "the room was released before its writer was fenced off"
    final = [m for m in cluster.sent(wp.TransferStatus) if m.final]
    assert final and not final[0].ok and final[0].unsure
    ev = t.decode_events()[0]
    assert ev is not None and ev.state == "failed" and ev.released
    assert t.decode.revoked == [t.prefill.address], "released on the sender's word alone"


async def test_an_abort_after_the_sender_forgot_the_room_still_hears_unsure(cluster):
    """The CI-found case (stop_decode on HiSparse): the sender's write failed mid-flight while the
    receiver was stopped, the sender's room ended, and its final report never arrived. The
    receiver's deadline abort must still hear "unsure" and fence; an abort ack is not a fence."""
    t = Transfer(cluster, 1, 1)
    t.recv()
    await cluster.settle()
    cluster.hold = lambda d: isinstance(d.msg, wp.TransferStatus)  # the receiver is stopped: nothing arrives
    t.prefill.transport.fail_next(1)
    t.send(chunks=1)
    await cluster.settle()
    assert not t.prefill.senders.rooms, "the sender room has ended"
    cluster.held.clear()  # ... and its reports are lost (a reconnect dropped them)
    cluster.clock.advance(cluster.config.waiting_timeout_s + 0.1)
    cluster.expire()
    await cluster.settle()
    acks = cluster.sent(wp.AbortAck)
    assert acks and all(a.unsure for a in acks)
    ev = t.decode_events()[0]
    assert ev is not None and ev.state == "failed" and ev.released
    assert t.decode.revoked == [t.prefill.address], "released on the sender's word alone"


@pytest.mark.parametrize("chunks", [[2, 1, 0], [3, 0], [0, 3], [1, 0, 2]])
@pytest.mark.parametrize("stepwise", [False, True])
@pytest.mark.parametrize("hisparse", [True, False])
async def test_a_room_may_end_with_an_empty_chunk(cluster, chunks, stepwise, hisparse):
    """An engine may report a room's last chunk with no pages (SGLang does, when the last page
    went with the chunk before): the room ends there, exact. A HiSparse room, which ends two
    tokens into its last page, failed with "sender sent more tokens" (the page before the empty
    chunk was held to fit whole) or "token length must be a positive integer, got 0"."""
    t = Transfer(cluster, 2, 1, hisparse=hisparse, pages=3)
    if hisparse:
        t.dst_index = t.dst_index[:-2]
    t.recv()
    await cluster.settle()
    offset = 0
    for i, n in enumerate(chunks):
        last = i == len(chunks) - 1
        for pool, _ in t.src:
            t.prefill.senders.on_chunk(pool, we.SendChunk(
                req_id=1, pool_id=pool.pool_id, room=1, pages=t.src_pages[offset:offset + n], is_last=last,
                aux=b"first-token" if last else b"", page_offset=offset))
        offset += n
        if stepwise:  # each chunk written before the next one arrives
            await cluster.settle()
    await cluster.settle()
    event = t.decode_events()[0]
    assert event is not None and event.state == "success", event
    src = pages_to_tokens(t.src_pages, t.page_size)[:len(t.dst_index)] if hisparse else None
    problems = [p for pool, arrays in t.dst
                for p in verify_decode(arrays, pool.layout, src, t.dst_index, SEED, CANARY)] if hisparse \
        else t.verify()
    assert problems == []


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "kv_heads", "staged"),
                         [(1, 1, 4, False), (2, 1, 4, False), (4, 1, 2, False), (2, 1, 4, True), (1, 2, 4, True)])
async def test_a_sender_daemon_that_forgot_the_pool_is_told_again_and_the_room_goes_on(
        cluster, prefill_tp, decode_tp, kv_heads, staged):
    """The decode daemon cached the prefill daemon's acceptance of its pool, but the prefill daemon
    no longer knows the pool (it forgot it as idle, or restarted): its refusal says so
    (``pool_unknown``), the receiver announces the pool again and asks once more, and the room is
    byte-exact (dummy senders and staged grants included). In-memory transport and peers."""
    t = Transfer(cluster, prefill_tp, decode_tp, kv_heads=kv_heads, staged=staged)
    t.recv(room=1)
    await cluster.settle()
    t.send(room=1)
    await cluster.settle()
    assert all(ev is not None and ev.state == "success" for ev in t.decode_events(1))
    accepted = {(d, p.key): t.decode.pool_accepted_now(d, p, "prefill-0")
                for d in (t.prefill.address,) for p, _ in t.dst}
    assert all(a is not None for a in accepted.values())
    t.decode.pool_accepted_now = lambda d, p, e: accepted.get((d, p.key))  # type: ignore[method-assign]
    t.prefill.remote_pools.clear()  # the prefill daemon forgot every decode pool
    t.recv(room=2)
    await cluster.settle()
    t.send(room=2)
    await cluster.settle()
    events = t.decode_events(2)
    assert all(ev is not None and ev.state == "success" for ev in events), events
    assert t.verify() == []
    assert 0 < t.decode.errors["pool_announced_again"] <= prefill_tp * decode_tp  # once per sender link
    assert set(t.decode.errors) == {"pool_announced_again"}, t.decode.errors


async def test_a_second_unknown_pool_refusal_fails_the_room_with_the_reason(cluster):
    """Asked once more and refused again (the sender daemon still does not know the pool): the
    room fails, with the sender's reason, within its deadline. In-memory transport and peers."""
    t = Transfer(cluster, 1, 1)
    accepted: dict[str, Any] = {}
    t.recv(room=1)
    await cluster.settle()
    t.send(room=1)
    await cluster.settle()
    pool = t.dst[0][0]
    accepted[pool.key] = t.decode.pool_accepted_now(t.prefill.address, pool, "prefill-0")
    t.decode.pool_accepted_now = lambda d, p, e: accepted.get(p.key)  # type: ignore[method-assign]
    real = t.decode.announce_pool

    async def forgetful(daemon, p, engine_id, deadline):  # announced, and forgotten at once
        answer = await real(daemon, p, engine_id, deadline)
        t.prefill.remote_pools.clear()
        return answer

    t.decode.announce_pool = forgetful  # type: ignore[method-assign]
    t.prefill.remote_pools.clear()
    t.recv(room=2)
    await cluster.settle()
    events = t.decode_events(2)
    assert events[0] is not None and events[0].state == "failed" and "never announced" in events[0].reason
    assert t.decode.errors["pool_announced_again"] == 1


async def test_a_room_that_bootstraps_while_its_sender_is_fenced_goes_on(cluster):
    """A fence revokes a peer's session (closing it takes ~1 s in the daemon); a room that starts
    meanwhile announces its pool anew once the revocation is done, and its requests name the
    new session. The fence must fail only the rooms whose requests went out before it began,
    not this one (it did: every link that could write was marked after the revocation).
    Found by the red team; the in-memory pair holds the revocation open with a gate."""
    t = Transfer(cluster, 1, 1)
    t.recv(timeout_s=3.0)
    await cluster.settle()
    t.prefill.transport.hold()  # room 1's write stalls
    cluster.hold = lambda d: isinstance(d.msg, wp.AbortAck)  # and its abort is never answered
    t.send(chunks=1)
    await cluster.settle(50)
    gate = t.decode.revoke_gate = asyncio.Event()
    cluster.clock.advance(3.5)
    cluster.expire()
    await cluster.settle(50)
    cluster.clock.advance(cluster.config.abort_fence_s + 0.1)
    cluster.expire()
    await _spin()
    assert t.decode.revoking, "the fence did not start"
    # Room 2 starts while the revocation is under way.
    t.prefill.transport.release()  # room 1's stalled write resumes into the closed session
    cluster.hold = lambda d: False
    t.recv(room=2)
    await _spin()
    gate.set()
    await cluster.settle()
    t.send(chunks=1, room=2)
    await cluster.settle()
    pool, _ = t.dst[0]
    first, second = t.decode.final_event(pool, 1), t.decode.final_event(pool, 2)
    assert first is not None and first.state == "failed" and first.released
    assert second is not None and second.state == "success", second


async def test_a_request_after_the_prefill_room_ended_unasked_fails_at_once(cluster):
    """The prefill engine aborts its room before the decode side's request arrives (SGLang: the
    prefill aborts while the decode is still bootstrapping). The late request used to open a new
    sender room that waited for chunks until the receiver's deadline (8 s in the SGLang backend's
    abort test); it is answered with the engine's reason at once. A room the engine starts again
    under the same id is a new room and is served."""
    t = Transfer(cluster, 1, 1)
    t.send(chunks=1)
    for pool, _ in t.src:
        t.prefill.senders.abort_from_engine(pool, 1, "aborted by the prefill engine")
    await cluster.settle()
    t.recv()
    await cluster.settle()
    ev = t.decode_events()[0]
    assert ev is not None and ev.state == "failed" and ev.released, ev
    assert "ended before this request came" in ev.reason and "aborted by the prefill engine" in ev.reason
    assert not t.prefill.senders.rooms, "the late request opened a room"
    # The engine reuses the id: a new room, served.
    t.send(room=1, chunks=1)
    t.recv(room=1)
    await cluster.settle()
    assert t.decode_events()[0] is not None
    assert [ev.state for _, ev in t.decode.events if ev.released and ev.room == 1][-1] == "success"
    assert t.verify() == []


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "kv_heads"), [(1, 1, 4), (4, 1, 2), (1, 2, 4), (2, 4, 2)])
@pytest.mark.parametrize("engine_started", [True, False])
async def test_a_room_the_decode_side_gives_up_before_asking_ends_the_prefill_room(
        cluster, prefill_tp, decode_tp, kv_heads, engine_started):
    """The decode engine aborts while its room is still bootstrapping (no TransferRequest went
    out). Every prefill rank's room (replicas' included) waited for a request until its waiting
    deadline (300 s by default) holding the engine's pages; now each hears the room was given
    up, and one the engine starts later fails within the bootstrap timeout (a new recv of the
    id by that decode daemon would have come by then: see the reissue test below)."""
    t = Transfer(cluster, prefill_tp, decode_tp, kv_heads=kv_heads)
    if engine_started:
        t.send(chunks=1)
        await cluster.settle()
    t.recv()  # its pool is announced asynchronously: the abort comes first
    for pool, _ in t.dst:
        t.decode.receivers.abort_from_engine(pool, 1)
    await cluster.settle()
    assert all(ev is not None and ev.state == "failed" and ev.released for ev in t.decode_events())
    if not engine_started:
        t.send(chunks=1)  # each rank's first chunk opens a room that waits for a new recv a while
        await cluster.settle()
        assert not [ev for _, ev in t.prefill.events if ev.released and ev.room == 1], "ended before its grace"
        cluster.clock.advance(cluster.config.bootstrap_timeout_s + 0.1)
        cluster.expire()
        await cluster.settle()
    finals = {pid: ev for pid, ev in t.prefill.events if ev.released and ev.room == 1}
    assert set(finals) == {pool.pool_id for pool, _ in t.src}, "a prefill rank's room is still waiting"
    assert all(ev.state == "failed" and "gave room 1 up before asking" in ev.reason for ev in finals.values())
    assert not t.prefill.senders.rooms and not t.decode.receivers.rooms
    assert t.decode.revoked == [], "a room nobody was asked to write was fenced"
    assert not t.prefill.errors and not t.decode.errors, (t.prefill.errors, t.decode.errors)


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "kv_heads"), [(1, 1, 4), (4, 1, 2), (2, 4, 2)])
@pytest.mark.parametrize("chunk_first", [True, False])
async def test_a_room_id_given_up_and_reissued_is_served(cluster, prefill_tp, decode_tp, kv_heads, chunk_first):
    """The decode engine gives a room up before its request went out, then recvs the same id
    again (a reuse); the prefill engine sends that id once. Whichever comes first at the prefill
    daemon, the engine's chunk or the decode daemon's new request, the room is served byte-exact:
    a request from the daemon that gave the id up is a new recv of it (that daemon sends nothing
    for a room it gave up, and its messages come in order)."""
    t = Transfer(cluster, prefill_tp, decode_tp, kv_heads=kv_heads)
    t.recv()
    for pool, _ in t.dst:
        t.decode.receivers.abort_from_engine(pool, 1)
    await cluster.settle()
    assert all(ev is not None and ev.state == "failed" and ev.released for ev in t.decode_events())
    t.decode.events.clear()
    if chunk_first:
        t.send(chunks=1)
        await cluster.settle()
        t.recv()
    else:
        t.recv()
        await cluster.settle()
        t.send(chunks=1)
    await cluster.settle()
    assert all(ev is not None and ev.state == "success" for ev in t.decode_events()), t.decode_events()
    assert t.verify() == []
    cluster.clock.advance(cluster.config.bootstrap_timeout_s + 0.1)  # no late failure of the reissue
    cluster.expire()
    await cluster.settle()
    finals = [ev for _, ev in t.prefill.events if ev.released and ev.room == 1]
    assert finals and all(ev.state == "success" for ev in finals), finals
    assert not t.prefill.senders.rooms and not t.decode.receivers.rooms
    assert not t.prefill.errors and not t.decode.errors, (t.prefill.errors, t.decode.errors)


async def test_a_recv_the_decode_daemon_refuses_ends_the_prefill_room(cluster):
    """A decode engine's recv is refused (here: a destination page named twice; the daemon's
    engine server calls ``refused`` for every refusal of a recv, as this test does). The prefill
    engine's room of that id waited for a request until its waiting deadline; it hears the
    refusal at once. A refusal of a recv whose room id is live on that pool gives nothing up."""
    t = Transfer(cluster, 2, 1)
    t.send(chunks=1)
    await cluster.settle()
    pool = t.dst[0][0]
    pages = np.array([t.dst_index[0], *t.dst_index[:-1]], dtype=np.int64)  # one page twice
    msg = we.RecvRoom(req_id=1, pool_id=pool.pool_id, room=1, bootstrap_addr=t.prefill.address,
                      prefill_engine_id="prefill-0", pages=pages)
    with pytest.raises(Exception, match="distinct|twice|repeat"):
        t.decode.receivers.start(pool, msg)
    t.decode.receivers.refused(pool, msg, "destination pages repeat")
    await cluster.settle()
    finals = {pid: ev for pid, ev in t.prefill.events if ev.released and ev.room == 1}
    assert set(finals) == {p.pool_id for p, _ in t.src}
    assert all(ev.state == "failed" and "recv was refused" in ev.reason for ev in finals.values())
    # A live room of the id: a second, refused recv of it gives nothing up.
    t.send(room=2, chunks=1)
    t.recv(room=2)
    live = we.RecvRoom(req_id=2, pool_id=pool.pool_id, room=2, bootstrap_addr=t.prefill.address,
                       prefill_engine_id="prefill-0", pages=t.dst_index)
    t.decode.receivers.refused(pool, live, "still in flight")
    await cluster.settle()
    assert [ev.state for _, ev in t.decode.events if ev.released and ev.room == 2] == ["success"]

"""Tests of kvd.client: the pure reply handling, both clients against a scripted fake daemon
on a real Unix socket, and HostPool. No real daemon, no Mooncake."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from kvd import protocol as p
from kvd.client import (
    AsyncKvdClient,
    KvdBadRequest,
    KvdBusyError,
    KvdClient,
    KvdConnectionError,
    KvdError,
    KvdLayoutError,
    KvdProtocolError,
    KvdRegistrationError,
    KvdTimeout,
    KvdUnknownError,
    ReplyTracker,
    RoomFailed,
    RoomStatus,
)
from kvd.hostpool import ALIGN, HostPool
from kvd.layout import PoolLayout
from tests.support import ThreadedEngineServer

LAYOUT = PoolLayout(engine_id="eng", role="prefill", tp_size=2, tp_rank=1, num_layers=2,
                    total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=3)

# room numbers script the fake daemon's behaviour
OK_ROOM, FAIL_ROOM, SILENT_ROOM, EARLY_ROOM, REFUSED_ROOM, GARBLED_ROOM = 11, 12, 13, 14, 15, 16


# --- pure ReplyTracker ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, cls", [
    ("protocol", KvdProtocolError), ("bad_request", KvdBadRequest), ("layout", KvdLayoutError),
    ("unknown_pool", KvdUnknownError), ("unknown_room", KvdUnknownError),
    ("registration", KvdRegistrationError), ("busy", KvdBusyError), ("something_new", KvdError),
])
def test_error_kinds_map_to_classes(kind: str, cls: type[KvdError]) -> None:
    with pytest.raises(cls) as info:
        ReplyTracker.result(p.ErrorReply(req_id=3, kind=kind, message="the reason", room=42), p.Ok)
    err = info.value
    assert type(err) is cls and err.kind == kind and err.room == 42
    assert "the reason" in str(err) and kind in str(err) and "room 42" in str(err)


def test_result_of_wrong_type_is_protocol_error() -> None:
    assert isinstance(ReplyTracker.result(p.Ok(req_id=1), p.Ok), p.Ok)
    with pytest.raises(KvdProtocolError, match="expected PoolRegistered"):
        ReplyTracker.result(p.Ok(req_id=1), p.PoolRegistered)


def test_req_ids_increase_from_one() -> None:
    t = ReplyTracker()
    assert [t.next_req_id() for _ in range(3)] == [1, 2, 3]
    msg, expected = t.poll(5)
    assert msg.req_id == 4 and expected is p.RoomEvent


def ev(room: int, state: str, released: bool = False, reason: str = "", aux: bytes = b"") -> p.RoomEvent:
    return p.RoomEvent(req_id=0, room=room, state=state, reason=reason, aux=aux, released=released)


def test_stash_latest_wins_and_released_sticks() -> None:
    t = ReplyTracker()
    assert t.is_push(ev(1, "failed")) and not t.is_push(p.RoomEvent(req_id=5, room=1, state="failed"))
    assert t.final(1) is None and t.released(1) is None
    t.on_push(ev(1, "failed", released=True, reason="aborted"))
    merged = t.on_push(ev(1, "failed", released=False, reason="later"))
    assert merged.released and merged.reason == "later"
    assert t.final(1) == merged and t.released(1) == merged
    with pytest.raises(RoomFailed, match="later") as info:
        ReplyTracker.check_final(merged)
    assert info.value.room == 1 and info.value.status is merged
    ok = t.on_push(ev(2, "success", released=True, aux=b"tok"))
    assert ReplyTracker.check_final(ok).aux == b"tok" and ok.done


def test_start_room_clears_previous_use_but_not_between_chunks() -> None:
    t = ReplyTracker()
    t.on_push(ev(7, "success", released=True))
    t.send(1, 7, [0], is_last=False, aux=b"")          # first chunk of a new use: old event goes
    assert t.final(7) is None
    t.on_push(ev(7, "failed", reason="peer gone"))
    t.send(1, 7, [1], is_last=True, aux=b"x")          # later chunk: the failure stays
    assert t.final(7) is not None and t.final(7).reason == "peer gone"
    t.recv(1, 7, "tcp://x", "p", [3], 0.0, False)      # a recv always starts afresh
    assert t.final(7) is None
    t.on_push(ev(8, "success"))
    t.forget(8)
    assert t.final(8) is None


def pev(room: int, pool: int, state: str, released: bool = False, reason: str = "", aux: bytes = b"",
        done: int = 0) -> p.RoomEvent:
    return p.RoomEvent(req_id=0, room=room, state=state, reason=reason, aux=aux, released=released, pool_id=pool,
                       bytes_done=done, bytes_total=done)


def test_pools_sharing_a_connection_and_a_room_id_merge() -> None:
    """The ranks of one engine on one connection, each beginning room 7: the room is final once
    every pool's is (failed if any failed), released once every pool's is."""
    t = ReplyTracker()
    for pool in (1, 2):
        t.recv(pool, 7, "tcp://x", "P", [3], 0.0, False)
    t.on_push(pev(7, 1, "success", aux=b"kv", done=10))
    assert t.final(7) is None and not t.pushed(7).done  # pool 2 is still in flight
    merged = t.on_push(pev(7, 2, "success", done=5))
    assert t.final(7) == merged and merged.aux == b"kv" and merged.bytes_done == 15 and not merged.released
    t.on_push(pev(7, 1, "success", released=True))
    assert t.released(7) is None
    t.on_push(pev(7, 2, "success", released=True))
    assert t.released(7) is not None
    # A failure of one rank fails the engine's room, once the other has ended too.
    for pool in (1, 2):
        t.recv(pool, 8, "tcp://x", "P", [3], 0.0, False)
    t.on_push(pev(8, 2, "failed", reason="peer gone"))
    t.on_push(pev(8, 1, "success"))
    st = t.final(8)
    assert st is not None and st.state == "failed" and st.reason == "peer gone"


def test_a_pool_beginning_the_id_again_starts_a_new_use_and_late_events_of_others_are_ignored() -> None:
    t = ReplyTracker()
    for pool in (1, 2):
        t.recv(pool, 7, "tcp://x", "P", [3], 0.0, False)
    for pool in (1, 2):
        t.on_push(pev(7, pool, "success"))
    t.recv(2, 7, "tcp://x", "P", [4], 0.0, False)  # pool 2 reuses the id: a new use, pool 2 alone
    assert t.final(7) is None
    t.on_push(pev(7, 1, "success", released=True))  # pool 1's release of the old use
    assert t.final(7) is None and t.released(7) is None
    t.on_push(pev(7, 2, "failed", reason="new use failed"))
    st = t.final(7)
    assert st is not None and st.reason == "new use failed"


def test_prefill_pools_sharing_a_connection_count_their_own_page_offsets() -> None:
    t = ReplyTracker()
    a1, _ = t.send(1, 7, [0, 1], is_last=False, aux=b"")
    a2, _ = t.send(1, 7, [2], is_last=False, aux=b"")
    b1, _ = t.send(2, 7, [0, 1, 2], is_last=False, aux=b"")  # rank 2's first chunk of the same room
    b2, _ = t.send(2, 7, [3], is_last=True, aux=b"")
    a3, _ = t.send(1, 7, [3], is_last=True, aux=b"")
    assert [m.page_offset for m in (a1, a2, b1, b2, a3)] == [0, 2, 0, 3, 3]
    t.expect_later(b2)
    t.on_late_reply(p.ErrorReply(req_id=b2.req_id, kind="bad_request", message="refused", room=7))
    t.on_push(pev(7, 1, "success"))
    st = t.final(7)
    assert st is not None and st.state == "failed" and "refused" in st.reason


def test_a_refused_chunk_sent_without_waiting_fails_its_room_for_good() -> None:
    t = ReplyTracker()
    first, _ = t.send(1, 7, [0], is_last=False, aux=b"")
    last, _ = t.send(1, 7, [1], is_last=True, aux=b"")
    for m in (first, last):
        t.expect_later(m)
    assert t.unacked == 2
    assert t.on_late_reply(p.Ok(req_id=first.req_id)) and t.final(7) is None
    assert not t.on_late_reply(p.Ok(req_id=999))  # not a chunk sent without waiting
    assert t.on_late_reply(p.ErrorReply(req_id=last.req_id, kind="bad_request", message="page 9 out of range",
                                        room=7))
    assert t.unacked == 0
    st = t.final(7)
    assert st is not None and st.state == "failed" and "page 9 out of range" in st.reason
    t.on_push(ev(7, "success", released=True))  # nothing the daemon says later un-fails it
    st = t.final(7)
    assert st is not None and st.state == "failed" and st.released and "bad_request" in st.reason
    t.send(1, 7, [0], is_last=True, aux=b"")  # a new use of the room id starts clean
    assert t.final(7) is None


def test_a_late_answer_to_an_ended_use_of_a_room_touches_neither_it_nor_the_next_use() -> None:
    """A room ended (a pushed failure) while a chunk sent without waiting was on its way; the
    chunk's refusal ("room already ended") comes after the engine saw the end and went on."""
    t = ReplyTracker()
    a, _ = t.send(1, 7, [0], is_last=False, aux=b"")
    t.expect_later(a)
    t.on_push(ev(7, "failed", released=True, reason="receiver gave up"))
    t.forget(7)  # the engine is done with the room
    assert t.on_late_reply(p.ErrorReply(req_id=a.req_id, kind="bad_request", message="room 7 already ended", room=7))
    assert t.pushed(7) is None and t.unacked == 0, "a forgotten room is stashed again, never pruned (not released)"
    b, _ = t.send(1, 8, [0], is_last=True, aux=b"")  # the receiver gave up while b was on its way
    t.expect_later(b)
    t.on_push(ev(8, "failed", released=True, reason="receiver gave up"))
    assert t.final(8) is not None  # wait() returns: the engine reuses room 8 at once
    c, _ = t.send(1, 8, [0], is_last=True, aux=b"")
    t.expect_later(c)
    assert t.on_late_reply(p.ErrorReply(req_id=b.req_id, kind="bad_request", message="room 8 already ended", room=8))
    assert t.final(8) is None, "the first use's refusal failed the second use of the room id"
    assert t.on_late_reply(p.Ok(req_id=c.req_id)) and t.unacked == 0


def test_forget_drops_the_page_count_of_a_room_that_never_sent_its_last_chunk() -> None:
    """A prefill room failed or aborted mid-send: the engine forgets it and never sends its last
    chunk. Its page count must go too, or a long-lived engine keeps one per such room."""
    t = ReplyTracker()
    for room in range(1000):
        t.send(1, room, [0, 1], is_last=False, aux=b"")
        t.forget(room)
    assert len(t._sent_pages) == 0


def test_stash_is_bounded_but_keeps_rooms_in_flight() -> None:
    t = ReplyTracker(max_released=4)
    t.on_push(ev(1000, "failed"))  # final but not released: must survive pruning
    for room in range(20):
        t.on_push(ev(room, "success", released=True))
    assert t.final(1000) is not None
    assert len(t._stash) <= 2 * 4 + 1
    assert t.final(19) is not None


def test_pages_are_validated() -> None:
    t = ReplyTracker()
    msg, _ = t.send(1, 2, np.array([3, 4], dtype=np.int32), True, b"")
    assert msg.pages.dtype == np.int64 and msg.pages.tolist() == [3, 4]
    assert t.send(1, 2, [], True, b"")[0].pages.tolist() == []
    with pytest.raises(KvdBadRequest):
        t.send(1, 2, [1.5], True, b"")
    with pytest.raises(KvdBadRequest):
        t.send(1, 2, [[1, 2]], True, b"")
    reg, expected = t.register(LAYOUT, {"kind": "shm", "name": "x", "offsets": [0]}, "tcp://h:1")
    assert expected is p.PoolRegistered and reg.layout == LAYOUT.to_dict() and reg.bootstrap == "tcp://h:1"


def test_undecodable_frame_names_its_request() -> None:
    with pytest.raises(KvdProtocolError) as info:
        ReplyTracker.decode_frame(msgpack.packb([1, 99, 17]))
    assert info.value.req_id == 17  # type: ignore[attr-defined]
    with pytest.raises(KvdProtocolError) as info:
        ReplyTracker.decode_frame(b"\xc1garbage")
    assert info.value.req_id == 0  # type: ignore[attr-defined]


# --- a scripted fake daemon ----------------------------------------------------------------------

class FakeKvd(ThreadedEngineServer):
    """A scripted daemon (tests.support.ThreadedEngineServer): behaviour by room number and
    bootstrap_addr."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.received: list[p.Message] = []

    def handle(self, msg: Any, writer: asyncio.StreamWriter) -> bool:
        self.received.append(msg)
        for out in self.answer(msg):
            if out is None:
                return False
            writer.write(p.frame(out if isinstance(out, bytes) else p.encode(out)))
        return True

    @staticmethod
    def answer(msg: Any) -> list[p.Message | bytes | None]:
        rid = msg.req_id
        if isinstance(msg, p.RegisterPool):
            if msg.layout.get("engine_id") == "bad":
                return [p.ErrorReply(req_id=rid, kind="registration", message="cannot register VMM memory")]
            return [p.PoolRegistered(req_id=rid, pool_id=7)]
        if isinstance(msg, p.SendChunk):
            if msg.room == REFUSED_ROOM:
                return [p.ErrorReply(req_id=rid, kind="bad_request", message="pages outside the pool",
                                     room=msg.room)]
            if msg.room == GARBLED_ROOM:  # an answer this client cannot decode (a newer daemon)
                return [msgpack.packb([1, 99, rid])]
            out: list[Any] = [p.Ok(req_id=rid)]
            if msg.is_last:
                out.append(ev(msg.room, "success", released=True))
            return out
        if isinstance(msg, p.RecvRoom):
            addr = msg.bootstrap_addr
            if addr.startswith("error:"):
                return [p.ErrorReply(req_id=rid, kind=addr[6:], message="scripted", room=msg.room)]
            if addr == "garbage":
                return [msgpack.packb([1, 99, rid]), ev(OK_ROOM, "success", released=True)]
            if addr == "close":
                return [None]
            aux = b"first-token:" + msg.pages.tobytes()[:8]
            done = p.RoomEvent(req_id=0, room=msg.room, state="success", aux=aux, bytes_done=64,
                               bytes_total=64, released=True)
            if msg.room == FAIL_ROOM:
                return [p.Ok(req_id=rid), ev(msg.room, "failed", reason="peer heartbeat lost", released=True)]
            if msg.room == SILENT_ROOM:
                return [p.Ok(req_id=rid)]
            if msg.room == EARLY_ROOM:  # the event overtakes the reply
                return [done, p.Ok(req_id=rid)]
            return [p.Ok(req_id=rid), done]
        if isinstance(msg, p.PollRoom):
            if msg.room == 999:
                return [p.ErrorReply(req_id=rid, kind="unknown_room", message="no such room", room=999)]
            return [p.RoomEvent(req_id=rid, room=msg.room, state="transferring", bytes_done=10,
                                bytes_total=64)]
        if isinstance(msg, p.AbortRoom):
            return [p.Ok(req_id=rid), ev(msg.room, "failed", reason="aborted by engine"),
                    ev(msg.room, "failed", reason="aborted by engine", released=True)]
        if isinstance(msg, p.StatusRequest):
            return [ev(OK_ROOM, "success", released=True),  # a push before the reply
                    p.StatusReply(req_id=rid, status={"daemon": {"write_ops_total": 3}})]
        return [p.ErrorReply(req_id=rid, kind="protocol", message="unexpected")]


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    # AF_UNIX paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    path = f"/tmp/kvd-test-{os.getpid()}-{id(tmp_path)}.sock"
    yield path
    if os.path.exists(path):
        os.unlink(path)


@pytest.fixture
def fake(sock_path: str) -> Iterator[FakeKvd]:
    with FakeKvd(sock_path) as server:
        yield server


@pytest.fixture(params=["sync", "async"])
async def client(request: pytest.FixtureRequest, fake: FakeKvd) -> AsyncIterator[Any]:
    if request.param == "sync":
        c: Any = KvdClient(fake.path, timeout=5)
        yield c
        c.close()
    else:
        async with AsyncKvdClient(fake.path, timeout=5) as ac:
            yield ac


async def call(client: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """Call a method of either flavour (async ones are awaited)."""
    result = getattr(client, name)(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


# --- round trips, both flavours ------------------------------------------------------------------

async def test_register_send_and_wait_success(client: Any, fake: FakeKvd) -> None:
    # An fd map already handed over (a ticket) goes to the daemon as it is.
    pool_id = await call(client, "register_pool", LAYOUT, {"kind": "fd", "ticket": "0" * 32, "offsets": [0]},
                         bootstrap="tcp://127.0.0.1:5000")
    assert pool_id == 7
    await call(client, "send", pool_id, 5, [0, 1], is_last=False)
    await call(client, "send", pool_id, 5, np.array([2]), is_last=True, aux=b"aux-5")
    st = await call(client, "wait", 5, timeout=2)
    assert st.state == "success" and st.released and st.done
    sent = [m for m in fake.received if isinstance(m, p.SendChunk)]
    assert [m.req_id for m in fake.received] == [1, 2, 3]
    assert sent[1].aux == b"aux-5" and sent[1].is_last and sent[0].pages.tolist() == [0, 1]


async def test_chunks_sent_without_waiting(client: Any, fake: FakeKvd) -> None:
    """wait=False: the chunks go out back to back, their replies are taken later, and the
    room's end still reaches wait()."""
    for i in range(5):
        await call(client, "send", 7, 5, [i], is_last=i == 4, aux=b"a" if i == 4 else b"", wait=False)
    st = await call(client, "wait", 5, timeout=2)
    assert st.state == "success"
    sent = [m for m in fake.received if isinstance(m, p.SendChunk)]
    assert [m.pages.tolist() for m in sent] == [[0], [1], [2], [3], [4]]
    assert [m.page_offset for m in sent] == [0, 1, 2, 3, 4]
    assert await call(client, "poll", 5)  # the connection is in step: the next reply is its own


async def test_a_refused_chunk_sent_without_waiting_fails_the_room(client: Any) -> None:
    await call(client, "send", 7, REFUSED_ROOM, [0], is_last=True, wait=False)
    with pytest.raises(RoomFailed, match="pages outside the pool"):
        await call(client, "wait", REFUSED_ROOM, timeout=2)


async def test_an_undecodable_answer_to_a_chunk_sent_without_waiting_fails_the_room(client: Any) -> None:
    """Its outcome is unknown: the room fails (as a refusal would), and the chunk no longer
    counts as unanswered (256 such and every later send would wait out the timeout)."""
    await call(client, "send", 7, GARBLED_ROOM, [0], is_last=True, wait=False)
    with pytest.raises(RoomFailed, match="undecodable"):
        await call(client, "wait", GARBLED_ROOM, timeout=1)
    assert client._t.unacked == 0
    assert (await call(client, "poll", 1)).state == "transferring"  # the connection goes on


def test_background_client_wait_keeps_the_callers_time_limit(fake: FakeKvd) -> None:
    """BackgroundKvdClient.wait(timeout=T) waits T, as the other clients do, not the request
    timeout + 5 s (an engine waiting a minute on a client built with the default 30 s)."""
    import time

    from kvd.engineclient.background import BackgroundKvdClient

    with BackgroundKvdClient(fake.path, timeout=0.05) as c:
        c.recv(7, SILENT_ROOM, "tcp://127.0.0.1:5000", "prefill-0", [1])
        t0 = time.monotonic()
        with pytest.raises(KvdTimeout):
            c.wait(SILENT_ROOM, timeout=5.5)
        assert time.monotonic() - t0 >= 5.4


def test_chunks_without_waiting_are_bounded(fake: FakeKvd) -> None:
    """Thousands of chunks without waiting: the client reads replies as it goes (at most
    MAX_UNACKED outstanding), so neither side's buffers fill up and nothing deadlocks."""
    from kvd.engineclient.client import MAX_UNACKED

    with KvdClient(fake.path, timeout=5) as c:
        for i in range(3000):
            c.send(7, 40, [i], is_last=i == 2999, wait=False)
            assert c._t.unacked <= MAX_UNACKED
        assert c.wait(40, timeout=5).state == "success"


async def test_recv_success_carries_aux(client: Any, fake: FakeKvd) -> None:
    await call(client, "recv", 7, OK_ROOM, "tcp://127.0.0.1:5000", "prefill-0", [3, 4],
               timeout_s=5.0, enable_hisparse=True)
    st = await call(client, "wait", OK_ROOM, timeout=2)
    assert st.aux.startswith(b"first-token:") and st.bytes_done == 64
    recv = fake.received[-1]
    assert isinstance(recv, p.RecvRoom) and recv.enable_hisparse and recv.timeout_s == 5.0
    assert recv.prefill_engine_id == "prefill-0" and recv.pages.tolist() == [3, 4]


async def test_event_pushed_before_reply_is_not_lost(client: Any) -> None:
    await call(client, "recv", 7, EARLY_ROOM, "tcp://x", "p", [1])
    assert (await call(client, "wait", EARLY_ROOM, timeout=2)).state == "success"


async def test_wait_raises_room_failed(client: Any) -> None:
    await call(client, "recv", 7, FAIL_ROOM, "tcp://x", "p", [1])
    with pytest.raises(RoomFailed, match="peer heartbeat lost") as info:
        await call(client, "wait", FAIL_ROOM, timeout=2)
    assert info.value.room == FAIL_ROOM and info.value.status.released


async def test_wait_times_out(client: Any) -> None:
    await call(client, "recv", 7, SILENT_ROOM, "tcp://x", "p", [1])
    with pytest.raises(KvdTimeout) as info:
        await call(client, "wait", SILENT_ROOM, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    # the connection is still usable afterwards
    assert (await call(client, "poll", SILENT_ROOM)).state == "transferring"


async def test_poll_and_unknown_room(client: Any) -> None:
    st = await call(client, "poll", 3)
    assert st == RoomStatus(room=3, state="transferring", bytes_done=10, bytes_total=64) and not st.done
    with pytest.raises(KvdUnknownError, match="no such room"):
        await call(client, "poll", 999)


async def test_abort_then_wait_released(client: Any) -> None:
    await call(client, "abort", 7, 21)
    st = await call(client, "wait_released", 21, timeout=2)
    assert st.released and st.state == "failed" and "aborted" in st.reason


async def test_status_with_push_before_reply(client: Any) -> None:
    assert (await call(client, "status"))["daemon"]["write_ops_total"] == 3
    assert (await call(client, "wait", OK_ROOM, timeout=0.5)).state == "success"  # came from the stash


@pytest.mark.parametrize("kind, cls", [("layout", KvdLayoutError), ("busy", KvdBusyError),
                                       ("unknown_pool", KvdUnknownError), ("bad_request", KvdBadRequest)])
async def test_error_replies_raise_their_class(client: Any, kind: str, cls: type[KvdError]) -> None:
    with pytest.raises(cls, match="scripted") as info:
        await call(client, "recv", 7, 30, f"error:{kind}", "p", [1])
    assert info.value.room == 30


async def test_registration_error(client: Any) -> None:
    bad = PoolLayout(**{**LAYOUT.to_dict(), "engine_id": "bad"})
    with pytest.raises(KvdRegistrationError, match="VMM"):
        await call(client, "register_pool", bad, {"kind": "fd", "ticket": "0" * 32, "offsets": [0]})


async def test_undecodable_reply_fails_only_its_request(client: Any) -> None:
    with pytest.raises(KvdProtocolError):
        await call(client, "recv", 7, 40, "garbage", "p", [1])
    assert (await call(client, "poll", 1)).state == "transferring"


async def test_closed_connection(client: Any) -> None:
    with pytest.raises(KvdConnectionError):
        await call(client, "recv", 7, 41, "close", "p", [1])
    with pytest.raises(KvdConnectionError):
        await call(client, "status")


async def test_unreachable_socket(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.sock")
    with pytest.raises(KvdConnectionError, match="is the daemon running"):
        KvdClient(missing)
    with pytest.raises(KvdConnectionError):
        await AsyncKvdClient(missing).connect()


async def test_async_waiters_run_concurrently(fake: FakeKvd) -> None:
    async with AsyncKvdClient(fake.path, timeout=5) as c:
        waiters = [asyncio.create_task(c.wait(room, timeout=2)) for room in (50, 51, 52)]
        await asyncio.sleep(0)
        await asyncio.gather(*(c.recv(7, room, "tcp://x", "p", [room]) for room in (50, 51, 52)))
        assert [st.room for st in await asyncio.gather(*waiters)] == [50, 51, 52]


def test_sync_client_as_context_manager(fake: FakeKvd) -> None:
    with KvdClient(fake.path, timeout=5) as c:
        assert c.status()["daemon"]["write_ops_total"] == 3
    with pytest.raises(KvdConnectionError, match="closed"):
        c.status()


# --- HostPool ------------------------------------------------------------------------------------

def test_host_pool_create_view_unlink() -> None:
    with HostPool.create(LAYOUT) as pool:
        mem = pool.memory
        assert mem["kind"] == "shm" and mem["name"] == pool.name and pool.name.startswith("kvd-eng-1-")
        assert len(mem["offsets"]) == LAYOUT.num_buffers == 4
        assert all(off % ALIGN == 0 for off in mem["offsets"])
        assert mem["size"] >= mem["offsets"][-1] + LAYOUT.buffer_bytes
        buf = pool.buffer(2)
        assert buf.shape == (LAYOUT.num_tokens, LAYOUT.local_heads, LAYOUT.head_bytes) and buf.dtype == np.uint8
        assert not buf.any()
        buf[5, 1, 3] = 0xAB
        shm_file = Path("/dev/shm") / pool.name
        if shm_file.exists():  # Linux: check the bytes really live in the segment
            raw = shm_file.read_bytes()
            off = mem["offsets"][2] + (5 * LAYOUT.local_heads + 1) * LAYOUT.head_bytes + 3
            assert raw[off] == 0xAB
        with pytest.raises(IndexError):
            pool.buffer(4)
        del buf
    assert not (Path("/dev/shm") / pool.name).exists()
    with pytest.raises(ValueError, match="closed"):
        pool.buffer(0)


def test_host_pool_name_is_sanitised() -> None:
    layout = PoolLayout(**{**LAYOUT.to_dict(), "engine_id": "a/b c"})
    with HostPool.create(layout) as pool:
        assert "/" not in pool.name and " " not in pool.name
        pool.fill(7)
        assert int(pool.buffer(0)[0, 0, 0]) == 7


def test_a_hand_over_kvd_never_answers_is_a_registration_error(tmp_path: Path) -> None:
    """Red team round 5: a daemon whose hand-over socket takes the connection and never answers
    (busy behind other users' hand-overs, say) made register_pool raise a bare TimeoutError,
    not the KvdRegistrationError an engine catches for a pool kvd did not take."""
    import socket

    from kvd.engineclient.fdpass import FdPassError, hand_over
    from kvd.wire import fdmsg

    sock_path = str(tmp_path / "kvd.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mute.bind(fdmsg.fd_socket_path(sock_path))
    mute.listen(4)  # never accepted: the connection waits in the backlog
    fd = os.memfd_create("kvd-test", os.MFD_ALLOW_SEALING)
    try:
        with pytest.raises(FdPassError, match="did not take the descriptor"):
            hand_over(sock_path, fd, timeout=0.3)
    finally:
        os.close(fd)
        mute.close()


@pytest.mark.parametrize("room", [1 << 64, -(1 << 63) - 1, 1.5, True, "7", None])
def test_a_room_id_the_wire_cannot_carry_is_refused_before_it_is_sent(room) -> None:
    """msgpack carries integers in [-2**63, 2**64): a larger one raised a bare OverflowError from
    the encoder (no KvdError), after the tracker had already begun the room."""
    t = ReplyTracker()
    for build in (lambda: t.send(1, room, [0], True, b""), lambda: t.recv(1, room, "tcp://x", "P", [0], 0.0, False),
                  lambda: t.poll(room), lambda: t.abort(1, room)):
        with pytest.raises(KvdBadRequest, match="room must be an integer"):
            build()
    assert t.pushed(7) is None and t.pools(7) == [-1]
    msg, _ = t.send(np.int64(1), np.int64(7), [0], True, b"")  # numpy integers are the ints they hold
    assert p.decode(msg.encode()).room == 7

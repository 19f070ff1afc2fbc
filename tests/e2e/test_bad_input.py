"""Bad input from engines and peers against running daemons: clear errors, counters, and
the daemon keeps serving every other room without writing outside registered memory."""

from __future__ import annotations

import socket
import time

import msgpack
import numpy as np
import pytest
import zmq

from kvd import protocol as p
from kvd.client import KvdBadRequest, KvdError, KvdLayoutError, KvdUnknownError, RoomFailed
from kvd.hostpool import HostPool
from kvd.layout import PoolLayout
from tools.cluster import free_port, peer_router, peer_socket

pytestmark = pytest.mark.e2e


def layouts(prefill_tp: int = 1, decode_tp: int = 1, **kw):
    base = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)
    base.update(kw)
    pre = [PoolLayout("P", "prefill", prefill_tp, r, **base) for r in range(prefill_tp)]
    dec = [PoolLayout("D", "decode", decode_tp, r, **base) for r in range(decode_tp)]
    return pre, dec


def raw_request(sock_path: str, payload: bytes) -> p.Message:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock_path)
        s.sendall(p.frame(payload))
        fb = p.FrameBuffer()
        while (x := fb.next_payload()) is None:
            fb.feed(s.recv(65536))
        return p.decode(x)


def errors(d) -> dict:
    return d.status()["daemon"]["errors"]


@pytest.fixture
def pools():
    made: list[HostPool] = []

    def make(layout: PoolLayout, fill: int | None = None) -> HostPool:
        pool = HostPool.create(layout)
        if fill is None:
            rng = np.random.default_rng(layout.tp_rank + 1)
            for i in range(layout.num_buffers):
                buf = pool.buffer(i)
                buf[...] = rng.integers(0, 256, buf.shape, dtype=np.uint8)
        else:
            pool.fill(fill)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()
        pool.unlink()


def good_room(pre_d, dec_d, pools, room: int) -> None:
    """A normal 1->1 room that must still work after whatever bad input came before."""
    (pl,), (dl,) = layouts()
    with pre_d.client() as pc, dec_d.client() as dc:
        ph, dh = pools(pl), pools(dl, fill=0xAB)
        pid = pc.register_pool(pl, ph.memory, bootstrap=pre_d.address)
        did = dc.register_pool(dl, dh.memory)
        dc.recv(did, room, pre_d.address, "P", [5, 6])
        pc.send(pid, room, [1, 2], True, aux=b"ok")
        assert dc.wait(room, timeout=20).aux == b"ok"
        for b in range(pl.num_buffers):
            assert np.array_equal(ph.buffer(b)[4:12], dh.buffer(b)[20:28])


def test_engine_garbage_and_wrong_types_get_clear_errors(pair, pools):
    pre_d, dec_d = pair
    reply = raw_request(dec_d.socket_path, b"\xc1 not msgpack")
    assert isinstance(reply, p.ErrorReply) and reply.kind == "protocol"
    bad = msgpack.packb([1, p.SendChunk.TYPE, 5, "pool", 1, b"", True])
    reply = raw_request(dec_d.socket_path, bad)
    assert reply.kind == "protocol" and "pool_id" in reply.message
    reply = raw_request(dec_d.socket_path, msgpack.packb([1, 250, 1]))
    assert reply.kind == "protocol" and "unknown message type" in reply.message
    reply = raw_request(dec_d.socket_path, p.Heartbeat(src="x", token="", nonce=1).encode())
    assert reply.kind == "protocol"
    assert errors(dec_d)["protocol"] >= 4
    good_room(pre_d, dec_d, pools, room=1)


def test_bad_layouts_and_memory_are_refused_at_registration(pair, pools):
    _, dec_d = pair
    (dl,), _ = layouts()
    with dec_d.client() as c:
        with pytest.raises(KvdLayoutError, match="head_dim"):
            c._request(p.RegisterPool(req_id=c._t.next_req_id(), layout={**dl.to_dict(), "head_dim": -1},
                                      memory={"kind": "shm"}), p.PoolRegistered)
        # The engine opens its segment itself (kvd is handed the descriptor): a missing one
        # fails in the client; a segment named to the daemon is refused there.
        with pytest.raises(KvdError, match="cannot open shared-memory"):
            c.register_pool(dl, {"kind": "shm", "name": "kvd-does-not-exist", "offsets":
                                 [i * dl.buffer_bytes for i in range(dl.num_buffers)]})
        with pytest.raises(KvdError, match="refused"):
            c._request(p.RegisterPool(req_id=c._t.next_req_id(), layout=dl.to_dict(),
                                      memory={"kind": "shm", "name": "kvd-x", "offsets": [0]}), p.PoolRegistered)
        small = pools(PoolLayout("D", "decode", 1, 0, 2, 4, 8, "bfloat16", 4, 2))
        with pytest.raises(KvdError, match="needs"):
            c.register_pool(PoolLayout("D", "decode", 1, 0, 2, 4, 8, "bfloat16", 4, 1024), small.memory)
    assert errors(dec_d)["registration"] >= 2


def test_indices_outside_the_pool_unknown_pool_and_room(pair, pools):
    pre_d, dec_d = pair
    (pl,), (dl,) = layouts()
    with pre_d.client() as pc, dec_d.client() as dc:
        pid = pc.register_pool(pl, pools(pl).memory, bootstrap=pre_d.address)
        did = dc.register_pool(dl, pools(dl, fill=0).memory)
        with pytest.raises(KvdBadRequest, match="outside"):
            pc.send(pid, 3, [0, dl.num_pages], True)
        with pytest.raises(KvdBadRequest, match="outside"):
            dc.recv(did, 3, pre_d.address, "P", [-1, 2])
        with pytest.raises(KvdUnknownError):
            pc.send(pid + 100, 3, [0], True)
        with pytest.raises(KvdUnknownError):
            dc.poll(12345)
        with pytest.raises(KvdBadRequest):
            dc.send(did, 3, [0], True)  # a decode pool cannot send
    assert errors(pre_d)["bad_request"] >= 1 and errors(pre_d)["unknown_pool"] >= 1
    good_room(pre_d, dec_d, pools, room=2)


def test_a_refused_chunk_sent_without_waiting_fails_the_room_for_both_engines(pair, pools):
    """send(wait=False) of a chunk with pages outside the pool: the engine hears the refusal as a
    failed room (with the daemon's reason), aborts it as for any failure, the decode room is
    released with its canary intact, and the next room goes through."""
    pre_d, dec_d = pair
    (pl,), (dl,) = layouts()
    with pre_d.client() as pc, dec_d.client() as dc:
        pid = pc.register_pool(pl, pools(pl).memory, bootstrap=pre_d.address)
        dh = pools(dl, fill=0xAB)
        did = dc.register_pool(dl, dh.memory)
        dc.recv(did, 6, pre_d.address, "P", [1, 2])
        pc.send(pid, 6, [1], False, wait=False)
        pc.send(pid, 6, [2, pl.num_pages + 5], True, aux=b"x", wait=False)  # refused by the daemon
        with pytest.raises(RoomFailed, match="outside"):
            pc.wait(6, timeout=20)
        pc.abort(pid, 6)
        with pytest.raises(RoomFailed):
            dc.wait(6, timeout=20)
        dc.wait_released(6, timeout=20)
        for b in range(dl.num_buffers):  # page 1 may hold the accepted chunk; no other page changed
            buf = dh.buffer(b).reshape(-1).view(np.uint8)
            assert (buf[:dl.page_bytes] == 0xAB).all() and (buf[2 * dl.page_bytes:] == 0xAB).all()
    assert errors(pre_d)["bad_request"] >= 1
    good_room(pre_d, dec_d, pools, room=7)


def test_sender_pages_beyond_receiver_request_fail_the_room(pair, pools):
    pre_d, dec_d = pair
    (pl,), (dl,) = layouts()
    with pre_d.client() as pc, dec_d.client() as dc:
        pid = pc.register_pool(pl, pools(pl).memory, bootstrap=pre_d.address)
        dh = pools(dl, fill=0xAB)
        did = dc.register_pool(dl, dh.memory)
        dc.recv(did, 4, pre_d.address, "P", [1])
        pc.send(pid, 4, [1, 2, 3], True)  # three pages into a one-page request
        with pytest.raises(RoomFailed, match="pages"):
            dc.wait(4, timeout=20)
        dc.wait_released(4, timeout=20)
        assert all((dh.buffer(b) == 0xAB).all() for b in range(dl.num_buffers))
    good_room(pre_d, dec_d, pools, room=5)


def test_incompatible_layout_fails_the_room_naming_both(pair, pools):
    pre_d, dec_d = pair
    (pl,), _ = layouts()
    dl = PoolLayout("D", "decode", 1, 0, 2, 4, 16, "bfloat16", 4, 16)  # head_dim differs
    with pre_d.client() as pc, dec_d.client() as dc:
        pc.register_pool(pl, pools(pl).memory, bootstrap=pre_d.address)
        did = dc.register_pool(dl, pools(dl, fill=0).memory)
        dc.recv(did, 6, pre_d.address, "P", [1])
        with pytest.raises(RoomFailed) as err:
            dc.wait(6, timeout=20)
        assert "head_dim" in str(err.value) and "prefill P" in str(err.value) and "decode D" in str(err.value)


def test_peer_garbage_and_forged_requests_are_counted_and_ignored(pair, pools, tmp_path):
    pre_d, dec_d = pair
    # An authenticated peer (its key is trusted, bound to its address) sending garbage.
    s = peer_socket(tmp_path, "prefill", address="tcp://127.0.0.1:1")
    s.connect(pre_d.address)
    s.send(b"garbage")
    s.send(msgpack.packb([1, p.TransferRequest.TYPE, "x"]))
    # A forged request for an unknown pool: refused, nothing written.
    s.send(p.TransferRequest(src="tcp://127.0.0.1:1", token="", room=1, transfer_id=1,
                             pool_key="tcp://127.0.0.1:1#x#1",
                             prefill_engine_id="P", sender_rank=0, dst_indices=np.arange(3),
                             dummy=False, deadline_s=1.0).encode())
    time.sleep(0.5)
    s.close()
    errs = errors(pre_d)
    assert errs["protocol"] >= 2 and errs["bad_request"] >= 1
    good_room(pre_d, dec_d, pools, room=7)


def test_engine_disconnect_mid_room_fails_it_and_daemon_serves_on(pair, pools):
    pre_d, dec_d = pair
    (pl,), (dl,) = layouts()
    pc = pre_d.client()
    with dec_d.client() as dc:
        pid = pc.register_pool(pl, pools(pl).memory, bootstrap=pre_d.address)
        did = dc.register_pool(dl, pools(dl, fill=0).memory)
        dc.recv(did, 8, pre_d.address, "P", [1, 2])
        pc.send(pid, 8, [1], False)
        deadline = time.monotonic() + 10
        while dc.poll(8).state != "transferring" and time.monotonic() < deadline:
            time.sleep(0.05)
        pc.close()  # the prefill engine dies mid-room
        with pytest.raises(RoomFailed, match="disconnected"):
            dc.wait(8, timeout=20)
    good_room(pre_d, dec_d, pools, room=9)


def test_dead_prefill_daemon_fails_decode_room_within_timeout(pair, pools):
    pre_d, dec_d = pair
    (pl,), (dl,) = layouts()
    with pre_d.client() as pc, dec_d.client() as dc:
        pc.register_pool(pl, pools(pl).memory, bootstrap=pre_d.address)
        did = dc.register_pool(dl, pools(dl, fill=0).memory)
        dc.recv(did, 10, pre_d.address, "P", [1, 2], timeout_s=6)
        time.sleep(0.5)
        pre_d.kill()
        t0 = time.monotonic()
        with pytest.raises(RoomFailed):
            dc.wait(10, timeout=15)
        assert time.monotonic() - t0 < 6.5
        dc.wait_released(10, timeout=15)


def test_recv_from_unreachable_prefill_times_out(pair, pools):
    _, dec_d = pair
    _, (dl,) = layouts()
    with dec_d.client() as dc:
        did = dc.register_pool(dl, pools(dl, fill=0).memory)
        dc.recv(did, 11, "tcp://127.0.0.1:9", "P", [1], timeout_s=2)
        with pytest.raises(RoomFailed):
            dc.wait(11, timeout=15)


def _hisparse_layouts():
    pl = PoolLayout("P", "prefill", 1, 0, 2, 4, 8, "bfloat16", 16, 8)
    hl = PoolLayout("D", "decode", 1, 0, 2, 4, 8, "bfloat16", 1, 128, hisparse=True)
    return pl, hl


def test_hisparse_bad_claims_fail_cleanly(pair, pools):
    """Page-size claims that do not match, lengths beyond the pages sent, tokens outside
    the host pool: clear error, room failed, nothing written outside, daemon serves on."""
    pre_d, dec_d = pair
    pl, hl = _hisparse_layouts()
    with pre_d.client() as pc, dec_d.client() as dc:
        ph = pools(pl)
        pid = pc.register_pool(pl, ph, bootstrap=pre_d.address)
        hh = pools(hl, fill=0xAB)
        hid = dc.register_pool(hl, hh)
        # Tokens outside the host pool: refused at once.
        with pytest.raises(KvdBadRequest, match="outside"):
            dc.recv(hid, 20, pre_d.address, "P", [0, 1, 128], enable_hisparse=True)
        # A HiSparse pool receiving without the flag (a page-size claim that does not match).
        dc.recv(hid, 21, pre_d.address, "P", [0, 1])
        with pytest.raises(RoomFailed, match="(?i)hisparse"):
            dc.wait(21, timeout=20)
        # Length beyond the pages sent: 40 tokens asked, one page of 16 sent.
        dc.recv(hid, 22, pre_d.address, "P", list(range(40)), enable_hisparse=True)
        pc.send(pid, 22, [3], True)
        with pytest.raises(RoomFailed, match="unwritten"):
            dc.wait(22, timeout=20)
        dc.wait_released(22, timeout=20)
        # More pages sent than the length needs (last page would be empty).
        dc.recv(hid, 23, pre_d.address, "P", list(range(10)), enable_hisparse=True)
        pc.send(pid, 23, [1, 2], True)
        with pytest.raises(RoomFailed):
            dc.wait(23, timeout=20)
        dc.wait_released(23, timeout=20)
        assert all((hh.buffer(b) == 0xAB).all() for b in range(hl.num_buffers))
        # The daemon still serves a good HiSparse room: 20 tokens from two pages.
        dc.recv(hid, 24, pre_d.address, "P", list(range(100, 120)), enable_hisparse=True)
        pc.send(pid, 24, [5, 6], True, aux=b"h")
        assert dc.wait(24, timeout=20).aux == b"h"
        for b in range(hl.num_buffers):
            assert np.array_equal(hh.buffer(b)[100:120], ph.buffer(b)[5 * 16:5 * 16 + 20])


def test_peer_asking_for_heads_the_sender_does_not_have(pair, pools, tmp_path):
    """A (forged) decode peer announces a TP-2 pool and asks prefill rank 0 of a TP-2 engine
    to write receiver rank 1's heads, which rank 0 does not hold: refused with a reason,
    counted, and the daemon keeps serving."""
    pre_d, dec_d = pair
    pl = PoolLayout("P", "prefill", 2, 0, 2, 4, 8, "bfloat16", 4, 16)
    with pre_d.client() as pc:
        pc.register_pool(pl, pools(pl), bootstrap=pre_d.address)
        me = f"tcp://127.0.0.1:{free_port()}"  # an authenticated peer (trusted key bound to me)
        out = peer_socket(tmp_path, "prefill", "forged", me)
        inbox = peer_router(tmp_path, "forged", me)
        out.connect(pre_d.address)
        forged = PoolLayout("D", "decode", 2, 1, 2, 4, 8, "bfloat16", 4, 16)
        out.send(p.PoolAnnounce(src=me, token="", pool_key=f"{me}#x#1", layout=forged.to_dict(),
                                buffers=[4096 * (i + 1) for i in range(forged.num_buffers)],
                                session_id="127.0.0.1:1", prefill_engine_id="P").encode())
        out.send(p.TransferRequest(src=me, token="", room=5, transfer_id=77, pool_key=f"{me}#x#1",
                                   prefill_engine_id="P", sender_rank=0, dst_indices=np.arange(2),
                                   dummy=False, deadline_s=5.0).encode())
        replies = []
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(isinstance(r, p.TransferStatus) for r in replies):
            if poller.poll(200):
                replies.append(p.decode(inbox.recv_multipart()[-1]))
        out.close()
        inbox.close(linger=0)
    status = next(r for r in replies if isinstance(r, p.TransferStatus))
    assert not status.ok and "none of its heads" in status.reason
    assert errors(pre_d)["bad_request"] >= 1
    good_room(pre_d, dec_d, pools, room=30)

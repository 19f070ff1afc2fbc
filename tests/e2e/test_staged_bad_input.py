"""Bad input on the staged path, against running daemons with staging on: a grant outside the
receiver's staging pool, chunk reports that break the protocol, a sender that dies holding
reserved space. Each one: a clear error, a counter, the room failed, every byte of staging
space back (the allocator whole again), and the daemon serving on."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import zmq

from kvd import protocol as p
from kvd.client import KvdError, RoomFailed
from kvd.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.staging import ChunkGeometry, block_bytes_per_token
from tests.support import check_reports, run_cluster

pytestmark = pytest.mark.e2e

FLAGS = ("--staging-enabled", "--staging-pool-bytes", "1MiB", "--staging-chunk-tokens", "8",
         "--timeouts-waiting-s", "8", "--timeouts-bootstrap-s", "5", "--timeouts-transfer-s", "8",
         "--timeouts-abort-fence-s", "1", "--peer-insecure")
PRE = [PoolLayout("P", "prefill", 2, r, 2, 4, 8, "bfloat16", 4, 16) for r in range(2)]
DEC = PoolLayout("D", "decode", 1, 0, 2, 4, 8, "bfloat16", 4, 16)


def staging(d) -> dict:
    return d.status()["daemon"]["staging"]


def wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


class ForgedPeer:
    """A hand-driven daemon on a ZMQ ROUTER: answers what it is asked, the way ``on`` says."""

    def __init__(self, on) -> None:
        self.ctx = zmq.Context.instance()
        self.inbox = self.ctx.socket(zmq.ROUTER)
        self.address = f"tcp://127.0.0.1:{self.inbox.bind_to_random_port('tcp://127.0.0.1')}"
        self.on = on
        self.seen: list[p.Message] = []
        self._out: dict[str, zmq.Socket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def send(self, addr: str, msg: p.Message) -> None:
        if addr not in self._out:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(addr)
            self._out[addr] = s
        self._out[addr].send(msg.encode())

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            msg = p.decode(self.inbox.recv_multipart()[-1])
            self.seen.append(msg)
            if isinstance(msg, p.Heartbeat):
                self.send(msg.src, p.HeartbeatAck(src=self.address, token="", nonce=msg.nonce))
            else:
                self.on(self, msg)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self._out.values():
            s.close()
        self.inbox.close(linger=0)


def forged_prefill(mode: str):
    """A prefill 'daemon' for a TP-2 engine that breaks the chunk protocol as ``mode`` says."""
    requests: dict[int, p.TransferRequest] = {}

    def on(peer: ForgedPeer, msg: p.Message) -> None:
        me = peer.address
        if isinstance(msg, p.EngineQuery):
            peer.send(msg.src, p.EngineInfo(src=me, token="", engine_id=msg.engine_id, ready=True, tp_size=2,
                                            layouts=[x.to_dict() for x in PRE], daemons=[me, me]))
        elif isinstance(msg, p.PoolAnnounce):
            peer.send(msg.src, p.PoolAck(src=me, token="", pool_key=msg.pool_key, ok=True, staging=True))
        elif isinstance(msg, p.TransferRequest):
            requests[msg.sender_rank] = msg
        elif isinstance(msg, p.StagingGrant) and msg.sender_rank == 0 and msg.chunk == 0:
            req = requests[0]
            geometry = ChunkGeometry(len(req.dst_indices) * DEC.page_size, req.chunk_tokens, req.writers,
                                     block_bytes_per_token(DEC, 2))
            good = geometry.block_bytes(0)
            reports = {"twice": [(0, good), (0, good)],
                       "ungranted": [(geometry.num_chunks - 1, geometry.block_bytes(geometry.num_chunks - 1))],
                       "size": [(0, good + 2)],
                       "past_end": [(geometry.num_chunks + 3, good)]}[mode]
            for chunk, nbytes in reports:
                peer.send(msg.src, p.ChunkWritten(src=me, token="", room=msg.room, transfer_id=msg.transfer_id,
                                                  pool_key=msg.pool_key, sender_rank=0, chunk=chunk, nbytes=nbytes))
        elif isinstance(msg, p.AbortTransfer):
            peer.send(msg.src, p.AbortAck(src=me, token="", room=msg.room, transfer_id=msg.transfer_id,
                                          pool_key=msg.pool_key, sender_rank=msg.sender_rank))

    return on


@pytest.mark.parametrize("mode, error", [
    ("twice", "reported chunk 0 twice"),
    ("ungranted", "never granted"),
    ("size", "its block is"),
    ("past_end", "outside the room's"),
])
def test_bad_chunk_reports_fail_the_room_and_free_its_space(daemons, mode, error):
    decode = daemons("decode", *FLAGS)
    peer = ForgedPeer(forged_prefill(mode))
    try:
        with HostPool.create(DEC) as hd, decode.client() as dc:
            hd.fill(0xEE)
            did = dc.register_pool(DEC, hd)
            dc.recv(did, 4, peer.address, "P", np.arange(6))  # 24 tokens: 3 chunks of 8
            with pytest.raises(RoomFailed, match=error):
                dc.wait(4, timeout=15)
            dc.wait_released(4, timeout=15)
            # The room failed before any scatter: the pool is exactly as the engine left it.
            assert all(np.all(hd.buffer(b) == 0xEE) for b in range(DEC.num_buffers))
        assert decode.status()["daemon"]["errors"].get("bad_peer_message", 0) >= 1
        assert wait_for(lambda: staging(decode)["whole"]), staging(decode)
        assert staging(decode)["reserved_bytes"] == 0
    finally:
        peer.close()


@pytest.mark.parametrize("offset", [1 << 40, -256, 3000])
def test_grant_outside_the_receivers_staging_pool_is_refused(daemons, offset):
    """A (forged) decode peer announces a 4 KiB staging pool and grants chunk 0 at an offset
    whose region does not fit in it: the sender refuses, writes nothing, says why."""
    prefill = daemons("prefill", *FLAGS)
    replies: list[p.Message] = []
    peer = ForgedPeer(lambda _peer, msg: replies.append(msg))
    try:
        with HostPool.create(PRE[0]) as h0, prefill.client() as pc:
            pc.register_pool(PRE[0], h0, bootstrap=prefill.address)
            me = peer.address
            forged = DEC
            peer.send(prefill.address, p.PoolAnnounce(
                src=me, token="", pool_key=f"{me}#forged#1", layout=forged.to_dict(),
                buffers=[4096 * (i + 1) for i in range(forged.num_buffers)], session_id="127.0.0.1:1",
                prefill_engine_id="P", staging_base=1 << 20, staging_bytes=4096))
            assert wait_for(lambda: any(isinstance(r, p.PoolAck) for r in replies))
            ack = next(r for r in replies if isinstance(r, p.PoolAck))
            assert ack.ok and ack.staging
            peer.send(prefill.address, p.TransferRequest(
                src=me, token="", room=5, transfer_id=77, pool_key=f"{me}#forged#1", prefill_engine_id="P",
                sender_rank=0, dst_indices=np.arange(4), dummy=False, deadline_s=5.0, chunk_tokens=8,
                writer=0, writers=2))
            peer.send(prefill.address, p.StagingGrant(src=me, token="", room=5, transfer_id=77, pool_key=f"{me}#forged#1",
                                                      sender_rank=0, chunk=0, offset=offset))
            assert wait_for(lambda: any(isinstance(r, p.TransferStatus) for r in replies))
        status = next(r for r in replies if isinstance(r, p.TransferStatus))
        assert not status.ok and "outside the receiver's 4096-byte staging pool" in status.reason
        assert prefill.status()["daemon"]["errors"]["bad_peer_message"] >= 1
        assert wait_for(lambda: staging(prefill)["whole"])
    finally:
        peer.close()


def test_sender_that_dies_with_space_reserved_gives_it_back(daemons):
    """The decode side reserves a room's first chunks before prefill sends anything; the
    prefill daemon then dies. The room fails, and once the fence has passed every reserved
    byte is free again; a new staged transfer goes through the same decode daemon."""
    prefill, decode = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    with HostPool.create(PRE[0]) as h0, HostPool.create(PRE[1]) as h1, HostPool.create(DEC) as hd, \
            prefill.client(timeout=5) as pc, decode.client() as dc:
        for lay, h in zip(PRE, (h0, h1), strict=True):
            pc.register_pool(lay, h, bootstrap=prefill.address)
        did = dc.register_pool(DEC, hd)
        dc.recv(did, 6, prefill.address, "P", np.arange(8), timeout_s=30)
        assert wait_for(lambda: staging(decode)["reserved_bytes"] > 0), staging(decode)
        prefill.kill()
        with pytest.raises(RoomFailed, match="heartbeats"):
            dc.wait(6, timeout=15)
        dc.wait_released(6, timeout=15)
    st = staging(decode)
    assert st["whole"] and st["reserved_bytes"] == 0 and st["in_use_bytes"] == 0, st
    assert decode.status()["daemon"]["errors"]["peer_dead"] >= 1
    again = daemons("prefill2", *FLAGS)
    check_reports(run_cluster(again, decode, prefill_tp=4, decode_tp=1, kv_heads=8, timeout=40))
    assert decode.status()["daemon"]["rooms_by_path"]["staged"] >= 2


def test_staged_abort_mid_transfer_lands_nothing_after_release(daemons):
    """Rooms aborted while staged chunks are on the wire: after "released" neither the pages
    nor anything else changes, every staging byte is free, and the room id works again."""
    flags = ("--staging-enabled", "--staging-pool-bytes", "64MiB", "--staging-chunk-tokens", "512") + FLAGS[5:]
    prefill, decode = daemons("prefill", *flags), daemons("decode", *flags)
    shape = dict(num_layers=4, total_kv_heads=8, head_dim=128, dtype="bfloat16", page_size=16, num_pages=512)
    pre = [PoolLayout("P", "prefill", 2, r, **shape) for r in range(2)]
    dec = PoolLayout("D", "decode", 1, 0, **shape)
    with HostPool.create(pre[0]) as h0, HostPool.create(pre[1]) as h1, HostPool.create(dec) as hd, \
            prefill.client() as pc0, prefill.client() as pc1, decode.client() as dc:
        rng = np.random.default_rng(9)
        for h in (h0, h1):
            for b in range(h.layout.num_buffers):
                h.buffer(b)[...] = rng.integers(1, 256, h.buffer(b).shape, dtype=np.uint8)
        hd.fill(0)
        ranks = [(pc0, pc0.register_pool(pre[0], h0, bootstrap=prefill.address)),
                 (pc1, pc1.register_pool(pre[1], h1, bootstrap=prefill.address))]  # one client per rank
        did = dc.register_pool(dec, hd)
        for room in range(3):
            dc.recv(did, room, prefill.address, "P", np.arange(512))
        assert wait_for(lambda: all(dc.poll(r).state != "bootstrapping" for r in range(3)))
        for room in range(3):
            for pc, pid in ranks:
                pc.send(pid, room, np.arange(256), False)
        for room in range(3):
            dc.abort(did, room)
        for room in range(3):
            released = dc.wait_released(room, timeout=30)
            assert released.state == "failed" and "aborted" in released.reason
        before = [hd.buffer(b).copy() for b in range(dec.num_buffers)]
        for room in range(3):
            for pc, pid in ranks:
                with contextlib.suppress(KvdError):
                    pc.send(pid, room, np.arange(256, 512), True)
        time.sleep(1.5)
        assert all(np.array_equal(a, hd.buffer(b)) for b, a in enumerate(before)), "bytes landed after release"
        assert wait_for(lambda: staging(decode)["whole"] and staging(prefill)["whole"]), \
            (staging(decode), staging(prefill))
        hd.fill(0)
        dc.recv(did, 0, prefill.address, "P", np.arange(8))
        for pc, pid in ranks:
            pc.send(pid, 0, np.arange(100, 108), True, aux=b"again")
        assert dc.wait(0, timeout=20).aux == b"again"
        tok = dec.page_size
        for b in range(dec.num_buffers):
            assert np.array_equal(hd.buffer(b)[:8 * tok, :4], h0.buffer(b)[100 * tok:108 * tok])
            assert np.array_equal(hd.buffer(b)[:8 * tok, 4:], h1.buffer(b)[100 * tok:108 * tok])

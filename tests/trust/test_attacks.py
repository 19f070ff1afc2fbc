"""The peer attacks of issue 13 against real daemons under CurveZMQ, with sentinels.

An attacker with its own Mooncake engine and a registered buffer full of a sentinel tries to
hijack the prefill engine's directory entry, announce a pool and ask for a real room's KV:
with no key, with a key nobody authorized, with a valid key claiming the decode daemon's
identity, and with a valid key speaking as itself but for someone else's rank and pool. Every
attempt is refused (and counted where the daemon sees it); the attacker's buffer keeps its
sentinel (nothing leaked), the decode pool keeps its own outside the legitimate room (nothing
written), and a legitimate room afterwards is byte-exact (the directory was not hijacked)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from kvd import protocol as p
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.transfer.mooncake import MooncakeTransport
from tools.cluster import free_port, peer_socket

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)
SENTINEL, ATTACKER_SENTINEL = 0x5A, 0xEE


def errors(d) -> dict[str, int]:
    return d.status()["daemon"]["errors"]


def _server_key(tmp: Path, name: str) -> bytes:
    return zmq.auth.load_certificate(str(tmp / "trust" / name / "kvd.key"))[0]


def _dealer(keys: tuple[bytes, bytes] | None, server: bytes, address: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        s.curve_publickey, s.curve_secretkey = keys
        s.curve_serverkey = server
    s.connect(address)
    return s


def _check_room(dh: HostPool, ph: HostPool, b: int) -> None:
    got, want = dh.buffer(b), ph.buffer(b)
    assert np.array_equal(got[20:28], want[12:20])
    rest = np.ones(len(got), bool)
    rest[20:28] = False
    assert (got[rest] == SENTINEL).all(), "bytes written outside the legitimate room"


def test_forged_peers_are_refused_with_nothing_written_or_leaked(daemons, tmp_path: Path) -> None:
    flags = ("--timeouts-waiting-s", "6", "--timeouts-bootstrap-s", "5", "--timeouts-transfer-s", "6")
    pre, dec = daemons("prefill", *flags), daemons("decode", *flags)
    pl, dl = PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("D", "decode", 1, 0, **SHAPE)
    ph, dh = HostPool.create(pl), HostPool.create(dl)
    rng = np.random.default_rng(3)
    for b in range(pl.num_buffers):
        ph.buffer(b)[:] = rng.integers(0, 255, ph.buffer(b).shape, dtype=np.uint8)
    dh.fill(SENTINEL)
    evil = MooncakeTransport("127.0.0.1", "tcp")
    loot = np.full(dl.buffer_bytes * dl.num_buffers, ATTACKER_SENTINEL, dtype=np.uint8)
    base = loot.ctypes.data
    evil.register(base, loot.nbytes)
    mallory = f"tcp://127.0.0.1:{free_port()}"
    try:
        with pre.client() as pc, dec.client() as dc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            did = dc.register_pool(dl, dh)

            def attack(s: zmq.Socket, src: str, pool_key: str, room: int) -> None:
                s.send(p.RankAnnounce(src=src, token="", layout=pl.to_dict(), pool_key=f"{src}#evil#9").encode())
                s.send(p.PoolAnnounce(src=src, token="", pool_key=pool_key, layout=dl.to_dict(),
                                      buffers=[base + i * dl.buffer_bytes for i in range(dl.num_buffers)],
                                      session_id=evil.session_id, prefill_engine_id="P").encode())
                s.send(p.TransferRequest(src=src, token="", room=room, transfer_id=900 + room, pool_key=pool_key,
                                         prefill_engine_id="P", sender_rank=0, dst_indices=np.arange(2),
                                         dummy=False, deadline_s=5.0).encode())

            server = _server_key(tmp_path, "prefill")
            no_key = _dealer(None, server, pre.address)
            attack(no_key, mallory, f"{mallory}#evil#1", 50)
            wrong_key = _dealer(zmq.curve_keypair(), server, pre.address)
            attack(wrong_key, mallory, f"{mallory}#evil#1", 50)
            valid = peer_socket(tmp_path, "prefill", "mallory", mallory)  # authorized, bound to mallory
            valid.connect(pre.address)
            attack(valid, dec.address, f"{dec.address}#evil#1", 50)  # claims the decode daemon's identity
            # As itself, for someone else's rank (the directory's own) and into the decode daemon's pool.
            valid.send(p.RankAnnounce(src=mallory, token="", layout=pl.to_dict(), pool_key=f"{mallory}#evil#9").encode())
            valid.send(p.TransferRequest(src=mallory, token="", room=50, transfer_id=951,
                                         pool_key=f"{dec.address}#evil#1", prefill_engine_id="P", sender_rank=0,
                                         dst_indices=np.arange(2), dummy=False, deadline_s=5.0).encode())
            time.sleep(1.0)
            pc.send(pid, 50, [1, 2], True, aux=b"secret-aux")  # the room every forged request asked for
            time.sleep(2.0)
            errs = errors(pre)
            assert errs.get("peer_key_refused", 0) >= 1, errs  # the unknown key, at the ZAP handshake
            assert errs.get("peer_identity", 0) >= 3, errs  # three messages claiming the decode daemon
            assert errs.get("peer_ownership", 0) >= 2, errs  # the rank and the pool of others
            assert not any(r["room"] == 50 and r["peer"] not in ("-", "") for r in pre.status()["rooms"])
            assert (loot == ATTACKER_SENTINEL).all(), "KV leaked to the attacker's buffer"
            for s in (no_key, wrong_key, valid):
                s.close()
            # The directory was not hijacked: a real room goes from the real prefill rank.
            dc.recv(did, 51, pre.address, "P", [5, 6])
            pc.send(pid, 51, [3, 4], True, aux=b"ok")
            assert dc.wait(51, timeout=20).aux == b"ok"
            for b in range(dl.num_buffers):
                _check_room(dh, ph, b)
            assert pre.alive() and dec.alive()
    finally:
        evil.close()
        for pool in (ph, dh):
            pool.close()

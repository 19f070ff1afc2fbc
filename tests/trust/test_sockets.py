"""Both sockets under CurveZMQ fuzzed; the migration token with non-ASCII and wrong-type values;
which ports a daemon listens on, and where.

After each fuzz the daemons are alive, nothing of the garbage took effect, and a legitimate
room is byte-exact."""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from kvd import protocol as p
from kvd.client import KvdClient
from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.wire import fdmsg
from kvd.wire import peer as wp
from tools.cluster import free_port, peer_socket

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)
ROOT = Path(__file__).resolve().parents[2]


def legit_room(pre, dec, room: int) -> None:
    pl, dl = PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("D", "decode", 1, 0, **SHAPE)
    ph, dh = HostPool.create(pl), HostPool.create(dl)
    try:
        for b in range(pl.num_buffers):
            ph.buffer(b)[:] = (b + room) % 251
        with pre.client() as pc, dec.client() as dc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            did = dc.register_pool(dl, dh)
            dc.recv(did, room, pre.address, "P", [2, 3])
            pc.send(pid, room, [0, 1], True, aux=b"fine")
            assert dc.wait(room, timeout=20).aux == b"fine"
        ok = all(np.array_equal(dh.buffer(b)[8:16], ph.buffer(b)[0:8]) for b in range(pl.num_buffers))
        assert ok
    finally:
        ph.close()
        dh.close()


def _mutations(rng: random.Random, src: str) -> list[list[bytes]]:
    """Garbage and near-misses of every peer message type, as ZMQ multipart messages."""
    lay = PoolLayout("P", "prefill", 1, 0, **SHAPE).to_dict()
    seeds = [wp.RankAnnounce(layout=lay), wp.EngineQuery(engine_id="P"), wp.Heartbeat(nonce=1),
             wp.PoolAnnounce(pool_key=f"{src}#f#1", layout=lay, buffers=[1, 2, 3, 4], session_id="127.0.0.1:1",
                             prefill_engine_id="P"),
             wp.TransferRequest(room=1, transfer_id=1, pool_key=f"{src}#f#1", prefill_engine_id="P", sender_rank=0,
                                dst_indices=np.arange(2), dummy=False, deadline_s=1.0),
             wp.AbortTransfer(room=1, transfer_id=1, pool_key=f"{src}#f#1", sender_rank=0),
             wp.StagingGrant(room=1, transfer_id=1, pool_key="k", sender_rank=0, chunk=0, offset=1 << 60)]
    out: list[list[bytes]] = []
    for _ in range(300):
        msg = wp.stamped(rng.choice(seeds), src, "")
        raw = bytearray(msg.encode())
        kind = rng.randrange(6)
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif kind == 1:
            raw = raw[:rng.randrange(len(raw))]
        elif kind == 2:
            fields = msgpack.unpackb(bytes(raw), raw=False)
            i = rng.randrange(2, len(fields))
            fields[i] = rng.choice([None, -1, 2**63, "é" * 300, b"\xff" * 10, [1, [2]], {"a": 1}, 1.5, True])
            raw = bytearray(msgpack.packb(fields, use_bin_type=True))
        elif kind == 3:
            raw = bytearray(rng.randbytes(rng.randrange(1, 200)))
        elif kind == 4:
            fields = msgpack.unpackb(bytes(raw), raw=False)
            fields[1] = rng.randrange(0, 256)
            raw = bytearray(msgpack.packb(fields, use_bin_type=True))
        frames = [bytes(raw)]
        if kind == 5:
            frames = [bytes(raw), b"extra"]
        out.append(frames)
    return out


def test_peer_socket_fuzz_under_curve(pair, tmp_path: Path) -> None:
    pre, dec = pair
    me = f"tcp://127.0.0.1:{free_port()}"
    s = peer_socket(tmp_path, "prefill", "fuzzer", me)
    s.connect(pre.address)
    rng = random.Random(13)
    for frames in _mutations(rng, me):
        s.send_multipart(frames)
    # The same garbage claiming the decode daemon's identity.
    for frames in _mutations(rng, dec.address)[:100]:
        s.send_multipart(frames)
    time.sleep(2.0)
    s.close()
    errs = pre.status()["daemon"]["errors"]
    assert errs.get("protocol", 0) > 0 and errs.get("peer_identity", 0) > 0, errs
    assert errs.get("peer_handler", 0) == 0 and errs.get("task_crash", 0) == 0, errs  # no handler blew up
    assert pre.alive() and dec.alive()
    legit_room(pre, dec, 60)


def _engine_garbage(sock_path: str, rng: random.Random) -> None:
    valid = p.RegisterPool(req_id=1, layout=PoolLayout("X", "decode", 1, 0, **SHAPE).to_dict(),
                           memory={"kind": "fd", "ticket": "0" * 32, "offsets": [0, 1, 2, 3]}).encode()
    for i in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(sock_path)
        raw = bytearray(valid)
        for _ in range(rng.randint(0, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        if i % 5 == 0:
            raw = bytearray(rng.randbytes(rng.randrange(1, 300)))
        length = len(raw) if i % 7 else rng.choice([0, 1 << 31, len(raw) + 5])
        try:
            s.sendall(struct.pack(">I", length) + bytes(raw))
            s.recv(1 << 16)
        except OSError:
            pass
        s.close()


def _fd_garbage(sock_path: str, rng: random.Random) -> None:
    path = fdmsg.fd_socket_path(sock_path)
    r, w = os.pipe()
    dirfd = os.open("/", os.O_RDONLY)
    ro = os.open("/dev/shm", os.O_RDONLY)
    memfd = os.memfd_create("kvd-fuzz")
    try:
        for i in range(60):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(6)
            s.connect(path)
            data = fdmsg.MAGIC if i % 3 else rng.randbytes(rng.randrange(0, 100))
            fds = rng.choice([[], [r], [w, memfd], [dirfd], [ro], [memfd] * 5, [r] * 300 if i == 7 else [memfd]])
            try:
                if i % 11 == 0:
                    s.close()  # connect and leave
                    continue
                if fds:
                    socket.send_fds(s, [data], fds[:250])
                else:
                    s.send(data or b"x")
                s.recv(fdmsg.MAX_REPLY)
            except OSError:
                pass
            s.close()
    finally:
        for fd in (r, w, dirfd, ro, memfd):
            os.close(fd)


def test_engine_and_fd_sockets_fuzz(pair) -> None:
    pre, dec = pair
    rng = random.Random(5)
    _engine_garbage(pre.socket_path, rng)
    _fd_garbage(pre.socket_path, rng)
    st = pre.status()["daemon"]
    assert st["errors"].get("protocol", 0) > 0 and st["errors"].get("fd_handover_refused", 0) > 0, st["errors"]
    assert st["errors"].get("fd_handover_bug", 0) == 0 and st["errors"].get("internal", 0) == 0, st["errors"]
    assert st["trust"]["fd_tickets_waiting"] <= 64
    assert pre.alive()
    legit_room(pre, dec, 61)


def test_token_of_non_ascii_or_wrong_type_is_refused_and_the_loop_lives(daemons) -> None:
    pre = daemons("prefill", "--peer-insecure", "--peer-auth-token", "sekret")
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(pre.address)
    me = f"tcp://127.0.0.1:{free_port()}"
    for token in ("sékret", "\u2603" * 40, "", "sekre"):
        s.send(wp.stamped(wp.EngineQuery(engine_id="P"), me, token).encode())
    for token in (123, None, b"sekret", ["sekret"]):
        fields = msgpack.unpackb(wp.stamped(wp.EngineQuery(engine_id="P"), me, "").encode(), raw=False)
        fields[3] = token
        s.send(msgpack.packb(fields, use_bin_type=True))
    time.sleep(1.0)
    s.close()
    st = pre.status()["daemon"]
    assert st["errors"].get("auth", 0) + st["errors"].get("protocol", 0) >= 8, st["errors"]
    assert st["errors"].get("auth", 0) >= 4, st["errors"]
    assert st["trust"]["peer_auth"] == "insecure"
    assert pre.alive()
    out = subprocess.run([os.sys.executable, "-m", "kvd.kvctl", "status", "--socket", pre.socket_path],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert "INSECURE" in out.stdout, out.stdout + out.stderr
    assert '"peer_insecure"' in pre.log()


def _listening(pid: int) -> list[tuple[str, int]]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            local = line.split()[3]
            host, _, port = local.rpartition(":")
            found.append((host, int(port)))
    return found


def test_which_ports_listen_where(daemons) -> None:
    """The peer port follows node.hostname; Mooncake's ports listen on every address whatever
    node.hostname says (no option of this Mooncake build narrows them): the security notes say
    so and tell operators to firewall them."""
    if subprocess.run(["which", "ss"], capture_output=True).returncode:
        pytest.skip("needs ss")
    d = daemons("ports")
    st = d.status()["daemon"]
    session_port = int(st["transport"]["session_id"].rpartition(":")[2])
    ports = _listening(d.proc.pid)
    assert ("127.0.0.1", d.port) in ports, ports
    others = [(h, port) for h, port in ports if port != d.port]
    assert any(port == session_port for _, port in others), (session_port, ports)
    wildcard = [(h, port) for h, port in others if h in ("0.0.0.0", "*", "[::]")]
    notes = (ROOT / "notes" / "security-model.md").read_text()
    if wildcard:  # what Mooncake exposes is written down, with the firewall rule
        assert "0.0.0.0" in notes and "firewall" in notes.lower()
    assert "Mooncake" in st["trust"]["mooncake"]
    with KvdClient(d.socket_path) as c:
        assert c.status()["daemon"]["trust"]["peer_auth"] == "curve"

"""Malformed input for kvd's two sockets: the engine Unix socket and the peer ZMQ ROUTER.

Generators start from valid messages of every type and break them: random bytes, truncation,
byte flips, fields replaced by values of the wrong type, huge and negative integers, huge
length fields, non-ASCII and very long strings, unknown message types and header versions,
extra and missing fields, index arrays of odd lengths. On the engine socket the frame layer
is attacked too: length prefixes larger than what follows (then the connection closes),
prefixes over the frame limit, many frames in one write.

Used by tests/faults/test_fuzz.py (CI size) and tools/soak.py (long runs). Run directly:
``python tools/fuzz.py --engine-socket /run/kvd/kvd.sock --peer tcp://10.0.0.1:17500 -n 100000``.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

from kvd.wire import protocol as p  # noqa: E402

WEIRD_STRINGS = ["", "tcp://127.0.0.1", "tcp://127.0.0.1:", "tcp://[::1]:x", "tcp://:0", "ünïcödé-🔥",
                 "\x00\x01\x02", "a" * 5000, "tcp://10.255.255.1:1", "tcp://127.0.0.1:99999", "P", "D",
                 "ipc:///tmp/x", "inproc://x", "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
                 "../../etc/passwd", "kvd-does-not-exist", "tcp://127.0.0.1:-1", "\u202e", "*"]
WEIRD_INTS = [0, -1, 1, 2, 7, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, 10**12, -1000]
WEIRD_FLOATS = [0.0, -1.0, 1e-9, 1e300, float("inf"), float("-inf"), float("nan"), 3.5]


def weird_value(rng: random.Random, depth: int = 0) -> Any:
    k = rng.randrange(12 if depth < 2 else 8)
    if k == 0:
        return rng.choice(WEIRD_INTS)
    if k == 1:
        return rng.choice(WEIRD_FLOATS)
    if k == 2:
        return rng.choice(WEIRD_STRINGS)
    if k == 3:
        return rng.randbytes(rng.choice([0, 1, 7, 8, 9, 64, 4096]))
    if k == 4:
        return rng.choice([True, False, None])
    if k == 5:
        return np.arange(rng.choice([0, 1, 3, 100]), dtype=np.int64).tobytes()
    if k == 6:
        v = rng.choice([x for x in WEIRD_INTS if -(2**63) <= x < 2**63])
        return np.array([v] * rng.randrange(1, 5), dtype=np.int64).tobytes()
    if k == 7:
        return rng.randint(-5, 5)
    if k == 8:
        return [weird_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if k == 9:
        return {rng.choice(["kind", "name", "offsets", "size", "handles", "engine_id", "tp_size", "num_pages",
                            "head_dim", "dtype", rng.choice(WEIRD_STRINGS)]): weird_value(rng, depth + 1)
                for _ in range(rng.randrange(5))}
    if k == 10:
        return {weird_value(rng, 3) if rng.random() < 0.5 else 1: weird_value(rng, depth + 1)}
    return rng.choice(WEIRD_STRINGS) * rng.randrange(1, 3)


def _layout(rng: random.Random, role: str) -> dict:
    d = {"engine_id": rng.choice(["P", "D", "F", 7, "ü"]), "role": role, "tp_size": rng.choice([1, 2, 0, -1]),
         "tp_rank": rng.choice([0, 1, 5]), "num_layers": rng.choice([1, 2, 0, 10**9]),
         "total_kv_heads": rng.choice([1, 8, 0]), "head_dim": rng.choice([8, 64, -1]),
         "dtype": rng.choice(["bfloat16", "float32", "nope"]), "page_size": rng.choice([1, 16, 0]),
         "num_pages": rng.choice([1, 64, 2**40]), "is_mla": rng.choice([False, True, 1]),
         "hisparse": rng.choice([False, True])}
    if rng.random() < 0.3:
        d[rng.choice(list(d))] = weird_value(rng)
    return d


def _indices(rng: random.Random) -> np.ndarray:
    n = rng.choice([0, 1, 3, 64, 1000])
    return np.asarray([rng.choice([0, 1, 5, -1, 2**40, 63]) for _ in range(min(n, 64))] * (n // 64 + 1),
                      dtype=np.int64)[:n]


def engine_message(rng: random.Random) -> p.Message:
    """A valid-looking engine request with plausible but wrong content."""
    cls = rng.choice(list(p.ENGINE_REQUESTS))
    rid = rng.choice([1, 0, -1, 2**62, rng.randrange(1000)])
    room = rng.choice([0, 1, -1, 2**62, rng.randrange(100)])
    pool = rng.choice([0, 1, 2, -1, 99])
    if cls is p.RegisterPool:
        return p.RegisterPool(req_id=rid, layout=_layout(rng, rng.choice(["prefill", "decode", "x"])),
                              memory=rng.choice([{"kind": "shm", "name": rng.choice(WEIRD_STRINGS),
                                                  "offsets": [0, 1]}, {"kind": "cuda_ipc", "handles": []},
                                                 {"kind": "nope"}, {}]),
                              bootstrap=rng.choice(WEIRD_STRINGS))
    if cls is p.SendChunk:
        return p.SendChunk(req_id=rid, pool_id=pool, room=room, pages=_indices(rng), is_last=rng.random() < 0.5,
                           aux=rng.randbytes(rng.choice([0, 8, 1000])), page_offset=rng.choice([-1, 0, 5, 2**40]))
    if cls is p.RecvRoom:
        return p.RecvRoom(req_id=rid, pool_id=pool, room=room, bootstrap_addr=rng.choice(WEIRD_STRINGS),
                          prefill_engine_id=rng.choice(WEIRD_STRINGS), pages=_indices(rng),
                          timeout_s=rng.choice(WEIRD_FLOATS), enable_hisparse=rng.random() < 0.3)
    if cls is p.PollRoom:
        return p.PollRoom(req_id=rid, room=room)
    if cls is p.AbortRoom:
        return p.AbortRoom(req_id=rid, pool_id=pool, room=room)
    return p.StatusRequest(req_id=rid)


def peer_message(rng: random.Random, srcs: list[str]) -> p.Message:
    """A valid-looking peer message (src from ``srcs``) with wrong or hostile content."""
    cls = rng.choice(list(p.PEER_MESSAGES))
    kw: dict[str, Any] = {"src": rng.choice(srcs), "token": rng.choice(["", "", "x", "ünï", "\x00"])}
    for f in cls.FIELDS:
        if f.name in kw:
            continue
        if f.kind == "int":
            kw[f.name] = rng.choice(WEIRD_INTS)
        elif f.kind == "float":
            kw[f.name] = rng.choice(WEIRD_FLOATS)
        elif f.kind == "bool":
            kw[f.name] = rng.random() < 0.5
        elif f.kind == "str":
            kw[f.name] = rng.choice(WEIRD_STRINGS + ["P", "P", "D"])
        elif f.kind == "bytes":
            kw[f.name] = rng.randbytes(rng.choice([0, 3, 100]))
        elif f.kind == "indices":
            kw[f.name] = _indices(rng)
        elif f.kind == "map":
            kw[f.name] = _layout(rng, rng.choice(["prefill", "decode"]))
        elif f.kind == "ints":
            kw[f.name] = [rng.choice(WEIRD_INTS) for _ in range(rng.randrange(5))]
        elif f.kind == "strs":
            kw[f.name] = [rng.choice(WEIRD_STRINGS) for _ in range(rng.randrange(3))]
        elif f.kind == "maps":
            kw[f.name] = [_layout(rng, "prefill") for _ in range(rng.randrange(3))]
    return cls(**kw)


def mutate(rng: random.Random, msg: p.Message) -> bytes:
    """Break an encoded message in one of many ways."""
    raw = msg.encode()
    k = rng.randrange(11)
    if k == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if k == 1:
        return raw[:rng.randrange(len(raw))]
    if k == 2:
        b = bytearray(raw)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    items = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    if k == 3 and len(items) > 2:  # a field of the wrong type
        items[rng.randrange(2, len(items))] = weird_value(rng)
    elif k == 4:  # unknown type / bad header
        items[rng.choice([0, 1])] = rng.choice([0, -1, 2, 99, 255, 2**40, "x", None, 1.5, True])
    elif k == 5:  # extra fields
        items += [weird_value(rng) for _ in range(rng.randrange(1, 4))]
    elif k == 6 and len(items) > 3:  # missing fields
        items = items[:rng.randrange(2, len(items))]
    elif k == 7:  # not an array
        items = rng.choice([{"a": 1}, "str", 5, None, [], [1], items[0:1]])
    elif k == 8:  # msgpack container claiming a huge length
        return rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff", b"\xc6\xff\xff\xff\xf0abc",
                           b"\xdf\x7f\xff\xff\xff\x01"])
    elif k == 9 and len(items) > 2:  # several fields wrong at once
        for _ in range(3):
            items[rng.randrange(2, len(items))] = weird_value(rng)
    else:
        return raw  # valid-looking (content is already hostile)
    return msgpack.packb(items, use_bin_type=rng.random() < 0.8)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def fuzz_engine_socket(sock_path: str, n: int, seed: int = 0, deadline_s: float = 600.0) -> dict:
    """Send ``n`` malformed frames to a daemon's engine socket; returns counts. Replies are read
    (and discarded) so the daemon never blocks on a full socket."""
    rng = random.Random(seed)
    stats = {"sent": 0, "reconnects": 0, "replies": 0, "refused_connects": 0}
    s: socket.socket | None = None
    t_end = time.monotonic() + deadline_s

    def connect() -> socket.socket:
        for _ in range(50):
            try:
                c = socket.socket(socket.AF_UNIX)
                c.settimeout(5)
                c.connect(sock_path)
                return c
            except OSError:
                stats["refused_connects"] += 1
                time.sleep(0.05)
        raise ConnectionError(f"cannot connect to {sock_path}")

    def drain(c: socket.socket) -> None:
        c.setblocking(False)
        try:
            while True:
                data = c.recv(1 << 16)
                if not data:
                    raise ConnectionResetError
                stats["replies"] += 1
        except BlockingIOError:
            pass
        finally:
            c.setblocking(True)
            c.settimeout(5)

    while stats["sent"] < n and time.monotonic() < t_end:
        if s is None:
            s = connect()
            stats["reconnects"] += 1
        k = rng.random()
        try:
            if k < 0.01:  # a length prefix larger than what follows, then hang up
                s.sendall(struct.pack(">I", rng.choice([100, 2**20, 2**31])) + rng.randbytes(10))
                s.close()
                s = None
            elif k < 0.02:  # over the frame limit
                s.sendall(struct.pack(">I", 0xFFFFFFFF) + b"xx")
                s.close()
                s = None
            else:
                frames = [_frame(mutate(rng, engine_message(rng))) for _ in range(rng.choice([1, 1, 4]))]
                s.sendall(b"".join(frames))
                stats["sent"] += len(frames) - 1
            stats["sent"] += 1
            if s is not None and stats["sent"] % 16 == 0:
                drain(s)
        except OSError:
            if s is not None:
                s.close()
            s = None
    if s is not None:
        s.close()
    return stats


def fuzz_peer(address: str, n: int, seed: int = 0, srcs: list[str] | None = None,
              keys: tuple[bytes, bytes, bytes] | None = None) -> dict:
    """Send ``n`` malformed peer messages to a daemon's ROUTER from a few DEALERs (CURVE clients
    with ``keys``: public, secret, server)."""
    import zmq
    rng = random.Random(seed)
    srcs = srcs or ["tcp://127.0.0.1:1", "tcp://10.77.0.250:17500", "", "ünï", "tcp://127.0.0.1"]
    ctx = zmq.Context()
    socks = []
    for _ in range(4):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.setsockopt(zmq.SNDHWM, 100000)
        d.setsockopt(zmq.SNDTIMEO, 2000)
        if keys is not None:
            d.curve_publickey, d.curve_secretkey, d.curve_serverkey = keys
        d.connect(address)
        socks.append(d)
    stats = {"sent": 0}
    for i in range(n):
        d = socks[i % len(socks)]
        k = rng.random()
        if k < 0.05:
            parts = [rng.randbytes(rng.randrange(50)) for _ in range(rng.randrange(2, 4))]
            d.send_multipart(parts)
        else:
            d.send(mutate(rng, peer_message(rng, srcs)))
        stats["sent"] += 1
        if i % 2000 == 1999:
            time.sleep(0.05)  # let the daemon keep up (ZMQ queues, not the daemon, would drop)
    time.sleep(0.5)
    for d in socks:
        d.close()
    ctx.term()
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine-socket")
    ap.add_argument("--peer")
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.engine_socket:
        print("engine", fuzz_engine_socket(args.engine_socket, args.n, args.seed), flush=True)
    if args.peer:
        print("peer", fuzz_peer(args.peer, args.n, args.seed), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A prefill engine whose ranks are served by several daemons (nodes), one of which is its
directory: the directory daemon restarted, and a node lost for good, with real daemons.

Defects this pins (red team round 8): a rank announce is not answered, and a daemon serving
ranks for a directory elsewhere announced them once, at registration. So a directory daemon
restarted on its port never learnt of the ranks on the other nodes again: every room failed with
"did not become ready" until those engine ranks were restarted. A directory only heartbeats
peers it has rooms with, so a lost node serving ranks was never declared dead: the ranks,
registered again on another node, were refused as a hijack ("which <lost node> serves") for
``peer.idle_s`` (300 s), every room failing meanwhile; and an engine brought back in another
shape (TP 4 -> 2) was refused for good ("disagrees with rank 1"), the lost node's ranks never
being withdrawn. Now a daemon announces its ranks to a remote directory again every heartbeat
timeout, a directory watches the daemons serving its ranks by heartbeat, and ranks of a dead
daemon may move or be dropped for a new shape.

Invariants: within a few heartbeat timeouts of the fault the engine serves byte-exact rooms again.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from kvd.client import KvdClient, KvdError
from kvd.hostpool import HostPool
from kvd.layout import PoolLayout

pytestmark = pytest.mark.e2e

FLAGS = ("--timeouts-waiting-s", "2", "--timeouts-bootstrap-s", "1.5", "--timeouts-abort-fence-s", "1",
         "--timeouts-heartbeat-interval-s", "0.2")  # dead after 0.6 s of silence
SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)
HEAL_S = 6.0  # a heartbeat timeout to declare the node dead, one to announce again, and slack


class Engine:
    """Prefill ranks (each its own connection, pools of random bytes) and one decode rank."""

    def __init__(self, dec) -> None:
        self.pools: list[HostPool] = []
        self.ranks: dict[int, tuple[KvdClient, int, HostPool]] = {}
        self.dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
        self.dh = self._pool(self.dl, None)
        self.dc = dec.client()
        self.did = self.dc.register_pool(self.dl, self.dh)
        self.room = 0

    def _pool(self, layout: PoolLayout, seed: int | None) -> HostPool:
        pool = HostPool.create(layout)
        self.pools.append(pool)
        if seed is None:
            pool.fill(0xAB)
        for b in range(layout.num_buffers if seed is not None else 0):
            pool.buffer(b)[...] = np.random.default_rng(seed + b).integers(0, 256, pool.buffer(b).shape, np.uint8)
        return pool

    def register(self, daemon, directory: str, tp: int, rank: int) -> None:
        if rank in self.ranks:
            self.ranks.pop(rank)[0].close()
        layout = PoolLayout("P", "prefill", tp, rank, **SHAPE)
        pool, client = self._pool(layout, 100 * tp + rank), daemon.client()
        self.ranks[rank] = (client, client.register_pool(layout, pool, bootstrap=directory), pool)

    def transfer(self, directory: str) -> str:
        """One room over every rank: '' if it succeeded byte-exact, else why not."""
        self.room += 1
        room, src, dst = self.room, [1 + self.room % 3], [5 + self.room % 4]
        self.dh.fill(0xAB)
        self.dc.recv(self.did, room, directory, "P", dst)
        for client, pool_id, _ in self.ranks.values():
            client.send(pool_id, room, src, True)
        try:
            self.dc.wait(room, timeout=20)
        except KvdError as exc:
            return str(exc)
        ps = SHAPE["page_size"]
        for b in range(self.dl.num_buffers):
            want = np.concatenate([self.ranks[r][2].buffer(b)[src[0] * ps:(src[0] + 1) * ps]
                                   for r in sorted(self.ranks)], axis=1)
            assert np.array_equal(self.dh.buffer(b)[dst[0] * ps:(dst[0] + 1) * ps], want), f"buffer {b}"
        return ""

    def heals(self, directory: str) -> float:
        """Seconds until a room succeeds (byte-exact), failing the test past HEAL_S."""
        t0, why = time.monotonic(), ""
        while time.monotonic() - t0 < HEAL_S:
            if not (why := self.transfer(directory)):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"no room succeeded within {HEAL_S} s: {why}")

    def close(self) -> None:
        for client, _, _ in self.ranks.values():
            client.close()
        self.dc.close()
        for pool in self.pools:
            pool.close()


def test_lost_and_restarted_prefill_nodes_heal(daemons) -> None:
    pa, pb, pc, dec = (daemons(n, *FLAGS) for n in ("pa", "pb", "pc", "d"))
    eng = Engine(dec)
    try:
        for r in range(4):  # ranks 0, 2 on the directory's node pa, 1, 3 on pb
            eng.register(pa if r % 2 == 0 else pb, pa.address, 4, r)
        assert eng.transfer(pa.address) == ""
        pb.kill()  # the node is lost: its ranks come back on another node
        for r in (1, 3):
            eng.register(pc, pa.address, 4, r)
        eng.heals(pa.address)
        port = pa.port  # the directory's daemon restarts: its engine ranks come back, pc's never left
        pa.kill()
        pa = dataclasses.replace(daemons("pa", *FLAGS, "--peer-port", str(port)), port=port)
        for r in (0, 2):
            eng.register(pa, pa.address, 4, r)
        eng.heals(pa.address)
        pc.kill()  # lost too: the engine comes back on the directory's node alone, at TP 2
        for r in list(eng.ranks):
            eng.ranks.pop(r)[0].close()
        t0 = time.monotonic()
        while True:  # refused until pc is declared dead (a heartbeat timeout), then taken
            try:
                for r in range(2):
                    eng.register(pa, pa.address, 2, r)
                break
            except KvdError as exc:
                assert time.monotonic() - t0 < HEAL_S, f"TP 2 still refused after {HEAL_S} s: {exc}"
                time.sleep(0.2)
        eng.heals(pa.address)
    finally:
        eng.close()

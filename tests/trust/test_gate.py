"""The ownership gate (kvd.shell.peer_gate): an authenticated peer speaks only for its own
engines, pools and transfers. Pure: fakes for the directory, pools and sender rooms."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kvd.core.layout import PoolLayout
from kvd.shell.peer_gate import PeerGate, host_of
from kvd.wire import peer as wp

ME, B, EVIL = "tcp://10.0.0.1:17500", "tcp://10.0.0.2:17500", "tcp://10.0.0.9:17500"
LAY = PoolLayout("P", "prefill", 2, 0, 2, 4, 8, "bfloat16", 4, 16).to_dict()
DEC = PoolLayout("D", "decode", 1, 0, 2, 4, 8, "bfloat16", 4, 16).to_dict()


class Pools:
    def __init__(self) -> None:
        self.pools = {f"{B}#x#1": SimpleNamespace(daemon=B)}

    def remote(self, key: str) -> SimpleNamespace | None:
        return self.pools.get(key)


def gate(owner: str | None = B, alive: bool = True, transfers: dict | None = None) -> tuple[PeerGate, list[str]]:
    counted: list[str] = []
    g = PeerGate(lambda: ME, Pools(), lambda engine, rank: owner if (engine, rank) == ("P", 0) else None,
                 lambda tid, rank: (transfers or {}).get((tid, rank), []), lambda peer: alive, counted.append)
    return g, counted


def announce(src: str, **kw: object) -> wp.PoolAnnounce:
    fields = {"pool_key": f"{src}#y#1", "layout": DEC, "buffers": [1, 2, 3, 4], "session_id": f"{host_of(src)}:1",
              "prefill_engine_id": "P", **kw}
    return wp.PoolAnnounce(src=src, **fields)  # type: ignore[arg-type]


def request(src: str, pool_key: str) -> wp.TransferRequest:
    return wp.TransferRequest(src=src, room=1, transfer_id=7, pool_key=pool_key, prefill_engine_id="P",
                              sender_rank=0, dst_indices=np.arange(2), dummy=False, deadline_s=1.0)


def test_a_rank_served_by_a_live_daemon_cannot_be_taken_over() -> None:
    g, counted = gate(owner=B)
    assert not g.admit(wp.RankAnnounce(src=EVIL, layout=LAY))
    assert not g.admit(wp.RankAnnounce(src=EVIL, layout=LAY, withdraw=True))
    assert g.admit(wp.RankAnnounce(src=B, layout=LAY)) and g.admit(wp.RankAnnounce(src=B, layout=LAY, withdraw=True))
    assert g.admit(wp.RankAnnounce(src=EVIL, layout={**LAY, "tp_rank": 1}))  # nobody serves rank 1
    assert counted == ["peer_ownership"] * 2 and g.refused == 2


def test_a_rank_of_this_daemon_is_never_taken_and_a_dead_daemons_rank_may_move() -> None:
    g, _ = gate(owner=ME, alive=False)
    assert not g.admit(wp.RankAnnounce(src=EVIL, layout=LAY))
    g, _ = gate(owner=B, alive=False)
    assert g.admit(wp.RankAnnounce(src=EVIL, layout=LAY))


@pytest.mark.parametrize("msg, why", [
    (announce(EVIL, pool_key=f"{B}#x#2"), "namespace"),
    (announce(EVIL, pool_key="plain"), "namespace"),
    (announce(EVIL, session_id="10.0.0.2:15000"), "another host"),
    (announce(B, pool_key=f"{B}#x#1", session_id="10.0.0.7:1"), "another host"),
])
def test_pool_announces_of_someone_elses_memory_are_refused(msg: wp.PoolAnnounce, why: str) -> None:
    g, _ = gate()
    assert why in g.check(msg)


def test_own_pool_announce_passes() -> None:
    g, _ = gate()
    assert g.check(announce(EVIL)) == "" and g.check(announce(B, pool_key=f"{B}#x#1")) == ""


def test_transfers_only_into_pools_the_peer_announced() -> None:
    g, _ = gate()
    assert "namespace" in g.check(request(EVIL, f"{B}#x#1"))
    assert g.check(request(B, f"{B}#x#1")) == ""
    assert g.check(request(EVIL, f"{EVIL}#z#1")) == ""  # unknown: the sender refuses it itself


def test_aborts_only_of_the_peers_own_transfers() -> None:
    g, _ = gate(transfers={(7, 0): [B]})
    evil = wp.AbortTransfer(src=EVIL, room=1, transfer_id=7, pool_key=f"{EVIL}#z#1", sender_rank=0)
    assert "aborts transfer 7" in g.check(evil)
    assert g.check(wp.AbortTransfer(src=B, room=1, transfer_id=7, pool_key=f"{B}#x#1", sender_rank=0)) == ""


def test_malformed_content_is_refused_not_raised() -> None:
    g, _ = gate()
    assert g.check(wp.RankAnnounce(src=EVIL, layout="not a map")) == ""  # the directory refuses it
    bad = wp.PoolAnnounce(src=EVIL, pool_key=None, layout=DEC, buffers=[], session_id=None,  # type: ignore[arg-type]
                          prefill_engine_id="P")
    assert g.check(bad) != ""

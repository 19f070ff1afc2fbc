"""The directory heals (issue 12, item 4): an engine that registers again replaces its entry, a
conflicting announce fails only the announcing rank, a restarted daemon's old entries and pools
are dropped, and cached answers of a peer not heard from lately are asked again."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from kvd.core.config import Config
from kvd.core.layout import PoolLayout
from kvd.mem.pools import RemotePool
from kvd.shell.directory import Directory
from kvd.sides.context import LayoutConflict
from kvd.wire import peer as wp
from kvd.wire.codec import Message

ME = "tcp://127.0.0.1:1000"
P1 = "tcp://127.0.0.1:1001"
D1 = "tcp://127.0.0.1:2001"


class Registry:
    def __init__(self) -> None:
        self.remote_pools: dict[str, RemotePool] = {}
        self.remote_used: dict[str, float] = {}
        self.local: dict[int, Any] = {}
        self.staging: dict[str, Any] = {}

    def send_ring_bytes(self) -> int:
        return 0

    def staging_pool(self, pool: Any) -> None:
        return None

    def prefill_layout(self, engine_id: str) -> PoolLayout | None:
        return None


def lay(rank: int, tp: int = 2, heads: int = 4, engine: str = "P") -> PoolLayout:
    return PoolLayout(engine, "prefill", tp, rank, num_layers=2, total_kv_heads=heads, head_dim=8,
                      dtype="bfloat16", page_size=4, num_pages=16)


class Harness:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []
        self.errors: Counter[str] = Counter()
        self.t = 100.0
        self.registry = Registry()

        async def session(peer: str) -> str:
            return "session"

        self.dir = Directory(Config(), self.registry, session, lambda a, m: self.sent.append((a, m)),  # type: ignore[arg-type]
                             lambda k: self.errors.update([k]), lambda: self.t)
        self.dir.address = ME

    def announce(self, layout: PoolLayout, src: str = P1, pool_key: str = "", withdraw: bool = False) -> None:
        self.dir.on_rank_announce(wp.RankAnnounce(src=src, layout=layout.to_dict(), pool_key=pool_key or
                                                  f"{src}#{layout.tp_rank}", withdraw=withdraw))

    def info(self, engine: str = "P") -> wp.EngineInfo:
        return self.dir.engine_info_reply(engine)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_an_engine_restarted_with_another_layout_is_not_refused(h):
    """Before: the directory never forgot a layout; the restarted engine was refused forever."""
    h.announce(lay(0))
    h.announce(lay(1))
    assert h.info().ready
    h.announce(lay(0), withdraw=True)  # the old engine's pools are dropped
    h.announce(lay(1), withdraw=True)
    h.announce(lay(0, heads=8))
    h.announce(lay(1, heads=8))
    info = h.info()
    assert info.ready and not info.conflict and info.layouts[0]["total_kv_heads"] == 8


def test_a_withdraw_of_an_old_pool_keeps_the_newer_registration(h):
    h.announce(lay(0), pool_key="old")
    h.announce(lay(0), pool_key="new")  # the engine re-registered before the old pool was reaped
    h.announce(lay(0), pool_key="old", withdraw=True)
    assert 0 in h.dir.ranks["P"]


def test_a_conflicting_announce_fails_only_the_announcing_rank(h):
    """Before: one conflicting announce marked the whole engine in conflict until restart."""
    h.announce(lay(0))
    with pytest.raises(LayoutConflict, match="rank 1"):
        h.announce(lay(1, heads=8))
    info = h.info()
    assert not info.ready and info.conflict and 0 in h.dir.ranks["P"] and 1 not in h.dir.ranks["P"]
    h.announce(lay(1))  # the rank, fixed, registers again
    info = h.info()
    assert info.ready and not info.conflict and not h.dir.conflicts


def test_a_restarted_daemon_loses_its_ranks_and_pools(h):
    h.announce(lay(0), src=P1)
    h.announce(lay(1), src=ME)
    h.registry.remote_pools["k"] = RemotePool("k", lay(0), [1], "s", daemon=D1)
    h.registry.remote_pools["mine"] = RemotePool("mine", lay(0), [1], "s", daemon=P1)
    h.dir.on_engine_query(wp.EngineQuery(src=D1, engine_id="P"))  # D1 holds a ready answer
    h.sent.clear()
    h.dir.peer_restarted(P1)
    assert set(h.dir.ranks["P"]) == {1} and set(h.registry.remote_pools) == {"k"}
    pushed = [m for a, m in h.sent if a == D1 and isinstance(m, wp.EngineInfo)]
    assert pushed and not pushed[-1].ready  # D1 drops its cached topology


async def test_a_pushed_change_drops_the_cached_topology(h):
    ready = wp.EngineInfo(src=P1, engine_id="P", ready=True, tp_size=1, layouts=[lay(0, tp=1).to_dict()],
                          daemons=[P1])
    asked = asyncio.ensure_future(h.dir.engine_info(P1, "P", h.t + 5))
    await asyncio.sleep(0)  # the query is out: the answer is one this daemon asked for
    h.dir.on_engine_info(ready)
    assert await asked is not None
    h.dir.on_engine_info(wp.EngineInfo(src=P1, engine_id="P", ready=False, tp_size=0, layouts=[], daemons=[]))
    assert (P1, "P") not in h.dir._info


async def test_an_answer_nobody_asked_for_is_not_kept(h):
    h.dir.on_engine_info(wp.EngineInfo(src=P1, engine_id="Q", ready=True, tp_size=1,
                                       layouts=[lay(0, tp=1, engine="Q").to_dict()], daemons=[P1]))
    assert (P1, "Q") not in h.dir._info and h.errors["stale_message"] == 1


async def test_cached_topology_and_announces_are_revalidated_after_silence(h):
    """Before: a prefill daemon restarted on the same port while idle was never asked again:
    'decode pool ... was never announced' for every later room."""
    heard = {P1: True}
    h.dir.current = lambda peer, within: heard.get(peer, False)
    asked = asyncio.ensure_future(h.dir.engine_info(P1, "P", h.t + 5))
    await asyncio.sleep(0)
    h.dir.on_engine_info(wp.EngineInfo(src=P1, engine_id="P", ready=True, tp_size=1,
                                       layouts=[lay(0, tp=1).to_dict()], daemons=[P1]))
    await asked

    class Pool:
        key = "D#1"
        layout = lay(0, tp=1)
        buffers = [4096]

    async def announce() -> None:
        await h.dir.announce_pool(P1, Pool(), "P", h.t + 5)  # type: ignore[arg-type]

    task = asyncio.ensure_future(announce())
    await asyncio.sleep(0)
    h.dir.on_pool_ack(wp.PoolAck(src=P1, pool_key="D#1", ok=True))
    await task
    announces = lambda: [m for _, m in h.sent if isinstance(m, wp.PoolAnnounce)]  # noqa: E731
    assert len(announces()) == 1
    await h.dir.announce_pool(P1, Pool(), "P", h.t + 5)  # type: ignore[arg-type]
    assert len(announces()) == 1  # heard from lately: the cache holds
    heard[P1] = False  # idle past the heartbeat window: it may have restarted
    task = asyncio.ensure_future(announce())
    await asyncio.sleep(0.01)
    assert len(announces()) == 2
    h.dir.on_pool_ack(wp.PoolAck(src=P1, pool_key="D#1", ok=True))
    await task
    assert h.dir._cached((P1, "P")) is None  # and the topology is asked again


async def test_one_pass_is_relied_on_only_for_our_own_device_memory() -> None:
    """A sender's ``PoolAck.one_pass`` (it reaches our pool on this machine, GPU to GPU) counts only
    if this daemon's pool is exported device memory: a host pool, or a lying peer, stages as before."""
    h = Harness()

    class Pool:
        key = "D#1"
        layout = lay(0, tp=1)
        buffers = [4096, 8192]

    async def accepted(one_pass: bool, device: bool) -> bool:
        h.dir.device_memory = lambda addresses: device and addresses == Pool.buffers
        h.dir._announced.clear()
        task = asyncio.ensure_future(h.dir.announce_pool(P1, Pool(), "P", h.t + 5))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        h.dir.on_pool_ack(wp.PoolAck(src=P1, pool_key="D#1", ok=True, one_pass=one_pass))
        return (await task).one_pass

    assert await accepted(one_pass=True, device=True)
    assert not await accepted(one_pass=True, device=False)
    assert not await accepted(one_pass=False, device=True)


def test_the_sender_offers_one_pass_only_on_this_machine_with_gpu_pools() -> None:
    """The prefill side's answer: one pass needs the decode session reachable here and this
    engine's pools in exported device memory; otherwise ``one_pass`` stays False."""
    h = Harness()
    prefill = lay(0, tp=1)

    class Local:
        layout = prefill
        buffers = [1 << 20]

    h.registry.local = {1: Local()}  # type: ignore[attr-defined]
    h.registry.prefill_layout = lambda engine_id: prefill  # type: ignore[method-assign]
    h.registry.send_ring_bytes = lambda: 0  # type: ignore[attr-defined]
    decode = PoolLayout("P", "decode", 1, 0, num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16",
                        page_size=4, num_pages=16)

    def ack(reach: bool, device: bool) -> bool:
        h.dir.same_node_peer = lambda session: reach and session == "sess-d"
        h.dir.device_memory = lambda addresses: device
        h.sent.clear()
        h.dir.on_pool_announce(wp.PoolAnnounce(src=D1, pool_key="D#1", layout=decode.to_dict(),
                                               buffers=[(1 << 30) + b * decode.buffer_bytes
                                                        for b in range(decode.num_buffers)],
                                               session_id="sess-d", prefill_engine_id="P"))
        (_, msg), = h.sent
        assert isinstance(msg, wp.PoolAck) and msg.ok, msg
        return msg.one_pass

    assert ack(reach=True, device=True)
    assert not ack(reach=False, device=True)
    assert not ack(reach=True, device=False)


def _decode_announce(h: Harness, key: str, src: str = D1) -> wp.PoolAck:
    decode = PoolLayout("D", "decode", 1, 0, num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16",
                        page_size=4, num_pages=16)
    h.sent.clear()
    h.dir.on_pool_announce(wp.PoolAnnounce(src=src, pool_key=key, layout=decode.to_dict(),
                                           buffers=[(1 << 30) + b * decode.buffer_bytes
                                                    for b in range(decode.num_buffers)],
                                           session_id="sess-d", prefill_engine_id="P"))
    return [m for _, m in h.sent if isinstance(m, wp.PoolAck)][-1]


def test_pools_no_room_uses_are_forgotten_after_their_idle_time_and_the_peer_is_told(h):
    """Before: a decode engine that restarts registers a new pool each time, and every one it
    announced stayed here until its daemon restarted (a crash-looping engine leaked slowly)."""
    h.announce(lay(0, tp=1))
    in_use: set[str] = set()
    h.dir.pools_in_use = lambda: in_use
    assert _decode_announce(h, f"{D1}#a#1").ok and _decode_announce(h, f"{D1}#a#2").ok
    in_use.add(f"{D1}#a#2")  # a room in flight writes into it
    h.sent.clear()
    h.t += h.dir.config.peer_pool_idle_s - 1
    h.dir.expire_pools(h.t)
    assert set(h.registry.remote_pools) == {f"{D1}#a#1", f"{D1}#a#2"}
    h.t += 2
    h.dir.expire_pools(h.t)
    told = [(a, m) for a, m in h.sent if isinstance(m, wp.PoolAck)]
    assert len(told) == 1 and told[0][0] == D1 and told[0][1].forgotten and not told[0][1].ok
    # Told, but kept for a grace: a request the peer sent before the notice reached it still works.
    assert f"{D1}#a#1" in h.registry.remote_pools and set(h.registry.remote_used) == {f"{D1}#a#2"}
    h.t += 2 * h.dir.config.heartbeat_timeout_s
    h.dir.expire_pools(h.t)
    assert set(h.registry.remote_pools) == {f"{D1}#a#2"} and set(h.registry.remote_used) == {f"{D1}#a#2"}
    assert len([m for _, m in h.sent if isinstance(m, wp.PoolAck)]) == 1, "one notice per pool"
    in_use.clear()  # its room ended: its idle time runs from the last sweep that saw it used
    h.t += h.dir.config.peer_pool_idle_s
    h.dir.expire_pools(h.t)
    h.t += 2 * h.dir.config.heartbeat_timeout_s
    h.dir.expire_pools(h.t)
    assert h.registry.remote_pools == {}


def test_a_request_in_the_notice_grace_revives_its_pool(h):
    """The race the grace closes: the decode daemon sent a room's request on its cached announce
    just as this daemon forgot the idle pool; the request still finds it, and the pool stays."""
    h.announce(lay(0, tp=1))
    h.dir.pools_in_use = set
    assert _decode_announce(h, f"{D1}#a#1").ok
    h.t += h.dir.config.peer_pool_idle_s + 1
    h.dir.expire_pools(h.t)
    assert any(isinstance(m, wp.PoolAck) and m.forgotten for _, m in h.sent)
    assert f"{D1}#a#1" in h.registry.remote_pools  # the in-flight request finds it ...
    h.registry.remote_used[f"{D1}#a#1"] = h.t  # ... and names it (what PoolRegistry.remote records)
    h.t += 2 * h.dir.config.heartbeat_timeout_s
    h.dir.expire_pools(h.t)
    assert f"{D1}#a#1" in h.registry.remote_pools


def test_one_peers_pools_are_bounded_oldest_unused_first(h):
    h.announce(lay(0, tp=1))
    h.dir.config = Config(peer_max_pools=3)
    in_use: set[str] = set()
    h.dir.pools_in_use = lambda: in_use
    for i in range(3):
        h.t += 1
        assert _decode_announce(h, f"{D1}#a#{i}").ok
    h.registry.remote_used[f"{D1}#a#0"] = h.t + 1  # named by a request since: the newest
    in_use.add(f"{D1}#a#1")
    assert _decode_announce(h, f"{D1}#a#3").ok
    assert set(h.registry.remote_pools) == {f"{D1}#a#0", f"{D1}#a#1", f"{D1}#a#3"}  # #2 went
    assert any(isinstance(m, wp.PoolAck) and m.forgotten and m.pool_key == f"{D1}#a#2" for _, m in h.sent)
    assert _decode_announce(h, f"{P1}#b#0", src=P1).ok, "another peer's pools are not counted"
    in_use.update(h.registry.remote_pools)
    refused = _decode_announce(h, f"{D1}#a#4")
    assert not refused.ok and "peer.max_pools" in refused.error and h.errors["peer_pools"] == 1
    assert len([k for k, p in h.registry.remote_pools.items() if p.daemon == D1]) == 3


async def test_a_forgotten_or_dropped_pool_is_announced_again_by_the_next_room(h):
    class Pool:
        key = "D#1"
        layout = lay(0, tp=1)
        buffers = [4096]

    async def announce() -> None:
        task = asyncio.ensure_future(h.dir.announce_pool(P1, Pool(), "P", h.t + 5))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        h.dir.on_pool_ack(wp.PoolAck(src=P1, pool_key="D#1", ok=True))
        await task

    announces = lambda: [m for _, m in h.sent if isinstance(m, wp.PoolAnnounce)]  # noqa: E731
    await announce()
    assert h.dir.pool_accepted_now(P1, Pool(), "P") is not None  # type: ignore[arg-type]
    h.dir.on_pool_ack(wp.PoolAck(src=P1, pool_key="D#1", ok=False, forgotten=True))
    assert h.dir.pool_accepted_now(P1, Pool(), "P") is None  # type: ignore[arg-type]
    await announce()
    assert len(announces()) == 2 and h.dir.announces() == 1
    # A notice racing an announce in flight leaves it alone: the announce is answered after it.
    h.dir.on_pool_ack(wp.PoolAck(src=P1, pool_key="D#1", ok=False, forgotten=True))
    task = asyncio.ensure_future(h.dir.announce_pool(P1, Pool(), "P", h.t + 5))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    h.dir.on_pool_ack(wp.PoolAck(src=P1, pool_key="D#1", ok=False, forgotten=True))
    h.dir.on_pool_ack(wp.PoolAck(src=P1, pool_key="D#1", ok=True))
    await task
    h.dir.pool_dropped(Pool())  # type: ignore[arg-type]
    assert h.dir.announces() == 0 and not h.dir._accepted

"""The peer hub in process, on real ZMQ sockets over loopback: bad peers cost a counter, never a
loop; peer sockets are bounded and reclaimed; a restarted peer's old incarnation is dropped."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
import zmq

from kvd.core.config import Config
from kvd.shell.peer_hub import PeerAddressError, PeerHub, check_peer_address
from kvd.sides.tasks import TaskOwner
from kvd.wire import peer as wp
from kvd.wire.codec import Message


class Handler:
    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.got: list[Message] = []
        self.dead: list[str] = []
        self.raise_on: type | None = None

    def on_peer_message(self, msg: Message) -> None:
        if self.raise_on is not None and isinstance(msg, self.raise_on):
            raise RuntimeError("handler bug")
        self.got.append(msg)

    def peer_dead(self, peer: str) -> None:
        self.dead.append(peer)

    def count_error(self, kind: str) -> None:
        self.errors[kind] += 1

    def now(self) -> float:
        return time.monotonic()


@pytest.fixture
async def hub():
    made: list[tuple[PeerHub, TaskOwner]] = []

    async def make(**config: Any) -> tuple[PeerHub, Handler]:
        handler = Handler()
        tasks = TaskOwner()
        h = PeerHub(Config(hostname="127.0.0.1", peer_port=0, **config), handler, tasks)
        h.incarnation = f"inc{len(made)}"
        await h.start()
        made.append((h, tasks))
        return h, handler

    yield make
    for h, tasks in made:
        await tasks.close()
        await h.stop()


async def until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("addr", ["tcp://127.0.0.1", "tcp://127.0.0.1:0", "tcp://127.0.0.1:70000", "udp://h:1",
                                  "", "tcp://a b:1", "tcp://" + "h" * 300 + ":1", 17, None])
def test_unusable_addresses_are_named(addr):
    with pytest.raises(PeerAddressError):
        check_peer_address(addr)


@pytest.mark.parametrize("addr", ["tcp://127.0.0.1:17500", "tcp://node-3.dc.example:1", "tcp://[::1]:9"])
def test_usable_addresses_pass(addr):
    assert check_peer_address(addr) == addr


async def test_send_to_an_address_without_port_is_counted_not_raised(hub):
    """Before: zmq raised 'Invalid argument' from send(), inside housekeeping, which ended it."""
    h, handler = await hub()
    assert h.send("tcp://127.0.0.1", wp.Heartbeat(nonce=1)) is False
    h.heartbeat({"tcp://127.0.0.1"}, time.monotonic())  # the housekeeping call: must not raise
    assert handler.errors["peer_address"] == 2 and not h._dealers


async def test_heartbeats_from_many_distinct_src_stay_bounded(hub):
    """Before: each distinct src got a DEALER (a descriptor) for the HeartbeatAck, never closed:
    ~1,100 of them exhausted the descriptors."""
    h, handler = await hub(peer_max_peers=32)
    for i in range(1100):
        h._handle(wp.Heartbeat(src=f"tcp://127.0.0.1:{20000 + i}", nonce=i, incarnation=f"x{i}"))
    assert len(h._dealers) <= 32 and len(h.last_seen) <= 32
    assert not handler.errors["peer_handler"] and h.tasks.critical_alive()


async def test_idle_peers_are_reclaimed(hub):
    h, handler = await hub(peer_idle_s=5.0)
    now = time.monotonic()
    for i in range(10):
        h._handle(wp.Heartbeat(src=f"tcp://127.0.0.1:{21000 + i}", nonce=i))
    active = "tcp://127.0.0.1:21000"
    h.heartbeat({active}, now + 60)
    assert set(h._dealers) == {active} and set(h.last_seen) <= {active}


@pytest.mark.parametrize("src", ["garbage", "tcp://127.0.0.1", "tcp://x:99999", ""])
async def test_unusable_src_is_the_peers_fault_not_a_handler_bug(hub, src):
    """Before: an unusable src reached the handlers, failed there and was logged as a handler
    bug with a traceback."""
    h, handler = await hub()
    h._handle(wp.Heartbeat(src=src, nonce=1))
    h._handle(wp.EngineQuery(src=src, engine_id="P"))
    assert handler.errors["bad_peer_src"] == 2
    assert not handler.errors["peer_handler"] and not handler.got and not h._dealers


async def test_receive_loop_survives_garbage_bad_tokens_handler_bugs_and_oversize(hub):
    h, handler = await hub(auth_token="s3cret", peer_max_message_bytes=64 * 1024)
    handler.raise_on = wp.RankAnnounce
    ctx = zmq.asyncio.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(h.address)
    src = "tcp://127.0.0.1:1"
    try:
        await dealer.send(b"\xc1 not msgpack")
        await dealer.send(wp.EngineQuery(src=src, token="sécret", engine_id="P").encode())  # non-ASCII token
        await dealer.send(wp.RankAnnounce(src=src, token="s3cret", layout={}).encode())  # handler raises
        await dealer.send(b"x" * (1 << 20))  # over MAXMSGSIZE: zmq drops it (and the connection)
        await until(lambda: handler.errors["peer_handler"] == 1 and handler.errors["auth"] == 1)
        # the loop is still alive: a valid message from a fresh connection is handled
        fresh = ctx.socket(zmq.DEALER)
        fresh.setsockopt(zmq.LINGER, 0)
        fresh.connect(h.address)
        await fresh.send(wp.EngineQuery(src=src, token="s3cret", engine_id="P").encode())
        await until(lambda: any(isinstance(m, wp.EngineQuery) for m in handler.got))
        fresh.close()
    finally:
        dealer.close()
    assert handler.errors["protocol"] == 1 and h.tasks.critical_alive()


async def test_a_new_incarnation_runs_the_restart_hooks_and_old_ones_are_dropped(hub):
    h, handler = await hub()
    restarted: list[str] = []
    h.restart_hooks.append(restarted.append)
    peer = "tcp://127.0.0.1:23000"
    h._handle(wp.EngineQuery(src=peer, engine_id="P", incarnation="old"))
    assert not restarted and len(handler.got) == 1
    h._handle(wp.EngineQuery(src=peer, engine_id="P", incarnation="new"))
    assert restarted == [peer] and len(handler.got) == 2
    h._handle(wp.PoolAck(src=peer, pool_key="k", ok=True, incarnation="old"))  # late, from the old process
    assert len(handler.got) == 2 and handler.errors["stale_incarnation"] == 1
    h._handle(wp.PoolAck(src=peer, pool_key="k", ok=True))  # an older release: no incarnation
    assert len(handler.got) == 3 and restarted == [peer]


async def test_messages_are_stamped_with_this_incarnation(hub):
    a, _ = await hub()
    b, got_b = await hub()
    a.send(b.address, wp.EngineQuery(engine_id="P"))
    await until(lambda: bool(got_b.got))
    msg = got_b.got[0]
    assert isinstance(msg, wp.EngineQuery) and msg.src == a.address and msg.incarnation == a.incarnation
    assert b.incarnations[a.address] == a.incarnation and b.current(a.address, 5.0)

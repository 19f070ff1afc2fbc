"""Receive sessions under concurrency (kvd.transfer.sessions): memory is registered on the
registrar thread while the loop opens and revokes peers' sessions. The write fence (a revocation)
must never wait for another session's registration, nor for a new peer's session taking every
region (up to a second per GPU region and session on the H100 host: minutes for a node's pools);
a region must never stay registered anywhere once unregister returns (its memory is unmapped
next), revoked sessions still closing included; a registration that fails leaves nothing behind."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from kvd.transfer.base import BatchResult, TransportError
from kvd.transfer.sessions import SessionedTransport

HOLD_S = 2.0  # how long a blocked transport call holds on before the test lets it go anyway


class Fake:
    """A transport that records its regions; ``block`` makes the next register/close wait."""

    def __init__(self, name: str) -> None:
        self.session_id = name
        self.protocol = "fake"
        self.devices = ""
        self.regions: set[int] = set()
        self.closed = False
        self.block: dict[str, threading.Event] = {}  # "register" / "close" -> released by the test
        self.entered: dict[str, threading.Event] = {"register": threading.Event(), "close": threading.Event()}
        self.fail_register = False

    def _hold(self, what: str) -> None:
        self.entered[what].set()
        gate = self.block.get(what)
        if gate is not None:
            gate.wait(HOLD_S)

    def register(self, addr: int, length: int) -> None:
        assert not self.closed
        self._hold("register")
        if self.fail_register:
            raise TransportError(f"{self.session_id}: register refused")
        self.regions.add(addr)

    def unregister(self, addr: int) -> None:
        self.regions.discard(addr)

    async def write(self, peer_session: str, src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> BatchResult:
        raise AssertionError("no writes here")

    def close(self) -> None:
        self._hold("close")
        self.regions.clear()
        self.closed = True


@pytest.fixture
def made() -> list[Fake]:
    return []


@pytest.fixture
def st(made: list[Fake]) -> SessionedTransport:
    def open_session() -> Fake:
        made.append(Fake(f"session{len(made)}"))
        return made[-1]

    return SessionedTransport(Fake("main"), open_session)  # type: ignore[arg-type]


async def _in_thread(fn, *args) -> asyncio.Future:
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    await asyncio.sleep(0.05)
    return fut


async def _timed(coro) -> float:
    t0 = time.monotonic()
    await coro
    return time.monotonic() - t0


async def test_a_registration_never_holds_up_another_peers_revocation(st, made):
    await st.receive_session("A")
    await st.receive_session("B")
    a, b = made
    a.block["register"] = gate = threading.Event()
    registering = await _in_thread(st.register, 0x1000, 64)
    assert a.entered["register"].wait(1)
    took = await _timed(st.revoke("B", "dead"))
    gate.set()
    await registering
    assert took < HOLD_S / 2, f"revoking B waited {took:.2f} s for a registration with A"
    assert b.closed and 0x1000 in a.regions and 0x1000 in st.main.regions  # type: ignore[attr-defined]


async def test_a_new_peers_session_taking_every_region_never_holds_up_a_revocation(st, made):
    for addr in (0x1000, 0x2000, 0x3000):
        st.register(addr, 64)
    await st.receive_session("B")
    st._open_session = lambda: _blocked_session(made)  # type: ignore[method-assign]
    opening = asyncio.ensure_future(st.receive_session("C"))
    await asyncio.sleep(0.05)
    assert made[-1].entered["register"].wait(1)
    took = await _timed(st.revoke("B", "dead"))
    made[-1].block["register"].set()
    await opening
    assert took < HOLD_S / 2, f"revoking B waited {took:.2f} s for C's session to take the regions"
    assert made[0].closed and made[-1].regions == {0x1000, 0x2000, 0x3000}


def _blocked_session(made: list[Fake]) -> Fake:
    made.append(Fake(f"session{len(made)}"))
    made[-1].block["register"] = threading.Event()
    return made[-1]


async def test_a_region_unregistered_while_a_session_fills_is_not_left_in_it(st, made):
    for addr in (0x1000, 0x2000):
        st.register(addr, 64)
    st._open_session = lambda: _blocked_session(made)  # type: ignore[method-assign]
    opening = asyncio.ensure_future(st.receive_session("C"))
    await asyncio.sleep(0.05)
    assert made[-1].entered["register"].wait(1)
    gone = await _in_thread(st.unregister, 0x2000)
    made[-1].block["register"].set()
    await opening
    await gone
    assert made[-1].regions == {0x1000} and st.main.regions == {0x1000}  # type: ignore[attr-defined]


async def test_unregister_waits_for_a_revoked_session_still_closing(st, made):
    st.register(0x1000, 64)
    await st.receive_session("B")
    (b,) = made
    b.block["close"] = gate = threading.Event()
    revoking = asyncio.ensure_future(st.revoke("B", "dead"))
    await asyncio.sleep(0.05)
    assert b.entered["close"].wait(1)  # withdrawn, closing
    gone = await _in_thread(st.unregister, 0x1000)
    threading.Timer(0.5, gate.set).start()
    await gone
    # The memory is unmapped right after unregister returns: the revoked session must hold it no more.
    assert b.closed and not b.regions, "unregister returned while a revoked session still had the region"
    await revoking


async def test_a_registration_a_session_refuses_leaves_nothing_registered(st, made):
    await st.receive_session("A")
    await st.receive_session("B")
    made[1].fail_register = True
    with pytest.raises(TransportError):
        st.register(0x1000, 64)
    assert not st.main.regions and not made[0].regions and not made[1].regions  # type: ignore[attr-defined]
    made[1].fail_register = False
    await st.receive_session("C")  # a session opened later does not take the region either
    assert not made[2].regions

"""The in-process transport: copies between registered regions, refuses anything outside them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvd.transfer.base import BatchResult, TransportError
from kvd.transfer.memcpy import MemcpyFabric, MemcpyTransport
from kvd.transfer.mooncake import BatchResult as MooncakeBatchResult
from kvd.transfer.mooncake import TransportError as MooncakeTransportError


def _addr(buf: np.ndarray) -> int:
    return int(buf.ctypes.data)


def _ops(*triples: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src, dst, length = zip(*triples, strict=True) if triples else ((), (), ())
    return (np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64), np.array(length, dtype=np.int64))


@pytest.fixture
def pair() -> tuple[MemcpyTransport, MemcpyTransport, np.ndarray, np.ndarray]:
    fabric = MemcpyFabric()
    a, b = MemcpyTransport("a", fabric), MemcpyTransport("b", fabric)
    src = np.arange(256, dtype=np.uint8)
    dst = np.zeros(256, dtype=np.uint8)
    a.register(_addr(src), src.nbytes)
    b.register(_addr(dst), dst.nbytes)
    return a, b, src, dst


def test_old_import_paths_name_the_same_classes() -> None:
    assert MooncakeBatchResult is BatchResult and MooncakeTransportError is TransportError
    import kvd.transport

    assert kvd.transport.TransportError is TransportError and kvd.transport.Transport is not None


async def test_write_copies_every_op_into_the_peer(pair) -> None:
    a, b, src, dst = pair
    s, d = _addr(src), _addr(dst)
    result = await a.write("b", *_ops((s, d + 100, 10), (s + 200, d, 56)))
    assert result == BatchResult(66, 2, result.seconds) and result.seconds >= 0
    assert bytes(dst[100:110]) == bytes(range(10)) and bytes(dst[:56]) == bytes(range(200, 256))
    assert not dst[56:100].any() and not dst[110:].any()
    assert (a.batches, a.bytes_written, a.protocol, a.session_id) == (1, 66, "memcpy", "a")


async def test_empty_batch_is_free(pair) -> None:
    a, *_ = pair
    assert await a.write("b", *_ops()) == BatchResult(0, 0, 0.0)


@pytest.mark.parametrize("where", ["src_before", "src_past_end", "dst_past_end", "dst_unregistered",
                                   "dst_own_region", "negative"])
async def test_an_op_outside_registered_memory_is_refused_and_nothing_moves(pair, where) -> None:
    a, b, src, dst = pair
    s, d = _addr(src), _addr(dst)
    stray = np.zeros(16, dtype=np.uint8)
    bad = {"src_before": (s - 1, d, 4), "src_past_end": (s + 250, d, 7), "dst_past_end": (s, d + 255, 2),
           "dst_unregistered": (s, _addr(stray), 4), "dst_own_region": (s, s + 128, 4),
           "negative": (s, d, -1)}[where]
    with pytest.raises(TransportError, match="outside the regions|negative"):
        await a.write("b", *_ops((s, d, 8), bad))
    assert not dst.any() and not stray.any()  # the good op before the bad one did not run either
    assert a.batches == 0


async def test_unknown_peer_closed_transport_and_unregistered_region_are_refused(pair) -> None:
    a, b, src, dst = pair
    s, d = _addr(src), _addr(dst)
    with pytest.raises(TransportError, match="no transport with session 'c'"):
        await a.write("c", *_ops((s, d, 1)))
    b.unregister(d)
    with pytest.raises(TransportError, match="destination"):
        await a.write("b", *_ops((s, d, 1)))
    b.register(d, dst.nbytes)
    b.close()
    with pytest.raises(TransportError, match="no transport"):
        await a.write("b", *_ops((s, d, 1)))
    a.close()
    with pytest.raises(TransportError, match="closed"):
        await a.write("a", *_ops((s, s + 1, 1)))
    assert not dst.any()


async def test_a_transport_alone_writes_into_its_own_regions() -> None:
    t = MemcpyTransport()
    buf = np.arange(32, dtype=np.uint8)
    t.register(_addr(buf), 32)
    t.register(_addr(buf), 32)  # idempotent, as Mooncake's register
    assert t.regions() == [(_addr(buf), 32)]
    await t.write(t.session_id, *_ops((_addr(buf), _addr(buf) + 16, 16)))
    assert bytes(buf[16:]) == bytes(range(16))
    with pytest.raises(TransportError, match="already on this fabric"):
        MemcpyTransport(t.session_id, t.fabric)


async def test_hold_orders_writes_and_fail_next_fails_one_batch(pair) -> None:
    a, b, src, dst = pair
    s, d = _addr(src), _addr(dst)
    a.hold()
    task = asyncio.create_task(a.write("b", *_ops((s, d, 4))))
    await asyncio.sleep(0.01)
    assert not task.done() and not dst.any()
    a.release()
    assert (await task).nbytes == 4 and bytes(dst[:4]) == bytes(range(4))
    a.fail_next(reason="peer gone")
    with pytest.raises(TransportError, match="peer gone"):
        await a.write("b", *_ops((s + 4, d + 4, 4)))
    assert not dst[4:].any()
    assert (await a.write("b", *_ops((s + 4, d + 4, 4)))).ops == 1
    assert bytes(dst[:8]) == bytes(range(8))


async def test_peer_closing_while_a_write_is_held_fails_the_write(pair) -> None:
    a, b, src, dst = pair
    a.hold()
    task = asyncio.create_task(a.write("b", *_ops((_addr(src), _addr(dst), 4))))
    await asyncio.sleep(0)
    b.close()
    a.release()
    with pytest.raises(TransportError):
        await task
    assert not dst.any()

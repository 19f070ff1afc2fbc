"""SameNodeTransport: per-peer routing, never a silent fallback (CPU here; the GPU half is in
tests/e2e/test_gpu.py and tools/bench_gpu.py)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kvd.transfer import cudaipc
from kvd.transfer.memcpy import MemcpyFabric, MemcpyTransport
from kvd.transfer.router import SameNodeTransport, with_endpoint


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


@pytest.mark.skipif(_has_cuda(), reason="checks the CPU behaviour")
async def test_without_cuda_every_peer_goes_over_the_network_and_says_why() -> None:
    fabric = MemcpyFabric()
    a = SameNodeTransport(MemcpyTransport("a", fabric))
    b = SameNodeTransport(MemcpyTransport("b", fabric))
    assert a.same_node.startswith("off: ")
    src, dst = ctypes.create_string_buffer(b"kvd!" * 64), ctypes.create_string_buffer(256)
    a.register(ctypes.addressof(src), 256)
    b.register(ctypes.addressof(dst), 256)
    res = await a.write("b", np.array([ctypes.addressof(src)]), np.array([ctypes.addressof(dst)]), np.array([256]))
    assert res.nbytes == 256 and dst.raw == src.raw[:256]
    p = a.paths()["b"]
    assert p["path"] == "network" and "same-node path off" in p["reason"]
    assert p["batches"] == {"same_node": 0, "one_pass": 0, "network": 1} and p["bytes"]["network"] == 256
    assert a.regions() == [(ctypes.addressof(src), 256)]
    assert not a.reaches_peer("b") and not a.device_memory([ctypes.addressof(src)])  # no one pass without CUDA
    a.close()
    b.close()


@pytest.mark.skipif(_has_cuda(), reason="checks the CPU behaviour")
async def test_row_copies_without_cuda_go_as_the_same_ops_over_the_network() -> None:
    """A head slice as a row copy (two buffers, four rows of 8-byte rows, 2 bytes at offset 4
    into 2 bytes at offset 0 of 4-byte rows): the network gets exactly its ops; every other
    destination byte keeps its sentinel."""
    from kvd.core.rows import RowBatch, RowCopy

    fabric = MemcpyFabric()
    a = SameNodeTransport(MemcpyTransport("a", fabric))
    b = SameNodeTransport(MemcpyTransport("b", fabric))
    srcs = [ctypes.create_string_buffer(bytes(range(64 * k, 64 * k + 64))) for k in (1, 2)]
    dsts = [ctypes.create_string_buffer(b"\xa5" * 32) for _ in range(2)]
    for s in srcs:
        a.register(ctypes.addressof(s), 64)
    for d in dsts:
        b.register(ctypes.addressof(d), 32)
    rows = RowCopy(np.array([ctypes.addressof(s) for s in srcs]), np.array([ctypes.addressof(d) for d in dsts]),
                   np.array([7, 0, 3, 5]), np.array([1, 6, 0, 4]), 8, 4, 4, 0, 2)
    res = await a.write_rows("b", RowBatch((rows,)))
    assert res.nbytes == 16 and res.ops == 8
    for s, d in zip(srcs, dsts, strict=True):
        want = bytearray(b"\xa5" * 32)
        for sr, dr in ((7, 1), (0, 6), (3, 0), (5, 4)):
            want[dr * 4:dr * 4 + 2] = s.raw[sr * 8 + 4:sr * 8 + 6]
        assert d.raw[:32] == bytes(want)
    assert a.paths()["b"]["batches"]["network"] == 1
    a.close()
    b.close()


def test_with_endpoint_wraps_sessions() -> None:
    fabric = MemcpyFabric()
    opened = with_endpoint(lambda: MemcpyTransport("s1", fabric))()
    assert isinstance(opened, SameNodeTransport) and opened.session_id == "s1"
    opened.close()


def test_inside_checks_every_op_against_sorted_regions() -> None:
    regions = [(1000, 100), (5000, 10)]
    ok = cudaipc.inside(regions, np.array([1000, 1090, 5000]), np.array([100, 10, 10]))
    assert ok
    assert not cudaipc.inside(regions, np.array([1090]), np.array([11]))
    assert not cudaipc.inside(regions, np.array([999]), np.array([1]))
    assert not cudaipc.inside([], np.array([1]), np.array([1]))


def test_peer_translate_maps_into_opened_regions_or_refuses() -> None:
    peer = cudaipc.IpcPeer("x", starts=[1000, 5000], ends=[1100, 5010], offsets=[7, -3])
    got = peer.translate(np.array([1000, 5005]), np.array([100, 5]))
    assert got is not None and got.tolist() == [1007, 5002]
    assert peer.translate(np.array([1050]), np.array([51])) is None
    assert peer.translate(np.array([10]), np.array([1])) is None


def test_no_endpoint_means_network_with_reason() -> None:
    with pytest.raises(cudaipc.TransportError, match="no same-node endpoint"):
        cudaipc.fetch_regions("nobody-here:1")


async def test_a_row_copy_falling_back_from_a_same_node_path_is_counted_and_bounded() -> None:
    """A peer whose path is same-node but whose batch cannot go that way (here: the source is not
    exported device memory) falls back to the network, counted and logged; a row copy that would
    expand to more ops than ``max_fallback_ops`` fails with the reason instead (bounded memory)."""
    from kvd.core.rows import RowBatch, RowCopy
    from kvd.transfer.base import TransportError
    from kvd.transfer.router import PeerPath

    fabric = MemcpyFabric()
    a = SameNodeTransport(MemcpyTransport("a", fabric))
    b = SameNodeTransport(MemcpyTransport("b", fabric))
    src, dst = ctypes.create_string_buffer(bytes(range(64))), ctypes.create_string_buffer(b"\xa5" * 64)
    a.register(ctypes.addressof(src), 64)
    b.register(ctypes.addressof(dst), 64)
    a._paths["b"] = PeerPath("cuda_ipc", "pretend: same machine")  # what a GPU host would decide

    def rows(n: int) -> RowBatch:
        return RowBatch((RowCopy(np.array([ctypes.addressof(src)]), np.array([ctypes.addressof(dst)]),
                                 np.arange(n), np.arange(n), 8, 8, 0, 0, 4),))

    res = await a.write_rows("b", rows(8))
    assert res.nbytes == 32 and all(dst.raw[i * 8:i * 8 + 4] == src.raw[i * 8:i * 8 + 4] for i in range(8))
    assert all(dst.raw[i * 8 + 4:i * 8 + 8] == b"\xa5" * 4 for i in range(8))  # the rest untouched
    p = a.paths()["b"]
    assert p["batches"]["network"] == 1 and sum(p["fallbacks"].values()) == 1
    a.max_fallback_ops = 4
    with pytest.raises(TransportError, match="one pass"):
        await a.write_rows("b", rows(8))
    assert sum(a.paths()["b"]["fallbacks"].values()) == 2 and a.paths()["b"]["batches"]["network"] == 1
    a.close()
    b.close()

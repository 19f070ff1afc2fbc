"""Red team: a pool's layout says one memory kind, the memory handed over is the other.

``PoolLayout.memory_kind`` defaults to "host", and the daemon takes the layout's word for it:
nothing compares it with the memory registered. The kind decides who copies the bytes of small
rooms: inline writes are plain CPU copies (``ctypes.string_at`` on the sender's pool,
``ctypes.memmove`` into the receiver's) whenever both layouts say "host". A GPU engine that
builds its layout without ``memory_kind="gpu"`` (tools/gpu_e2e.py and tools/gpu_two.py do,
and so does the README's engine example) therefore has every room under
``transfer.inline_max_bytes`` read and written by the CPU at CUDA device addresses: a SIGSEGV of
the daemon, every room of every engine with it. (By reading the code: no GPU here; CPU-side this
test shows the claim is trusted, in the harmless direction: a host pool that says "gpu".)

Invariant: bad input gets a clear error, never a dead daemon: a pool's memory kind is the kind of
memory handed over."""

from __future__ import annotations

import dataclasses

import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE

pytestmark = pytest.mark.e2e


def test_a_pools_memory_kind_is_the_memory_handed_over_not_the_layouts_word(daemons) -> None:
    pre, dec = daemons("prefill", *FLAGS), daemons("decode", *FLAGS)
    real = PoolLayout("P", "prefill", 1, 0, **SHAPE)
    claimed = dataclasses.replace(real, memory_kind="gpu")  # host memory, says "gpu"
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    ph, dh = HostPool.create(real), HostPool.create(dl)
    ph.fill(0x21)
    try:
        with pre.client() as pc, dec.client() as dc:
            pid = pc.register_pool(claimed, ph, bootstrap=pre.address)
            described = [x["layout"] for x in pc.status()["daemon"]["pools"]]
            did = dc.register_pool(dl, dh)
            dc.recv(did, 1, pre.address, "P", [3])
            pc.send(pid, 1, [2], True)
            dc.wait(1, timeout=20)
        assert described[0].endswith("host"), f"the daemon took the layout's word: {described}"
        assert pre.status()["daemon"]["inline_writes_total"] > 0  # a host pool's tiny room goes inline
    finally:
        ph.close()
        dh.close()

"""Red team: an engine hands over a pool descriptor far bigger than its layout: a sparse 2 GiB
memfd (ftruncate costs the engine nothing) behind a layout of four 4 KiB buffers.

kvd maps the whole file and prefaults all of it for writing (MADV_POPULATE_WRITE over
``st_size``, kvd.mem.fdpool / kvd.mem.opened.prefault): every page of the 2 GiB gets allocated, in
kvd's memory cgroup, however little of it the layout names. With a sparse 1 TiB memfd that is
the node's memory.

Invariants: nothing is written outside the memory the engine handed over for its buffers (the
bytes past the layout stay unallocated holes); memory stays bounded."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE

pytestmark = pytest.mark.e2e

FILE_BYTES = 2 << 30


def test_a_pool_descriptor_larger_than_its_layout_is_not_populated_past_the_buffers(daemons, tmp_path: Path) -> None:
    dec = daemons("decode", *FLAGS)
    dl = PoolLayout("D", "decode", 1, 0, **SHAPE)
    fd = os.memfd_create("kvd-redteam-sparse", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, FILE_BYTES)
        offsets = [i * dl.buffer_bytes for i in range(dl.num_buffers)]
        with dec.client() as dc:
            dc.register_pool(dl, {"kind": "fd", "fd": fd, "offsets": offsets})
            time.sleep(4.0)  # the prefault thread runs at ~0.6 s per GiB
            allocated = os.fstat(fd).st_blocks * 512
            assert dec.alive()
        assert allocated <= 1 << 20, (f"kvd allocated {allocated >> 20} MiB of a {FILE_BYTES >> 20} MiB descriptor "
                                      f"whose layout names {dl.pool_bytes} bytes")
    finally:
        os.close(fd)

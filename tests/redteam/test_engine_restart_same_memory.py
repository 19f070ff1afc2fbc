"""Red team: a decode engine whose process restarts registers its pool again over the same
shared-memory segment (the same /dev/shm file, handed over as a new descriptor) while a room of
its old connection is still being fenced: the room's only sender (Mallory, an authorized peer)
took the request and never answers the abort, and writes into the announced buffers through
its Mooncake receive session once the new pool is registered (what a stalled sender's queued
slices do when it resumes).

The old pool stays registered (its session open) until the fence ends (an answer to the abort,
or the session revoked after ``timeouts.abort_fence_s``); the new pool is another mapping of the
same pages, so a registration handed back before then gives the new engine memory the old
room's sender can still write into.

Invariant: once ``register_pool`` returns, nothing written for a room of the old connection lands
in the memory it registered (a sentinel the new engine writes after its registration survives a
late write of the old room); the registration completes (within the fence), and the daemon
serves a fresh byte-exact room after."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from kvd import protocol as p
from kvd.transfer.base import TransportError
from kvd.transfer.mooncake import MooncakeTransport
from tests.redteam.mallory import SENTINEL, _fresh_room_works, mallory_scene

pytestmark = pytest.mark.e2e

LATE = 0xEE


def test_a_restarted_engine_gets_its_memory_back_only_after_the_old_rooms_are_fenced(daemons, tmp_path: Path) -> None:
    evil = MooncakeTransport("127.0.0.1", "tcp")
    with mallory_scene(daemons, tmp_path) as s:
        m = s.m
        page_bytes = s.dl.buffer_bytes // s.dl.num_pages
        late = np.full(2 * page_bytes, LATE, dtype=np.uint8)
        evil.register(late.ctypes.data, late.nbytes)
        try:
            old = s.dec.client()
            did = old.register_pool(s.dl, s.dh)
            old.recv(did, 70, m.address, "P", [5, 6])
            _, ann = m.take_room(s.pl)
            old.close()  # the engine process died with its room in flight
            m.expect(p.AbortTransfer)  # the room failed; never answered: the fence waits
            t0 = time.monotonic()
            with s.dec.client(timeout=20) as new:
                new.register_pool(s.dl, s.dh)  # the restarted engine, the same segment
                took = time.monotonic() - t0
                s.dh.fill(SENTINEL)  # the new engine's own pool from here on
                dsts = [base + 5 * page_bytes for base in ann.buffers]
                landed = 0
                for dst in dsts:  # the old room's sender resumes and writes what it had queued
                    try:
                        evil.write_blocking(ann.session_id, [late.ctypes.data], [dst], [late.nbytes])
                        landed += 1
                    except TransportError:
                        pass
                time.sleep(0.5)
                bad = sum(int(np.count_nonzero(s.dh.buffer(b) != SENTINEL)) for b in range(s.dl.num_buffers))
                assert bad == 0, (f"{bad} bytes of the old room landed in the pool registered again "
                                  f"{took:.2f}s after the engine restarted ({landed} late writes accepted)")
                assert took < 15, f"the registration took {took:.1f}s"
            _fresh_room_works(s.pre, s.dec, s.pl, s.dl)
        finally:
            evil.close()

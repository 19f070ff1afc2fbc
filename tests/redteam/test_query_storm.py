"""Red team: many decode rooms wait for one prefill engine that is not ready (restarting, say):
500 rooms of one decode engine name the same directory (mallory), which does not answer, or
answers "not ready" as a directory does while an engine's ranks have not all registered.

Every waiting room's bootstrap task re-asks the directory on its own every second
(kvd.shell.directory.Directory.engine_info), so the decode daemon sends, and the directory
daemon answers, one EngineQuery per waiting room per second: 500/s here, 10,000/s for 10,000
rooms of a busy decode node, all for the same answer. The load on both event loops grows with
the number of rooms waiting, exactly when the prefill side is already in trouble.

Invariant: the event loop stays bounded (the query traffic for one engine does not grow with the
rooms waiting on it)."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from kvd import protocol as p
from tests.redteam.mallory import mallory_scene

pytestmark = pytest.mark.e2e

ROOMS = 500


@pytest.mark.parametrize("answer", [False, True], ids=["silent", "not_ready"])
def test_rooms_waiting_for_one_engine_share_its_queries(daemons, tmp_path: Path, answer: bool) -> None:
    with mallory_scene(daemons, tmp_path) as s, s.dec.client(timeout=30) as dc:
        m = s.m
        counted = {"queries": 0, "counting": False}
        stop = threading.Event()

        def directory() -> None:  # mallory's directory: silent, or "not ready yet" to every query
            while not stop.is_set():
                try:
                    msg = m._got.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(msg, p.EngineQuery):
                    counted["queries"] += counted["counting"]
                    if answer:
                        m.send(p.EngineInfo(src=m.address, token="", engine_id=msg.engine_id, ready=False,
                                            tp_size=0, layouts=[], daemons=[], error="not ready"))

        thread = threading.Thread(target=directory, daemon=True)
        thread.start()
        try:
            did = dc.register_pool(s.dl, s.dh)
            for r in range(ROOMS):
                dc.recv(did, 9000 + r, m.address, "P", [1])
            time.sleep(1.5)
            counted["counting"], t0 = True, time.monotonic()
            time.sleep(3.0)
            rate = counted["queries"] / (time.monotonic() - t0)
        finally:
            stop.set()
            thread.join(5)
        assert rate < 20, f"{rate:.0f} EngineQuery/s for one engine from {ROOMS} waiting rooms"

"""Red team: an authorized peer, the only sender a decode room names, sends an AbortAck for the room
right after taking its request, before any abort (and keeps the room's request, free to write).

The receiver took any AbortAck from the room's sender as the answer to its abort, asked or not:
the link counted as fenced ("acknowledged") from then on, so when the decode engine aborted the
room its pages were released at once, without waiting for an answer to the abort actually sent
or for the sender's session to be revoked, while that sender could still write into them.

Invariants: an AbortAck that answers no abort is counted (``bad_peer_message``) and vouches for
nothing; the aborted room is released only once its sender is fenced off (no answer to the real
abort: its session is revoked after ``timeouts.abort_fence_s``); the pool outside the room keeps
its sentinel."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from kvd import protocol as p
from kvd.engineclient.client import KvdTimeout
from tests.redteam.mallory import SENTINEL, mallory_scene

pytestmark = pytest.mark.e2e


def test_an_abort_ack_ahead_of_the_abort_does_not_release_the_room(daemons, tmp_path: Path) -> None:
    with mallory_scene(daemons, tmp_path) as s, s.dec.client() as dc:
        m = s.m
        did = dc.register_pool(s.dl, s.dh)
        dc.recv(did, 72, m.address, "P", [5, 6])
        req, _ = m.take_room(s.pl)
        m.send(p.AbortAck(src=m.address, token="", room=req.room, transfer_id=req.transfer_id,
                          pool_key=req.pool_key, sender_rank=0))
        time.sleep(0.5)  # handled before the abort below
        errors = s.dec.status()["daemon"]["errors"]
        unasked_acks = errors.get("bad_peer_message", 0)
        dc.abort(did, 72)
        m.expect(p.AbortTransfer)  # and never answered
        with pytest.raises(KvdTimeout):
            dc.wait_released(72, timeout=1.0)
        assert dc.wait_released(72, timeout=15).released
        errors = s.dec.status()["daemon"]["errors"]
        assert errors.get("peer_revoked", 0) >= 1, errors
        assert unasked_acks >= 1, errors
        ps = s.dl.page_size
        outside = [np.concatenate([s.dh.buffer(b)[:5 * ps], s.dh.buffer(b)[7 * ps:]]) for b in range(s.dl.num_buffers)]
        assert all(np.all(x == SENTINEL) for x in outside), "bytes landed outside the room's pages"

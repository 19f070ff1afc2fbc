"""Red team: an authorized sender of a decode room (mallory: directory and prefill daemon of the
room) sends inline ops whose int64 lengths wrap.

kvd.core.inline.unpack_ops sums the lengths with numpy int64, which wraps silently, so ops of
length 2**62 (x1024) plus one honest 16-byte op "add up" to the 16 bytes the message carries.
check_within_indices (numpy path: > 16 ops) then computes ``end = offset + length``, which wraps
to -2**63 (passes ``end > buffer_bytes``), ``(end - 1) // stride`` wraps back to a huge page
number, and the per-op page counts sum (wrapped again) to 1: np.repeat allocates one element
and writes ~2**64 of them -> SIGSEGV of the decode daemon.

Invariants: the room fails with a reason and a counter, the daemon keeps serving (a fresh room is
byte-exact), the pool keeps its sentinel."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.engineclient.replies import RoomFailed
from tests.redteam.mallory import SENTINEL, _fresh_room_works, mallory_scene

pytestmark = pytest.mark.e2e


def _wrapping_ops(buffers: list[int], page_bytes: int, page: int, count_sum: int) -> tuple[bytes, bytes]:
    """1024 ops (last buffer + 2**62, 2**62) and one honest op of 16 bytes into ``page``."""
    last = max(buffers)
    big = 1 << 62
    ops = [(last + big, big)] * 1024 + [(min(buffers) + page * page_bytes, 16)]
    assert count_sum == 1  # each big op touches 2**54 pages (stride 256): 1024 of them wrap to 0
    return b"".join(struct.pack("<qq", a, n) for a, n in ops), b"\xee" * 16


def _negative_count_ops(buffers: list[int], page_bytes: int, page: int) -> tuple[bytes, bytes]:
    """Two ops of length 2**63 - 1 (end wraps negative, a negative page count) and 15 honest
    one-byte ops: the lengths add up (mod 2**64) to 13, the bytes carried."""
    first = min(buffers) + page * page_bytes
    big = (1 << 63) - 1
    ops = [(first + 1, big), (first + 1, big)] + [(first + i, 1) for i in range(15)]
    return b"".join(struct.pack("<qq", a, n) for a, n in ops), b"\xee" * 13


def _attack(daemons, tmp_path: Path, craft) -> None:
    with mallory_scene(daemons, tmp_path) as s:
        pre, dec, pl, dl, dh, m = s.pre, s.dec, s.pl, s.dl, s.dh, s.m
        with dec.client() as dc:
            did = dc.register_pool(dl, dh)
            dc.recv(did, 71, m.address, "P", [5, 6])
            req, ann = m.take_room(pl)
            assert req.inline_max_bytes > 0
            ops, data = craft(list(ann.buffers), dl.page_bytes, 5)
            m.send(p.TransferStatus(src=m.address, token="", room=req.room, transfer_id=req.transfer_id,
                                    pool_key=req.pool_key, sender_rank=0, ok=True, bytes_written=len(data),
                                    final=False, inline_ops=ops, inline_data=data))
            time.sleep(1.5)
            assert dec.alive(), "decode daemon died:\n" + dec.log_tail(15)
            # The room must fail now, with a reason (not linger until its deadline).
            st = dc.poll(71)
            assert st is not None and st.state == "failed", st
            with pytest.raises(RoomFailed):
                dc.wait(71, timeout=5)
        assert dh.buffer(0).tobytes() == bytes([SENTINEL]) * dl.buffer_bytes
        _fresh_room_works(pre, dec, pl, dl)


def test_wrapping_inline_lengths_do_not_crash_the_decode_daemon(daemons, tmp_path: Path) -> None:
    _attack(daemons, tmp_path, lambda b, pb, page: _wrapping_ops(b, pb, page, 1))


def test_negative_page_counts_fail_the_room_with_a_reason(daemons, tmp_path: Path) -> None:
    _attack(daemons, tmp_path, _negative_count_ops)

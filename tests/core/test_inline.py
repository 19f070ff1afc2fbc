"""kvd.core.inline without sockets: packing, unpacking and the room-pages bounds check."""

from __future__ import annotations

import numpy as np
import pytest

from kvd.core.inline import check_within_indices, pack_ops, unpack_ops
from kvd.core.planner import PlanError, WriteOps

BUFFERS = [1 << 20, 1 << 21, 3 << 20]  # three buffers, gaps between them
BUFFER_BYTES = 64 * 256  # 64 pages of 256 bytes
STRIDE = 256
ROOM = np.array([3, 4, 9], dtype=np.int64)


def _check(dst: list[int], length: list[int]) -> None:
    check_within_indices(np.array(dst, np.int64), np.array(length, np.int64), BUFFERS, BUFFER_BYTES, STRIDE,
                         ROOM, "room 1")


def test_pack_and_unpack_round_trip():
    ops = WriteOps(np.array([1, 2]), np.array([1 << 40, 7]), np.array([256, 3]))
    dst, length = unpack_ops(pack_ops(ops), 259, 1 << 16)
    assert dst.tolist() == [1 << 40, 7] and length.tolist() == [256, 3]


@pytest.mark.parametrize(("packed", "data_len", "limit", "match"), [
    (pack_ops(WriteOps(np.array([0]), np.array([0]), np.array([8]))), 8, 0, "did not ask"),
    (pack_ops(WriteOps(np.array([0]), np.array([0]), np.array([8]))), 8, 4, "more than"),
    (b"\x00" * 8, 0, 16, "pairs"),
    (pack_ops(WriteOps(np.array([0]), np.array([0]), np.array([-8]))), 0, 16, "inline ops for 0 bytes"),
    (pack_ops(WriteOps(np.array([0]), np.array([0]), np.array([8]))), 9, 64, "carries 9"),
    (pack_ops(WriteOps(np.array([0, 0]), np.array([0, 8]), np.array([-8, 16]))), 8, 64, "outside 1..8"),
    (pack_ops(WriteOps(np.array([0]), np.array([-64]), np.array([8]))), 8, 64, "negative address"),
    # red team: 1024 lengths of 2**62 plus one of 16 wrap to 16 in int64
    (pack_ops(WriteOps(np.zeros(1025), np.full(1025, 1 << 40), np.array([1 << 62] * 1024 + [16]))), 16, 1 << 20,
     "ops for 16 bytes"),
    (pack_ops(WriteOps(np.zeros(3), np.full(3, 1 << 40), np.array([(1 << 62), (1 << 62), 16]))), 16, 1 << 20,
     "outside 1..16"),
])
def test_unpack_refuses_malformed_ops(packed, data_len, limit, match):
    with pytest.raises(PlanError, match=match):
        unpack_ops(packed, data_len, limit)


def test_ops_inside_the_room_pass_on_every_buffer():
    _check([BUFFERS[0] + 3 * STRIDE, BUFFERS[2] + 9 * STRIDE + 128], [2 * STRIDE, 128])  # pages 3-4, end of 9
    _check([BUFFERS[1] + 4 * STRIDE + 17], [1])
    _check([], [])


@pytest.mark.parametrize(("dst", "length"), [
    ([BUFFERS[0] + 5 * STRIDE], [1]),                   # a page not the room's
    ([BUFFERS[0] + 4 * STRIDE], [STRIDE + 1]),          # runs from page 4 into 5
    ([BUFFERS[0] - 1], [1]),                            # before the first buffer
    ([BUFFERS[0] + BUFFER_BYTES], [1]),                 # in the gap after a buffer
    ([BUFFERS[2] + 63 * STRIDE], [STRIDE + 1]),         # past the end of the last buffer
    ([BUFFERS[0] + 3 * STRIDE, BUFFERS[1]], [8, 8]),    # one good op does not excuse a bad one
    ([BUFFERS[2] + 9 * STRIDE], [1 << 62]),             # an end that would wrap int64
    ([-(1 << 62)], [16]),                               # a negative address
])
def test_ops_leaving_the_room_are_refused(dst, length):
    with pytest.raises(PlanError):
        _check(dst, length)


def test_the_small_and_the_vectorised_checks_agree():
    """Tiny rooms take a Python path; it must refuse and accept exactly what numpy does."""
    rng = np.random.default_rng(3)
    many = np.arange(0, 64, 2, dtype=np.int64)  # more indices than the small path takes
    for _ in range(400):
        n = int(rng.integers(1, 4))
        buf = rng.integers(0, 3, n)
        dst = np.array([BUFFERS[b] for b in buf]) + rng.integers(-300, BUFFER_BYTES + 300, n)
        length = rng.integers(1, 3 * STRIDE, n)
        answers = []
        for indices in (ROOM, many):
            for widen in (False, True):
                d, ln = (np.concatenate([dst] * 12), np.concatenate([length] * 12)) if widen else (dst, length)
                try:
                    check_within_indices(d, ln, BUFFERS, BUFFER_BYTES, STRIDE, indices, "r")
                    answers.append(True)
                except PlanError:
                    answers.append(False)
        assert answers[0] == answers[1] and answers[2] == answers[3], (dst, length, answers)


def test_config_keeps_inline_bytes_under_the_peer_message_cap():
    from kvd.core.config import Config, ConfigError

    assert Config(inline_max_bytes="1MiB").inline_limit == 1 << 20
    assert Config(inline_max_bytes=0).inline_limit == 0
    assert Config().inline_limit == 1 << 20  # auto over tcp
    assert Config(inline_max_bytes="auto", protocol="rdma").inline_limit == 64 << 10
    assert Config().to_dict()["inline_max_bytes"] == "auto"
    with pytest.raises(ConfigError, match="inline_max_bytes"):
        Config(inline_max_bytes="40MiB", peer_max_message_bytes="64MiB")
    with pytest.raises(ConfigError, match="inline_max_bytes"):
        Config(inline_max_bytes=-2)
    assert Config(peer_max_message_bytes="1MiB").inline_limit == 256 << 10  # auto stays under the cap

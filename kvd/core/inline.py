"""Inline writes: a tiny room's bytes ride in the sender's status message, and the receiving
daemon copies them into its own pool.

Why: on the CPU data path one Mooncake TCP op costs ~60 us of sender CPU plus a thread hop,
more than the rest of a 256-byte room together (``tools/bench_control.py``). The bytes of
such a room are smaller than the message that reports it, so sending them along is cheaper
than a transport write, and the receiver, not the peer, decides where they land: every byte
must fall in the pages (or HiSparse tokens) of the room it is addressed to.

Pure: packing, unpacking and the bounds check; the copies are the callers'.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Sequence

import numpy as np

from kvd.core.planner import SMALL, PlanError, WriteOps

_PAIR = np.dtype("<i8")


def pack_ops(ops: WriteOps) -> bytes:
    """(destination, length) pairs of ``ops`` as the wire's little-endian int64 bytes."""
    return np.stack([ops.dst, ops.length], axis=1).astype(_PAIR, copy=False).tobytes()


def unpack_ops(packed: bytes, data_len: int, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Destinations and lengths from a peer's ``inline_ops``; refuses anything malformed or over
    the receiver's advertised limit before a byte is copied."""
    if max_bytes <= 0:
        raise PlanError("inline bytes sent to a receiver that did not ask for them")
    if data_len + len(packed) > max_bytes:
        raise PlanError(f"{data_len} inline bytes and {len(packed)} bytes of ops, more than the "
                        f"{max_bytes} this receiver accepts")
    if len(packed) % (2 * _PAIR.itemsize):
        raise PlanError(f"inline ops of {len(packed)} bytes are not (address, length) int64 pairs")
    if len(packed) // (2 * _PAIR.itemsize) > data_len:
        raise PlanError(f"{len(packed) // 16} inline ops for {data_len} bytes")
    if len(packed) <= 16 * SMALL:  # a tiny room's few ops: Python ints, no numpy calls
        flat = struct.unpack(f"<{len(packed) // 8}q", packed)
        dst, length = np.array(flat[0::2], dtype=np.int64), np.array(flat[1::2], dtype=np.int64)
    else:
        pairs = np.frombuffer(packed, dtype=_PAIR).reshape(-1, 2).astype(np.int64)
        dst, length = pairs[:, 0], pairs[:, 1]
    # Every length in 1..data_len and every address >= 0 before anything adds them up: int64
    # sums and ends of a peer's values must not wrap (red team: a wrapped page count crashed
    # np.repeat).
    if len(length) and (int(length.min()) <= 0 or int(length.max()) > data_len):
        raise PlanError(f"an inline op with a length outside 1..{data_len}")
    if len(dst) and int(dst.min()) < 0:
        raise PlanError("an inline op at a negative address")
    if int(length.sum()) != data_len:
        raise PlanError(f"inline ops name {int(length.sum())} bytes, the message carries {data_len}")
    return dst, length


def check_within_indices(dst: np.ndarray, length: np.ndarray, buffers: Sequence[int], buffer_bytes: int,
                         stride: int, indices: np.ndarray, what: str,
                         rows: tuple[int, Sequence[tuple[int, int]]] | None = None) -> None:
    """Refuse any op whose bytes leave the ``indices`` (pages, or HiSparse tokens, of ``stride``
    bytes) of some buffer: an inline write can only reach the room it is addressed to.

    ``rows`` = (token row bytes, [(start, end), ...]) narrows each op further to the bytes of a
    token row that one sender's head slices cover (heterogeneous TP): a sender then cannot
    write the heads another sender owes the same room."""
    if not len(dst):
        return
    if int(dst.min()) < 0 or int(length.min()) <= 0:
        raise PlanError(f"{what}: an inline write at a negative address or of no bytes")
    if rows is not None:
        _check_rows(dst, length, buffers, rows, what)
    if len(dst) <= SMALL and len(indices) <= SMALL:
        if _small_within(dst.tolist(), length.tolist(), sorted(int(b) for b in buffers), buffer_bytes, stride,
                         set(indices.tolist())):
            return
        raise PlanError(f"{what}: an inline write outside the {len(indices)} pages (or tokens) "
                        "handed over for the room, or outside the pool's buffers")
    bases = np.asarray(buffers, dtype=np.int64)
    order = np.argsort(bases)
    pos = np.searchsorted(bases[order], dst, side="right") - 1
    if int(pos.min()) < 0:
        raise PlanError(f"{what}: an inline write below every buffer of the pool")
    base = bases[order][pos]
    offset = dst - base  # >= 0: dst >= base >= 0
    if bool((length > buffer_bytes - offset).any()):  # written so that nothing can wrap
        raise PlanError(f"{what}: an inline write runs past the end of its buffer")
    end = offset + length
    first, last = offset // stride, (end - 1) // stride
    counts = last - first + 1
    touched = np.repeat(first, counts) + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
    if not bool(np.isin(touched, indices).all()):
        raise PlanError(f"{what}: an inline write outside the {len(indices)} pages (or tokens) "
                        "handed over for the room")


def _check_rows(dst: np.ndarray, length: np.ndarray, buffers: Sequence[int],
                rows: tuple[int, Sequence[tuple[int, int]]], what: str) -> None:
    """Every op inside one token row's allowed byte ranges (buffers are row-aligned)."""
    row_bytes, ranges = rows
    bases = np.sort(np.asarray(buffers, dtype=np.int64))
    pos = np.maximum(np.searchsorted(bases, dst, side="right") - 1, 0)
    start = (dst - bases[pos]) % row_bytes
    end = start + length
    ok = np.zeros(len(dst), dtype=bool)
    for lo, hi in ranges:
        ok |= (start >= lo) & (end <= hi)
    if not bool(ok.all()):
        raise PlanError(f"{what}: an inline write outside the heads this sender owes the room")


def _small_within(dst: list[int], length: list[int], bases: list[int], buffer_bytes: int, stride: int,
                  allowed: set[int]) -> bool:
    """:func:`check_within_indices` on Python ints, for a tiny room's few ops (numpy's per-call
    cost is most of the check there): the same answer."""
    for address, n in zip(dst, length, strict=True):
        i = bisect.bisect_right(bases, address) - 1
        if i < 0:
            return False
        offset = address - bases[i]
        if n <= 0 or offset + n > buffer_bytes:
            return False
        for index in range(offset // stride, (offset + n - 1) // stride + 1):
            if index not in allowed:
                return False
    return True


__all__ = ["check_within_indices", "pack_ops", "unpack_ops"]

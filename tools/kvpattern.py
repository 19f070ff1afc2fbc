"""Deterministic KV byte patterns: what fake prefill ranks write and fake decode ranks check.

Every byte of a prefill pool is a hash of (seed, buffer, token, *global* head, byte), so
the expected content of a receiver's token depends only on which source token it came from
and which global heads the receiver holds: any TP combination, GQA replicas (identical
bytes) and MLA (one latent head everyone holds) are checked by the same code, and a decode
rank needs nothing from the prefill side but the seed. Pure numpy; no sockets, no daemon.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvd.layout import PoolLayout

# splitmix64 constants: cheap, well-mixed, and identical on every platform numpy runs on.
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_CHUNK_ELEMS = 1 << 22  # bound the uint64 temporaries to ~32 MiB each
MAX_REPORTS = 20


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def pattern(seed: int, buffer: int, tokens: np.ndarray, heads: Sequence[int] | np.ndarray,
            head_bytes: int) -> np.ndarray:
    """Bytes ``[len(tokens), len(heads), head_bytes]`` of source ``tokens`` for global ``heads``.

    A well-mixed 64-bit key per (seed, buffer, token, head) and per byte position, combined
    with one xor and one multiply per byte: fast enough for ~100 MB, and a byte shifted to
    another head, token, layer or offset does not match by accident.
    """
    tokens = np.asarray(tokens, dtype=np.uint64)
    heads_u = np.asarray(list(heads), dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = np.uint64((seed * 0x100000001B3 + buffer * 0x9E3779B1 + 1) & 0xFFFFFFFFFFFFFFFF)
        row = _mix(base + tokens[:, None] * _GOLD + (heads_u[None, :] << np.uint64(40)))
        col = _mix(np.arange(head_bytes, dtype=np.uint64) + np.uint64(0x5851F42D4C957F2D))
        out = (row[:, :, None] ^ col[None, None, :]) * _M2
    return (out >> np.uint64(56)).astype(np.uint8)


def fill_prefill(pool: Any, layout: PoolLayout, seed: int) -> None:
    """Write the pattern into every buffer of ``pool`` (a HostPool of ``layout``)."""
    heads = list(layout.head_range())
    step = max(1, _CHUNK_ELEMS // (len(heads) * layout.head_bytes))
    for b in range(layout.num_buffers):
        view = pool.buffer(b)
        for start in range(0, layout.num_tokens, step):
            toks = np.arange(start, min(start + step, layout.num_tokens), dtype=np.uint64)
            view[start:start + len(toks)] = pattern(seed, b, toks, heads, layout.head_bytes)


def fill_canary(pool: Any, value: int) -> None:
    """Set every byte of the pool to ``value``, so any stray write shows."""
    for b in range(pool.layout.num_buffers):
        pool.buffer(b)[...] = value


def expected_receiver_token(b: int, src_token: int, global_heads: Sequence[int], head_bytes: int,
                            seed: int) -> np.ndarray:
    """What a receiver holding ``global_heads`` must have for ``src_token`` in buffer ``b``."""
    return pattern(seed, b, np.array([src_token]), global_heads, head_bytes)[0]


def pages_to_tokens(pages: Sequence[int] | np.ndarray, page_size: int,
                    length: int | None = None) -> np.ndarray:
    """Token indices of ``pages`` (page * page_size + offset), cut to ``length`` tokens."""
    pages = np.asarray(pages, dtype=np.int64).reshape(-1)
    tokens = (pages[:, None] * page_size + np.arange(page_size, dtype=np.int64)[None, :]).reshape(-1)
    return tokens if length is None else tokens[:length]


def verify_decode(pool: Any, layout: PoolLayout, src_tokens: np.ndarray, dst_tokens: np.ndarray,
                  seed: int, canary: int, ignore_tokens: np.ndarray | None = None) -> list[str]:
    """Mismatch descriptions (empty = exact) for a receiver pool of ``layout``.

    ``dst_tokens[i]`` must hold the sender's ``src_tokens[i]`` for exactly this rank's global
    heads; every other token must still hold ``canary``, except ``ignore_tokens`` (rooms that
    failed, whose pages may be partly written).
    """
    src = np.asarray(src_tokens, dtype=np.int64).reshape(-1)
    dst = np.asarray(dst_tokens, dtype=np.int64).reshape(-1)
    problems: list[str] = []
    if len(src) != len(dst):
        return [f"plan error: {len(src)} source tokens but {len(dst)} destination tokens"]
    if len(dst) and (dst.min() < 0 or dst.max() >= layout.num_tokens):
        return [f"plan error: destination tokens outside [0, {layout.num_tokens})"]
    if len(np.unique(dst)) != len(dst):
        return ["plan error: a destination token appears twice"]
    heads = list(layout.head_range())
    untouched = np.ones(layout.num_tokens, dtype=bool)
    untouched[dst] = False
    if ignore_tokens is not None and len(ignore_tokens):
        untouched[np.asarray(ignore_tokens, dtype=np.int64)] = False
    step = max(1, _CHUNK_ELEMS // max(1, len(heads) * layout.head_bytes))
    for b in range(layout.num_buffers):
        view = pool.buffer(b)
        for start in range(0, len(dst), step):
            s, d = src[start:start + step], dst[start:start + step]
            got = view[d]
            bad = got != pattern(seed, b, s.astype(np.uint64), heads, layout.head_bytes)
            if bad.any():
                _describe(problems, b, s, d, heads, got, bad)
        stray = view[untouched] != np.uint8(canary)
        if stray.any():
            tok = np.flatnonzero(untouched)[np.flatnonzero(stray.any(axis=(1, 2)))]
            problems.append(f"buffer {b}: {len(tok)} tokens outside the destination changed "
                            f"(first: token {int(tok[0])}; canary {canary:#04x})")
    if len(problems) > MAX_REPORTS:
        problems = problems[:MAX_REPORTS] + [f"... and {len(problems) - MAX_REPORTS} more"]
    return problems


def _describe(problems: list[str], b: int, src: np.ndarray, dst: np.ndarray, heads: list[int],
              got: np.ndarray, bad: np.ndarray) -> None:
    """Append one line per (token, head) that differs, up to MAX_REPORTS per buffer."""
    rows, cols = np.nonzero(bad.any(axis=2))
    for i, j in list(zip(rows.tolist(), cols.tolist(), strict=True))[:MAX_REPORTS]:
        k = int(np.flatnonzero(bad[i, j])[0])
        problems.append(f"buffer {b} dst token {int(dst[i])} (src token {int(src[i])}) head "
                        f"{heads[j]}: {int(bad[i, j].sum())} bytes differ, first at byte {k} "
                        f"(got {int(got[i, j, k])})")
    if len(rows) > MAX_REPORTS:
        problems.append(f"buffer {b}: {len(rows) - MAX_REPORTS} more (token, head) mismatches")


__all__ = ["MAX_REPORTS", "expected_receiver_token", "fill_canary", "fill_prefill", "pages_to_tokens",
           "pattern", "verify_decode"]

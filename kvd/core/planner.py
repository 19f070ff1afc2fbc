"""Transfer planner: which sender rank sends which heads to which receiver rank, and the write ops.

Two pure parts, both called by the daemon and never doing anything themselves:

* **TP head mapping** (:func:`map_heads`, in :mod:`kvd.core.heads`, re-exported here): the
  head slices every receiver rank gets and the sender ranks it counts and notifies.
* **Direct write ops** (:func:`plan_direct_writes`): ``(src address, dst address, length)``
  triples for one head slice, vectorised with numpy, contiguous token runs merged where the
  slice is a whole token row on both sides; and the bounds check (:func:`check_ops_within`)
  that every op falls inside a registered region before anything is handed to the transport.

No I/O, no torch, no transport: bad indices or shapes raise :class:`PlanError` and the caller
fails the room.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from kvd.core.heads import HeadSlice, PlanError, TpMapping, check_layouts, head_range, map_heads, map_layouts
from kvd.core.layout import PoolLayout

__all__ = [
    "HeadSlice",
    "PlanError",
    "TpMapping",
    "WriteOps",
    "check_distinct",
    "check_ops_within",
    "check_ranges_within",
    "check_token_indices",
    "expand_pages_to_tokens",
    "head_range",
    "map_heads",
    "map_layouts",
    "pages_to_tokens",
    "DirectPlanner",
    "plan_direct_writes",
    "plan_pair_writes",
]

_INT64_MAX = np.iinfo(np.int64).max

#: Up to this many indices or ops, checks and plans run on Python ints: numpy's per-call cost
#: (microseconds per function) dominates tiny rooms (issue 15); the results are the same.
SMALL = 16


# --- write ops ------------------------------------------------------------------------------


def _int64(values: object) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


@dataclass(frozen=True, eq=False)
class WriteOps:
    """Parallel int64 arrays ``src``, ``dst``, ``length``: one remote write per index.

    Ops are grouped by buffer (layer, K/V) in buffer order, which is the order the transport
    submits them in.
    """

    src: np.ndarray
    dst: np.ndarray
    length: np.ndarray

    def __post_init__(self) -> None:
        src, dst, length = _int64(self.src), _int64(self.dst), _int64(self.length)
        if not src.shape == dst.shape == length.shape:
            raise PlanError(f"write ops of unequal lengths: {src.shape[0]} src, "
                            f"{dst.shape[0]} dst, {length.shape[0]} length")
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "dst", dst)
        object.__setattr__(self, "length", length)

    def __len__(self) -> int:
        return int(self.src.shape[0])

    @property
    def total_bytes(self) -> int:
        if self.length.shape[0] <= SMALL:  # numpy's per-call cost dominates a tiny room
            return sum(self.length.tolist())
        return int(self.length.sum())

    @staticmethod
    def empty() -> WriteOps:
        none = np.zeros(0, dtype=np.int64)
        return WriteOps(none, none, none)

    @staticmethod
    def concat(parts: Iterable[WriteOps]) -> WriteOps:
        """Join several plans (e.g. all slices of one sender) into one transport batch."""
        parts = list(parts)
        if not parts:
            return WriteOps.empty()
        if len(parts) == 1:
            return parts[0]
        return WriteOps(np.concatenate([p.src for p in parts]),
                        np.concatenate([p.dst for p in parts]),
                        np.concatenate([p.length for p in parts]))


def coalesce(ops: WriteOps, max_ops: int = 1 << 16) -> WriteOps:
    """Ops that continue one another (source and destination both start where another op's
    end) as one op: a batch of several chunks of a room then copies each buffer's run once,
    not once per chunk (fewer, larger copies; on one GPU each op is a driver call). Ops come
    back in source order; a batch of more than ``max_ops`` is left as it is (sorting it would
    cost more than it saves)."""
    n = len(ops)
    if n < 2 or n > max_ops:
        return ops
    order = np.argsort(ops.src, kind="stable")
    src, dst, length = ops.src[order], ops.dst[order], ops.length[order]
    joins = (src[:-1] + length[:-1] == src[1:]) & (dst[:-1] + length[:-1] == dst[1:])
    if not joins.any():
        return ops
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    return WriteOps(src[starts], dst[starts], np.add.reduceat(length, starts))


def _index_array(values: object, what: str) -> np.ndarray:
    """A 1-D int64 copy-free view of indices; floats and bools are refused, never rounded."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise PlanError(f"{what} must be a 1-D array of indices, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise PlanError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > _INT64_MAX:
        raise PlanError(f"{what}: index {int(arr.max())} is out of range")
    return arr.astype(np.int64, copy=False)


def pages_to_tokens(pages: np.ndarray, page_size: int) -> np.ndarray:
    """Token indices of whole pages: page ``p`` -> ``p*page_size .. p*page_size+page_size-1``."""
    if not isinstance(page_size, int | np.integer) or isinstance(page_size, bool) or page_size < 1:
        raise PlanError(f"page_size must be a positive integer, got {page_size!r}")
    arr = _index_array(pages, "pages")
    if 0 < arr.size <= SMALL:  # a tiny room: the same checks on Python ints (numpy's per-call cost)
        values = arr.tolist()
        low, high = min(values), max(values)
    else:
        low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if low < 0:
        raise PlanError(f"pages: negative page index {low}")
    # guard the multiplication: a huge page index from a peer must not wrap into range
    if high > _INT64_MAX // page_size - 1:
        raise PlanError(f"pages: page index {high} is out of range")
    if page_size == 1:
        return arr
    return (arr[:, None] * page_size + np.arange(page_size, dtype=np.int64)[None, :]).reshape(-1)


def expand_pages_to_tokens(pages: np.ndarray, page_size: int, length: int) -> np.ndarray:
    """HiSparse: the first ``length`` tokens of ``pages`` (the last page cut to the real length).

    The pages must be exactly enough for ``length`` tokens: a trailing empty page means the
    two sides disagree about the request, so it is refused rather than ignored.
    """
    tokens = pages_to_tokens(pages, page_size)
    num_pages = tokens.shape[0] // page_size
    if not isinstance(length, int | np.integer) or isinstance(length, bool) or length < 1:
        raise PlanError(f"token length must be a positive integer, got {length!r}")
    if length > num_pages * page_size:
        raise PlanError(f"{length} tokens do not fit in {num_pages} pages of {page_size}")
    if length <= (num_pages - 1) * page_size:
        raise PlanError(f"{length} tokens leave the last of {num_pages} pages of {page_size} empty")
    return tokens[:length]


def check_token_indices(tokens: np.ndarray, layout: PoolLayout, what: str) -> None:
    """Refuse token indices that are not integers or fall outside the layout's pool."""
    arr = _index_array(tokens, what)
    if arr.size == 0:
        return
    if arr.size <= SMALL:
        values = arr.tolist()
        if min(values) >= 0 and max(values) < layout.num_tokens:
            return
    bad = (arr < 0) | (arr >= layout.num_tokens)
    if bad.any():
        first = int(arr[np.flatnonzero(bad)[0]])
        raise PlanError(f"{what}: {int(bad.sum())} token indices outside [0, {layout.num_tokens}) "
                        f"(first {first}) for {layout.describe()}")


def _buffer_addresses(buffers: Sequence[int], layout: PoolLayout, what: str) -> np.ndarray:
    try:
        arr = _int64([int(b) for b in buffers])
    except (TypeError, ValueError, OverflowError) as exc:
        raise PlanError(f"{what}: buffer addresses must be integers ({exc})") from exc
    if arr.shape[0] != layout.num_buffers:
        raise PlanError(f"{what}: {arr.shape[0]} buffer addresses for a pool of "
                        f"{layout.num_buffers} buffers ({layout.describe()})")
    if arr.size and arr.min() < 0:
        raise PlanError(f"{what}: negative buffer address {int(arr.min())}")
    return arr


def _check_slice(sender: PoolLayout, receiver: PoolLayout, hs: HeadSlice) -> None:
    """The slice must belong to exactly these two ranks and name the same heads on both."""
    if hs.sender_rank != sender.tp_rank or hs.receiver_rank != receiver.tp_rank:
        raise PlanError(f"head slice {hs} is for ranks {hs.sender_rank}->{hs.receiver_rank}, "
                        f"not {sender.tp_rank}->{receiver.tp_rank}")
    for side, layout, offset in (("sender", sender, hs.src_head_offset),
                                 ("receiver", receiver, hs.dst_head_offset)):
        if offset + hs.num_heads > layout.local_heads:
            raise PlanError(f"head slice {hs} exceeds the {layout.local_heads} local heads "
                            f"of the {side}")
        if layout.head_range().start + offset != hs.global_head_start:
            raise PlanError(f"head slice {hs} does not match the {side}'s heads "
                            f"{list(layout.head_range())}")


class DirectPlanner:
    """:func:`plan_direct_writes` for one (sender pool, receiver pool, head slice): the layouts,
    buffer addresses and slice are checked once, then each chunk only plans its tokens. A sender
    keeps one per receiver request, so a room's chunks (and a tiny room's one chunk) skip the
    checks that cannot change (issue 15)."""

    def __init__(self, sender: PoolLayout, sender_buffers: Sequence[int], receiver: PoolLayout,
                 receiver_buffers: Sequence[int], head_slice: HeadSlice) -> None:
        check_layouts(sender, receiver)
        self.sender, self.receiver, self.head_slice = sender, receiver, head_slice
        self.sbufs = _buffer_addresses(sender_buffers, sender, "sender buffers")
        self.rbufs = _buffer_addresses(receiver_buffers, receiver, "receiver buffers")
        self._sbufs_list, self._rbufs_list = self.sbufs.tolist(), self.rbufs.tolist()
        _check_slice(sender, receiver, head_slice)
        self.full_row = head_slice.num_heads == sender.local_heads == receiver.local_heads

    def checked_tokens(self, src_tokens: np.ndarray, dst_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The token indices as int64 arrays, refused unless both fit their pools, pair up,
        and no destination row repeats."""
        src = _index_array(src_tokens, "src tokens")
        dst = _index_array(dst_tokens, "dst tokens")
        if src.shape != dst.shape:
            raise PlanError(f"{src.shape[0]} src tokens but {dst.shape[0]} dst tokens")
        check_token_indices(src, self.sender, "src tokens")
        check_token_indices(dst, self.receiver, "dst tokens")
        if dst.size > 1 and _repeats(dst):
            # two writes to one row would leave whichever lands last: never a valid request
            raise PlanError("dst tokens repeat a token index")
        return src, dst

    def plan_pages(self, src_pages: np.ndarray, dst_pages: np.ndarray) -> WriteOps:
        """:meth:`plan` for whole rows of whole pages (equal page sizes), on page indices: a page
        is ``page_size`` consecutive rows on both sides, so runs of pages are runs of tokens and
        the same ops come out of 1/page_size the work (a long chunk on one machine: planning
        costs as much as the copy otherwise)."""
        if not self.full_row:
            raise PlanError("page-level ops need whole rows")
        src, dst = self.checked_pages(src_pages, dst_pages)
        if src.size == 0:
            return WriteOps.empty()
        breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
        starts = np.concatenate((np.zeros(1, dtype=np.int64), breaks))
        run_pages = np.diff(np.append(starts, src.shape[0]))
        src_off = src[starts] * self.sender.page_bytes
        dst_off = dst[starts] * self.receiver.page_bytes
        lengths = run_pages * self.sender.page_bytes
        return WriteOps((self.sbufs[:, None] + src_off[None, :]).reshape(-1),
                        (self.rbufs[:, None] + dst_off[None, :]).reshape(-1),
                        np.tile(lengths, self.sbufs.shape[0]))

    def checked_pages(self, src_pages: np.ndarray, dst_pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`checked_tokens` for page indices (equal page sizes on both sides)."""
        if self.sender.page_size != self.receiver.page_size:
            raise PlanError("page-level planning needs equal page sizes")
        src = _index_array(src_pages, "src pages")
        dst = _index_array(dst_pages, "dst pages")
        if src.shape != dst.shape:
            raise PlanError(f"{src.shape[0]} src pages but {dst.shape[0]} dst pages")
        for arr, layout, what in ((src, self.sender, "src pages"), (dst, self.receiver, "dst pages")):
            if arr.size:
                low, high = int(arr.min()), int(arr.max())
                if low < 0 or high >= layout.num_pages:
                    raise PlanError(f"{what}: page {low if low < 0 else high} outside [0, {layout.num_pages})")
        if dst.size > 1 and _repeats(dst):
            raise PlanError("dst pages repeat a page index")
        return src, dst

    def plan(self, src_tokens: np.ndarray, dst_tokens: np.ndarray) -> WriteOps:
        """Write ops moving the head slice of ``src_tokens[i]`` into ``dst_tokens[i]``, every buffer."""
        sender, receiver, head_slice = self.sender, self.receiver, self.head_slice
        src, dst = self.checked_tokens(src_tokens, dst_tokens)
        if src.size == 0:
            return WriteOps.empty()
        head_bytes = sender.head_bytes
        src_row, dst_row = sender.token_bytes, receiver.token_bytes
        sbufs, rbufs = self.sbufs, self.rbufs
        if self.full_row and src.size <= SMALL:
            return _small_full_row_writes(src.tolist(), dst.tolist(), self._sbufs_list, self._rbufs_list,
                                          src_row, dst_row)
        if self.full_row:
            breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
            starts = np.concatenate((np.zeros(1, dtype=np.int64), breaks))
            run_tokens = np.diff(np.append(starts, src.shape[0]))
            src_off = src[starts] * src_row
            dst_off = dst[starts] * dst_row
            lengths = run_tokens * src_row
        else:
            src_off = src * src_row + head_slice.src_head_offset * head_bytes
            dst_off = dst * dst_row + head_slice.dst_head_offset * head_bytes
            lengths = np.full(src.shape[0], head_slice.num_heads * head_bytes, dtype=np.int64)
        return WriteOps((sbufs[:, None] + src_off[None, :]).reshape(-1),
                        (rbufs[:, None] + dst_off[None, :]).reshape(-1),
                        np.tile(lengths, sbufs.shape[0]))


def check_distinct(indices: np.ndarray, what: str, bound: int = 0) -> None:
    """Refuse indices of which one occurs twice: two writes into one page (or HiSparse token) of
    a room leave whichever lands last, never a valid request. The planners check each chunk's;
    a room's destination indices, all known at once, are checked whole here. ``bound``: the
    indices lie in ``[0, bound)`` (a pool's capacity), which makes the check linear."""
    if indices.size > 1 and _repeats(indices, bound):
        if indices.size <= SMALL:
            first = next(x for i, x in enumerate(indices.tolist()) if x in indices.tolist()[:i])
        elif _maskable(indices, bound):  # linear too: each index's last position, and one that is not its own
            owner = np.empty(bound, dtype=np.int32)  # only what the indices touch is ever written or read
            positions = np.arange(indices.size, dtype=np.int32)
            owner[indices] = positions
            first = int(indices[owner[indices] != positions][0])
        else:
            ordered = np.sort(indices)
            first = int(ordered[1:][ordered[1:] == ordered[:-1]][0])
        raise PlanError(f"{what} repeat index {first} (two writes into one row: each must be the room's own)")


#: A mask over ``bound`` indices is used while it is at most this many times their number (+ 1 Mi).
_MASK_OVER = 4
#: Fewer indices than this are sorted (a sort of 64 Ki takes a few milliseconds).
_MASK_MIN = 1 << 16


def _maskable(indices: np.ndarray, bound: int) -> bool:
    """Whether ``indices`` lie in ``[0, bound)`` with ``bound`` small enough to mark them in a mask."""
    return indices.size >= _MASK_MIN and 0 < bound <= _MASK_OVER * indices.size + (1 << 20) \
        and int(indices.min()) >= 0 \
        and int(indices.max()) < bound


def _repeats(indices: np.ndarray, bound: int = 0) -> bool:
    """Whether any index occurs twice (a sort, not ``np.unique``: that one imports ``numpy.ma``
    on first use, 25 ms inside a daemon's first room). Indices known to lie in ``[0, bound)``
    are marked in a mask instead, in one pass: a sort of a shuffled room of millions of pages
    held the daemon's event loop for a third of a second a request."""
    if indices.size <= SMALL:
        return len(set(indices.tolist())) != indices.size
    if indices.size > 1 and bool((np.diff(indices) > 0).all()):
        return False  # ascending (the common case: one run of pages): no sort needed
    if _maskable(indices, bound):
        seen = np.zeros(bound, dtype=np.bool_)
        seen[indices] = True
        return int(np.count_nonzero(seen)) != indices.size
    ordered = np.sort(indices)
    return bool((ordered[1:] == ordered[:-1]).any())


def plan_direct_writes(sender: PoolLayout, sender_buffers: Sequence[int], src_tokens: np.ndarray,
                       receiver: PoolLayout, receiver_buffers: Sequence[int], dst_tokens: np.ndarray,
                       head_slice: HeadSlice) -> WriteOps:
    """Write ops moving one head slice of ``src_tokens[i]`` into ``dst_tokens[i]``, every buffer.

    Buffers are ``[K_0..K_{L-1}, V_0..V_{L-1}]`` (MLA ``[C_0..C_{L-1}]``) base addresses, each
    token-major. Where the slice is the whole token row on both sides (same TP, MLA, GQA
    replicas) runs of consecutive src *and* dst tokens become one op per buffer; otherwise the
    slice is strided and each token is its own op.
    """
    return DirectPlanner(sender, sender_buffers, receiver, receiver_buffers, head_slice).plan(src_tokens,
                                                                                               dst_tokens)


def _small_full_row_writes(src: list[int], dst: list[int], sbufs: list[int], rbufs: list[int],
                           src_row: int, dst_row: int) -> WriteOps:
    """:func:`plan_direct_writes`' whole-row case on Python ints (a few tokens): same ops."""
    runs: list[list[int]] = [[src[0], dst[0], 1]]
    for s, d in zip(src[1:], dst[1:], strict=True):
        last = runs[-1]
        if s == last[0] + last[2] and d == last[1] + last[2]:
            last[2] += 1
        else:
            runs.append([s, d, 1])
    return WriteOps(np.array([b + s * src_row for b in sbufs for s, _, _ in runs], dtype=np.int64),
                    np.array([b + d * dst_row for b in rbufs for _, d, _ in runs], dtype=np.int64),
                    np.array([n * src_row for _ in sbufs for _, _, n in runs], dtype=np.int64))


def plan_pair_writes(mapping: TpMapping,
                     sender: PoolLayout, sender_buffers: Sequence[int], src_tokens: np.ndarray,
                     receiver: PoolLayout, receiver_buffers: Sequence[int], dst_tokens: np.ndarray,
                     ) -> WriteOps:
    """Every write one sender rank owes one receiver rank (empty for a dummy pair)."""
    if (mapping.total_kv_heads, mapping.sender_tp, mapping.receiver_tp) != (
            sender.total_kv_heads, sender.tp_size, receiver.tp_size):
        raise PlanError(f"mapping {mapping} does not fit sender [{sender.describe()}] "
                        f"and receiver [{receiver.describe()}]")
    return WriteOps.concat(
        plan_direct_writes(sender, sender_buffers, src_tokens,
                           receiver, receiver_buffers, dst_tokens, hs)
        for hs in mapping.slices_between(sender.tp_rank, receiver.tp_rank))


# --- bounds ---------------------------------------------------------------------------------


class RegionIndex:
    """``(base, length)`` regions prepared once for many range checks: a pool's buffers are
    checked against on every batch, so the sort and running max are made once per pool."""

    __slots__ = ("bases", "count", "furthest_end", "pairs", "problem")

    def __init__(self, regions: Sequence[tuple[int, int]]) -> None:
        self.pairs = [(int(b), int(n)) for b, n in regions]  # the small-batch test's form
        reg = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
        self.count = int(reg.shape[0])
        self.problem = ""
        if self.count and (reg[:, 0].min() < 0 or reg[:, 1].min() < 1):
            self.problem = f"invalid registered region in {reg.tolist()}"
        order = np.argsort(reg[:, 0], kind="stable")
        self.bases = reg[order, 0]
        self.furthest_end = np.maximum.accumulate(self.bases + reg[order, 1]) if self.count else self.bases

    def covers(self, addr: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Per range, whether ``[addr, addr+size)`` lies inside a single region."""
        if self.count == 0:
            return np.zeros(addr.shape, dtype=bool)
        idx = np.searchsorted(self.bases, addr, side="right") - 1
        return (idx >= 0) & (self.furthest_end[np.maximum(idx, 0)] >= addr + size)


def _inside_small(addrs: list[int], sizes: list[int], regs: Sequence[tuple[int, int]]) -> bool:
    """Whether every ``[addr, addr+size)`` lies inside one region (plain loops: a tiny room's
    check, where generator expressions cost more than the comparisons)."""
    for b, n in regs:
        if b < 0 or n < 1:
            return False
    for a, z in zip(addrs, sizes, strict=True):
        for b, n in regs:
            if b <= a and a + z <= b + n:
                break
        else:
            return False
    return True


def check_ranges_within(addresses: np.ndarray, lengths: np.ndarray,
                        regions: Sequence[tuple[int, int]] | RegionIndex, what: str) -> None:
    """Refuse any ``[address, address+length)`` not inside a single ``(base, length)`` region.

    Vectorised: regions are sorted by base and, for each range, the regions starting at or
    below it are summarised by their furthest end (a running max), so overlapping
    registrations are handled and one search per range suffices.
    """
    addr, size = _int64(addresses), _int64(lengths)
    if addr.shape != size.shape:
        raise PlanError(f"{what}: {addr.shape[0]} addresses but {size.shape[0]} lengths")
    if addr.size == 0:
        return
    if addr.size <= SMALL and len(regions.pairs if isinstance(regions, RegionIndex) else regions) <= SMALL:
        # The same test on Python ints (numpy's per-call cost dominates a tiny room): every
        # length positive and some region with base <= address reaching past the end.
        regs = regions.pairs if isinstance(regions, RegionIndex) else [(int(b), int(n)) for b, n in regions]
        sizes = size.tolist()
        if min(sizes) < 1:
            raise PlanError(f"{what}: a write of {min(sizes)} bytes")
        if regs and _inside_small(addr.tolist(), sizes, regs):
            return
    elif size.min() < 1:
        raise PlanError(f"{what}: a write of {int(size.min())} bytes")
    if not isinstance(regions, RegionIndex):
        regions = RegionIndex(regions)
    if regions.count == 0:
        raise PlanError(f"{what}: {addr.shape[0]} writes but no registered region")
    if regions.problem:
        raise PlanError(f"{what}: {regions.problem}")
    ok = regions.covers(addr, size)
    if not ok.all():
        first = int(np.flatnonzero(~ok)[0])
        raise PlanError(f"{what}: {int((~ok).sum())} of {addr.shape[0]} writes fall outside the "
                        f"registered regions (first [{int(addr[first]):#x}, "
                        f"+{int(size[first])}))")


def check_ops_within(ops: WriteOps, regions: Sequence[tuple[int, int]] | RegionIndex, what: str,
                     *, side: str = "dst") -> None:
    """Refuse ops whose ``side`` ("dst", or "src") range leaves the registered regions."""
    if side not in ("src", "dst"):
        raise ValueError(f"side must be 'src' or 'dst', got {side!r}")
    check_ranges_within(ops.dst if side == "dst" else ops.src, ops.length, regions, what)

"""TP head mapping: which sender rank sends which heads to which receiver rank.

From the model's *total* KV head count and both TP sizes: the head slices every receiver rank
gets, the sender ranks whose completion it must count, and the sender ranks it must notify (the
required ones plus "dummy" ones that have nothing to write but must still hear of the room so they
can finish). Each (receiver rank, head) is covered by exactly one sender: GQA replicas do not all
send the same bytes. Pure: bad sizes raise :class:`PlanError`. The write ops of a slice are in
:mod:`kvd.core.planner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from kvd.core.layout import MAX_TP_SIZE, LayoutError, PoolLayout, check_compatible

__all__ = ["HeadSlice", "PlanError", "TpMapping", "check_layouts", "head_range", "map_heads", "map_layouts"]


class PlanError(ValueError):
    """Bad indices, an op outside a registered region, or a request that cannot be mapped."""


# --- head ownership -------------------------------------------------------------------------


def _check_tp(total_kv_heads: int, tp: int, side: str) -> None:
    for name, value in (("total_kv_heads", total_kv_heads), (f"{side} tp", tp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if tp > MAX_TP_SIZE:
        raise PlanError(f"{side} tp {tp} is over the {MAX_TP_SIZE} supported")
    if total_kv_heads >= tp and total_kv_heads % tp:
        raise PlanError(f"total_kv_heads {total_kv_heads} is not divisible by {side} tp {tp}")
    if total_kv_heads < tp and tp % total_kv_heads:
        raise PlanError(f"{side} tp {tp} is not a multiple of total_kv_heads {total_kv_heads}")


def head_range(total_kv_heads: int, tp_size: int, rank: int) -> range:
    """Global KV heads rank ``rank`` of a TP group holds (same rule as PoolLayout.head_range).

    Kept here as a plain function because the mapping is computed for peers whose full
    layout is not at hand; tests pin it to PoolLayout.head_range.
    """
    local = max(1, total_kv_heads // max(1, tp_size))
    replication = max(1, tp_size // max(1, total_kv_heads))
    first = (rank // replication) * local
    return range(first, first + local)


@dataclass(frozen=True)
class HeadSlice:
    """A run of global heads one sender rank writes into one receiver rank, per token.

    The offsets are head indices within each side's local heads, so the byte offset inside a
    token row is ``offset * head_bytes`` on either side.
    """

    sender_rank: int
    receiver_rank: int
    global_head_start: int
    src_head_offset: int
    dst_head_offset: int
    num_heads: int

    def __post_init__(self) -> None:
        if min(self.sender_rank, self.receiver_rank, self.global_head_start,
               self.src_head_offset, self.dst_head_offset) < 0 or self.num_heads < 1:
            raise PlanError(f"invalid head slice {self}")

    @property
    def heads(self) -> range:
        """The global heads the slice carries."""
        return range(self.global_head_start, self.global_head_start + self.num_heads)


def _sender_group(sender_tp: int, receiver_tp: int, receiver_rank: int) -> range:
    """Sender ranks receiver ``receiver_rank`` notifies; chosen so load spreads over senders.

    With more receivers than senders, consecutive receivers share one sender; with more
    senders, each receiver takes a disjoint block of ``sender_tp // receiver_tp`` senders, so
    every sender rank is in exactly one receiver's group and hears of every room.
    """
    if sender_tp <= receiver_tp:
        sender = receiver_rank // max(1, receiver_tp // max(1, sender_tp))
        return range(sender, sender + 1)
    k = max(1, sender_tp // max(1, receiver_tp))
    return range(receiver_rank * k, (receiver_rank + 1) * k)


def _uneven_groups(total: int, sender_tp: int, receiver_tp: int) -> tuple[range | tuple[int, ...], ...]:
    """Groups when neither TP size divides the other (6 heads, TP 2 -> 3, or 3 -> 2).

    Each receiver notifies the holders of its heads: per head, the receivers that need it take
    its holders in turn (so GQA replicas share the load). A sender that holds no head anyone
    takes this way still hears of every room: it joins, as a dummy, the group of the first
    receiver that needs one of its heads (every head is needed by some receiver).
    """
    needing: dict[int, list[int]] = {}
    for r in range(receiver_tp):
        for head in head_range(total, receiver_tp, r):
            needing.setdefault(head, []).append(r)
    holders: dict[int, list[int]] = {}
    for s in range(sender_tp):
        for head in head_range(total, sender_tp, s):
            holders.setdefault(head, []).append(s)
    groups: list[set[int]] = [set() for _ in range(receiver_tp)]
    for head, receivers in needing.items():
        for i, r in enumerate(receivers):
            groups[r].add(holders[head][i % len(holders[head])])
    named = set().union(*groups)
    for s in range(sender_tp):
        if s not in named:
            groups[needing[head_range(total, sender_tp, s).start][0]].add(s)
    return tuple(tuple(sorted(g)) for g in groups)


def _receiver_slices(total: int, sender_tp: int, receiver_tp: int, receiver_rank: int,
                     group: range | tuple[int, ...]) -> tuple[HeadSlice, ...]:
    """Slices for one receiver: each needed head from the lowest group member holding it."""
    dst_heads = head_range(total, receiver_tp, receiver_rank)
    slices: list[HeadSlice] = []
    for head in dst_heads:
        owner = next((s for s in group if head in head_range(total, sender_tp, s)), None)
        if owner is None:  # pragma: no cover - the group provably holds every needed head
            raise PlanError(f"no sender among ranks {list(group)} holds head {head} "
                            f"for receiver rank {receiver_rank}")
        src_off = head - head_range(total, sender_tp, owner).start
        dst_off = head - dst_heads.start
        last = slices[-1] if slices else None
        if (last is not None and last.sender_rank == owner
                and last.src_head_offset + last.num_heads == src_off
                and last.dst_head_offset + last.num_heads == dst_off):
            slices[-1] = HeadSlice(owner, receiver_rank, last.global_head_start,
                                   last.src_head_offset, last.dst_head_offset, last.num_heads + 1)
        else:
            slices.append(HeadSlice(owner, receiver_rank, head, src_off, dst_off, 1))
    return tuple(slices)


@dataclass(frozen=True)
class TpMapping:
    """Head mapping between a sender TP group and a receiver TP group of one model.

    Computed once per (total heads, sender tp, receiver tp); every query is a table look-up.
    """

    total_kv_heads: int
    sender_tp: int
    receiver_tp: int
    _slices: tuple[tuple[HeadSlice, ...], ...] = field(init=False, repr=False, compare=False)
    _groups: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _receivers: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        total, stp, rtp = self.total_kv_heads, self.sender_tp, self.receiver_tp
        _check_tp(total, stp, "sender")
        _check_tp(total, rtp, "receiver")
        if max(stp, rtp) % min(stp, rtp) == 0:
            groups: tuple[range | tuple[int, ...], ...] = tuple(_sender_group(stp, rtp, r) for r in range(rtp))
        else:  # each side's heads still divide evenly (checked above): map them head by head
            groups = _uneven_groups(total, stp, rtp)
        slices = tuple(_receiver_slices(total, stp, rtp, r, groups[r]) for r in range(rtp))
        receivers: list[list[int]] = [[] for _ in range(stp)]
        for r, group in enumerate(groups):
            for s in group:
                receivers[s].append(r)
        object.__setattr__(self, "_slices", slices)
        object.__setattr__(self, "_groups", tuple(tuple(g) for g in groups))
        object.__setattr__(self, "_receivers", tuple(tuple(r) for r in receivers))

    def _receiver(self, rank: int) -> int:
        if not 0 <= rank < self.receiver_tp:
            raise PlanError(f"receiver rank {rank} outside [0, {self.receiver_tp})")
        return rank

    def _sender(self, rank: int) -> int:
        if not 0 <= rank < self.sender_tp:
            raise PlanError(f"sender rank {rank} outside [0, {self.sender_tp})")
        return rank

    def slices_for(self, receiver_rank: int) -> tuple[HeadSlice, ...]:
        """Every slice receiver rank gets; together they cover its heads exactly once."""
        return self._slices[self._receiver(receiver_rank)]

    def required_senders(self, receiver_rank: int) -> tuple[int, ...]:
        """Sender ranks that write to the receiver: it is done when each has reported success."""
        return tuple(sorted({s.sender_rank for s in self.slices_for(receiver_rank)}))

    def notified_senders(self, receiver_rank: int) -> tuple[int, ...]:
        """Sender ranks the receiver sends its per-room request to (required + dummy ones)."""
        return self._groups[self._receiver(receiver_rank)]

    def dummy_senders(self, receiver_rank: int) -> tuple[int, ...]:
        """Notified senders with nothing to write; they only need to finish the room."""
        required = set(self.required_senders(receiver_rank))
        return tuple(s for s in self.notified_senders(receiver_rank) if s not in required)

    def receivers_of(self, sender_rank: int) -> tuple[int, ...]:
        """Receiver ranks that will send this sender a request for every room."""
        return self._receivers[self._sender(sender_rank)]

    def slices_between(self, sender_rank: int, receiver_rank: int) -> tuple[HeadSlice, ...]:
        """What the sender writes into the receiver; empty for a dummy or unrelated pair."""
        self._sender(sender_rank)
        return tuple(s for s in self.slices_for(receiver_rank) if s.sender_rank == sender_rank)


@lru_cache(maxsize=256, typed=True)
def map_heads(total_kv_heads: int, sender_tp: int, receiver_tp: int) -> TpMapping:
    """The (cached) head mapping; MLA is ``total_kv_heads=1``: one sender per receiver."""
    return TpMapping(total_kv_heads, sender_tp, receiver_tp)


def map_layouts(sender: PoolLayout, receiver: PoolLayout) -> TpMapping:
    """Mapping for two engines' layouts, after checking they can be mapped at all."""
    check_layouts(sender, receiver)
    return map_heads(sender.total_kv_heads, sender.tp_size, receiver.tp_size)


def check_layouts(sender: PoolLayout, receiver: PoolLayout) -> None:
    try:
        check_compatible(sender, receiver)
    except LayoutError as exc:
        raise PlanError(str(exc)) from exc

"""KV pool layouts: what an engine rank holds and where each byte of it lives.

A pool is a list of buffers, ``[K_0 .. K_{L-1}, V_0 .. V_{L-1}]`` (MLA: one latent
buffer per layer, ``[C_0 .. C_{L-1}]``). Every buffer is token-major:
``[num_pages][page_size][local_heads][head_dim]``, so one token's heads are contiguous
and a page is ``page_size`` consecutive token rows.

Head ownership always comes from the model's *total* KV head count: with
``total >= tp`` rank ``t`` holds heads ``[t*total/tp, (t+1)*total/tp)``; with GQA
replication (``total < tp``) it holds the single head ``t // (tp/total)``.
Pure: no I/O, no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

ROLES = ("prefill", "decode")
#: Largest TP size a layout may name: the head mapping has a table entry per rank, built on the
#: event loop and cached (256 of them: ~80 MB at this size); a peer's announce naming 2**40 ranks
#: must be refused, not worked out.
MAX_TP_SIZE = 1024
#: Longest engine id (a log field and map key everywhere; peers send layouts too).
MAX_ENGINE_ID = 256
MEMORY_KINDS = ("host", "gpu")


def _short(value: Any) -> str:
    """A value a sender put in a layout, for a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class LayoutError(ValueError):
    """A pool layout is invalid, or two layouts cannot be mapped onto each other."""


#: Layouts parsed by :meth:`PoolLayout.from_dict`, by their map's items (bounded, oldest out).
_FROM_DICT: dict[tuple[Any, ...], PoolLayout] = {}
_FROM_DICT_KEPT = 1024


@dataclass(frozen=True)
class PoolLayout:
    """Shape of one engine rank's KV pool (the same for every rank of an engine but tp_rank).

    Frozen, so the derived sizes are computed once per layout (``cached_property``): planners
    read them for every chunk on the event loop."""

    engine_id: str
    role: str
    tp_size: int
    tp_rank: int
    num_layers: int
    total_kv_heads: int
    head_dim: int
    dtype: str
    page_size: int
    num_pages: int
    is_mla: bool = False
    memory_kind: str = "host"
    hisparse: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise LayoutError(f"invalid pool layout {self.describe()}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        out: list[str] = []
        if not isinstance(self.engine_id, str) or not self.engine_id or len(self.engine_id) > MAX_ENGINE_ID:
            out.append(f"engine_id must be a non-empty string of at most {MAX_ENGINE_ID} characters")
        if self.role not in ROLES:
            out.append(f"role must be one of {ROLES}, got {_short(self.role)}")
        if self.memory_kind not in MEMORY_KINDS:
            out.append(f"memory_kind must be one of {MEMORY_KINDS}, got {_short(self.memory_kind)}")
        if self.dtype not in DTYPE_SIZES:
            out.append(f"dtype must be one of {sorted(DTYPE_SIZES)}, got {_short(self.dtype)}")
        for name in ("tp_size", "num_layers", "total_kv_heads", "head_dim", "page_size", "num_pages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{name} must be a positive integer, got {_short(value)}")
        if not isinstance(self.tp_rank, int) or isinstance(self.tp_rank, bool):
            out.append(f"tp_rank must be an integer, got {_short(self.tp_rank)}")
        for name in ("is_mla", "hisparse"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be a boolean, got {type(getattr(self, name)).__name__}")
        if out:
            return out
        if self.tp_size > MAX_TP_SIZE:
            out.append(f"tp_size {self.tp_size} is over the {MAX_TP_SIZE} supported")
        if not 0 <= self.tp_rank < self.tp_size:
            out.append(f"tp_rank {self.tp_rank} outside [0, {self.tp_size})")
        if self.is_mla and self.total_kv_heads != 1:
            out.append("an MLA pool holds one latent head: total_kv_heads must be 1")
        heads, tp = self.total_kv_heads, self.tp_size
        if heads >= tp and heads % tp:
            out.append(f"total_kv_heads {heads} is not divisible by tp_size {tp}")
        if heads < tp and tp % heads:
            out.append(f"tp_size {tp} is not a multiple of total_kv_heads {heads} (GQA replication)")
        if self.hisparse and self.page_size != 1:
            out.append(f"a HiSparse host pool has page_size 1, got {self.page_size}")
        if self.hisparse and self.memory_kind != "host":
            out.append("a HiSparse pool lives in host memory")
        return out

    # --- head ownership -------------------------------------------------------------
    @cached_property
    def local_heads(self) -> int:
        """KV heads held by one rank (1 under GQA replication and for MLA)."""
        return max(1, self.total_kv_heads // self.tp_size)

    @cached_property
    def replication(self) -> int:
        """How many ranks hold a copy of each head (1 unless total heads < TP)."""
        return max(1, self.tp_size // self.total_kv_heads)

    def head_range(self, rank: int | None = None) -> range:
        """Global head indices held by ``rank`` (default: this layout's rank)."""
        rank = self.tp_rank if rank is None else rank
        first = (rank // self.replication) * self.local_heads
        return range(first, first + self.local_heads)

    # --- bytes ----------------------------------------------------------------------
    @cached_property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @cached_property
    def head_bytes(self) -> int:
        return self.head_dim * self.itemsize

    @cached_property
    def token_bytes(self) -> int:
        """Bytes of one token row in one buffer (all local heads)."""
        return self.local_heads * self.head_bytes

    @cached_property
    def page_bytes(self) -> int:
        return self.token_bytes * self.page_size

    @cached_property
    def buffer_bytes(self) -> int:
        return self.page_bytes * self.num_pages

    @cached_property
    def num_buffers(self) -> int:
        """Buffers in the pool: K and V per layer, or one latent buffer per layer for MLA."""
        return self.num_layers * (1 if self.is_mla else 2)

    @cached_property
    def pool_bytes(self) -> int:
        return self.buffer_bytes * self.num_buffers

    @cached_property
    def num_tokens(self) -> int:
        return self.num_pages * self.page_size

    # --- wire form ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolLayout:
        if not isinstance(data, dict):
            raise LayoutError(f"a pool layout must be a map, got {type(data).__name__}")
        # Peers send the same few layouts with every room: a frozen layout is parsed once. The
        # key holds the layout's own fields only (small once the layout is valid): a map may
        # carry other keys (ignored), and a cached key must not keep a sender's 60 MB of them.
        known = {f for f in cls.__dataclass_fields__}
        try:
            key = (cls, tuple((k, type(v), v) for k, v in data.items() if k in known))  # True == 1, but not here
            cached = _FROM_DICT.get(key)
        except TypeError:  # an unhashable value: parsed (and refused) below
            key, cached = None, None
        if cached is not None:
            return cached
        missing = [f for f in ("engine_id", "role", "tp_size", "tp_rank", "num_layers",
                               "total_kv_heads", "head_dim", "dtype", "page_size", "num_pages")
                   if f not in data]
        if missing:
            raise LayoutError(f"pool layout lacks {', '.join(missing)}")
        try:
            layout = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:  # pragma: no cover - guarded by the filter above
            raise LayoutError(str(exc)) from exc
        if key is not None:
            if len(_FROM_DICT) >= _FROM_DICT_KEPT:
                _FROM_DICT.pop(next(iter(_FROM_DICT)))
            _FROM_DICT[key] = layout
        return layout

    def describe(self) -> str:
        kind = "MLA" if self.is_mla is True else f"{str(self.total_kv_heads)[:24]} kv heads"
        return (f"{str(self.role)[:16]} {str(self.engine_id)[:80]} tp {str(self.tp_rank)[:24]}/"
                f"{str(self.tp_size)[:24]}, {str(self.num_layers)[:24]} layers, {kind}, head_dim "
                f"{str(self.head_dim)[:24]}, {str(self.dtype)[:24]}, page {str(self.page_size)[:24]} x "
                f"{str(self.num_pages)[:24]}, {str(self.memory_kind)[:16]}"
                + (", hisparse" if self.hisparse else ""))


def check_compatible(sender: PoolLayout, receiver: PoolLayout) -> None:
    """Refuse two layouts whose KV cannot be mapped onto each other; the message names both.

    Page sizes may differ only when the receiver is a HiSparse host pool (page size 1):
    the sender's pages are then expanded to tokens.
    """
    problems: list[str] = []
    for name in ("num_layers", "head_dim", "dtype", "total_kv_heads", "is_mla"):
        if getattr(sender, name) != getattr(receiver, name):
            problems.append(f"{name} differs ({getattr(sender, name)!r} vs {getattr(receiver, name)!r})")
    if sender.page_size != receiver.page_size and not receiver.hisparse:
        problems.append(f"page_size differs ({sender.page_size} vs {receiver.page_size}) "
                        "and the receiver is not a HiSparse host pool")
    if problems:
        raise LayoutError(
            "cannot map KV between sender [" + sender.describe() + "] and receiver ["
            + receiver.describe() + "]: " + "; ".join(problems))

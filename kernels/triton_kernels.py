"""Fused Triton gather-to-staging and scatter-from-staging: every buffer and token in one launch.

Staging layout (the same as ``reference.py``): one writer's block for a chunk of ``T``
tokens is ``[buffer_0]...[buffer_{B-1}]`` in pool order, each slab ``[T][n][head_dim]``;
a receiver's chunk region holds ``[writer_0 block | writer_1 block | ...]``.

How it goes fast: a token's ``n * head_dim`` sent elements are one contiguous run in both
the pool row and the staging slab, so each program copies a ``[BLOCK_T, run]`` tile of
whole runs. Data moves as the widest integer unit (int32/int16/int8) that every address,
stride and head offset allows, and the pointers carry a 16-byte alignment hint when it
holds, so loads and stores become 128-bit vector accesses. Buffers may be separate
allocations (each engine's pool arrives as CUDA IPC handles): their byte addresses go in
an int64 table on the device, cast to pointers in the kernel. That table also works under
``TRITON_INTERPRET=1`` on CPU tensors (the interpreter dereferences host addresses).

What it must never do: touch memory outside the asked rows and heads. Token indices outside
``[0, pool_tokens)`` are masked off in the kernel (never read or written); callers validate
indices on the host beforehand (``reference.check_rows``) so such tokens are an error there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .reference import PoolBuffers, check_args, check_rows

__all__ = ["LaunchConfig", "gather_triton", "is_interpreted", "launch_config", "scatter_triton",
           "scatter_writers_triton"]

_UNIT_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32}
_TABLE_CACHE_SIZE = 256
_tables: OrderedDict[tuple[str, tuple[int, ...]], torch.Tensor] = OrderedDict()
_sm_counts: dict[int, int] = {}


# Triton reads these parameters' annotations itself (tl.constexpr marks compile-time ones); the
# pointer/int arguments stay unannotated so its JIT specialises them as it always has.
@triton.jit
def _staging_copy_kernel(  # type: ignore[no-untyped-def]
    buf_table,  # *i64 [B]: byte address of element [0, 0, 0] of each pool buffer
    staging,  # *unit: start of writer 0's block
    token_idx,  # *i32 or *i64 [T]: pool rows, in staging order
    head_offsets,  # *i64 [W]: units from a row's start to writer w's first head
    num_tokens,  # T
    pool_tokens,  # rows per pool buffer; indices outside [0, pool_tokens) are skipped
    row_stride,  # units between consecutive pool rows
    tiles_per_buffer,  # cdiv(T, BLOCK_T)
    NUM_BUFFERS: tl.constexpr,
    RUN: tl.constexpr,  # units of one token's sent heads (n * head_dim * itemsize / unit)
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next power of two >= RUN
    ALIGN: tl.constexpr,  # bytes: every run starts at a multiple of this (pool and staging)
    GATHER: tl.constexpr,  # True: pool -> staging, False: staging -> pool
    STREAM: tl.constexpr = False,  # stores with the streaming cache hint (.cs)
    SLABS: tl.constexpr = 1,  # slabs in the grid (with SLAB_FASTEST)
    SLAB_FASTEST: tl.constexpr = False,  # consecutive programs take consecutive slabs, not tiles
    EVICT: tl.constexpr = True,  # loads hint evict-first (the bytes are read once)
):
    pid = tl.program_id(0)
    if SLAB_FASTEST:
        tile = pid // SLABS
        slab = pid % SLABS
    else:
        tile = pid % tiles_per_buffer
        slab = pid // tiles_per_buffer  # writer * NUM_BUFFERS + buffer
    buf = slab % NUM_BUFFERS
    writer = slab // NUM_BUFFERS

    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_chunk = t < num_tokens
    row = tl.load(token_idx + t, mask=in_chunk, other=-1).to(tl.int64)
    valid = in_chunk & (row >= 0) & (row < pool_tokens)

    base = tl.load(buf_table + buf).to(tl.pointer_type(staging.dtype.element_ty))
    head_off = tl.load(head_offsets + writer)
    cols = tl.arange(0, BLOCK_R)
    pool_ptrs = base + (row * row_stride + head_off)[:, None] + cols[None, :]
    stage_rows = (slab.to(tl.int64) * num_tokens + t) * RUN
    stage_ptrs = staging + stage_rows[:, None] + cols[None, :]
    # Row starts are ALIGN-byte aligned (checked on the host): lets loads/stores vectorise.
    pool_ptrs = tl.multiple_of(pool_ptrs, [1, ALIGN])
    stage_ptrs = tl.multiple_of(stage_ptrs, [1, ALIGN])
    if RUN == BLOCK_R:  # noqa: SIM108 - a compile-time branch, kept plain for the Triton frontend
        mask = valid[:, None]
    else:
        mask = valid[:, None] & (cols < RUN)[None, :]
    if GATHER:
        if EVICT:
            data = tl.load(pool_ptrs, mask=mask, eviction_policy="evict_first")
        else:
            data = tl.load(pool_ptrs, mask=mask)
        if STREAM:
            tl.store(stage_ptrs, data, mask=mask, cache_modifier=".cs")
        else:
            tl.store(stage_ptrs, data, mask=mask)
    else:
        if EVICT:
            data = tl.load(stage_ptrs, mask=mask, eviction_policy="evict_first")
        else:
            data = tl.load(stage_ptrs, mask=mask)
        if STREAM:
            tl.store(pool_ptrs, data, mask=mask, cache_modifier=".cs")
        else:
            tl.store(pool_ptrs, data, mask=mask)


@triton.jit
def _scatter_writers_kernel(  # type: ignore[no-untyped-def]
    buf_table,  # *i64 [B]
    staging,  # *unit: the chunk region [writer_0 block | writer_1 block | ...]
    token_idx,  # *i32 or *i64 [T]
    head_offsets,  # *i64 [W]: units from a row's start to writer w's first head
    num_tokens,
    pool_tokens,
    row_stride,
    tiles_per_buffer,
    num_writers,
    NUM_BUFFERS: tl.constexpr,
    RUN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,  # next power of two >= num_writers
    BLOCK_R: tl.constexpr,
    ALIGN: tl.constexpr,
    STREAM: tl.constexpr,
    SLAB_FASTEST: tl.constexpr,
    EVICT: tl.constexpr,
):
    """Every writer's run of a token in one tile: the pieces of one pool row are written together."""
    pid = tl.program_id(0)
    if SLAB_FASTEST:
        tile = pid // NUM_BUFFERS
        buf = pid % NUM_BUFFERS
    else:
        tile = pid % tiles_per_buffer
        buf = pid // tiles_per_buffer
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    in_chunk = t < num_tokens
    row = tl.load(token_idx + t, mask=in_chunk, other=-1).to(tl.int64)
    valid = in_chunk & (row >= 0) & (row < pool_tokens)
    base = tl.load(buf_table + buf).to(tl.pointer_type(staging.dtype.element_ty))
    w = tl.arange(0, BLOCK_W)
    w_ok = w < num_writers
    head_off = tl.load(head_offsets + w, mask=w_ok, other=0)
    cols = tl.arange(0, BLOCK_R)
    pool_ptrs = (base + (row * row_stride)[:, None, None] + head_off[None, :, None]
                 + cols[None, None, :])
    slab = w.to(tl.int64) * NUM_BUFFERS + buf
    stage_rows = (slab[None, :] * num_tokens + t[:, None]) * RUN
    stage_ptrs = staging + stage_rows[:, :, None] + cols[None, None, :]
    pool_ptrs = tl.multiple_of(pool_ptrs, [1, 1, ALIGN])
    stage_ptrs = tl.multiple_of(stage_ptrs, [1, 1, ALIGN])
    if RUN == BLOCK_R:  # noqa: SIM108 - a compile-time branch, kept plain for the Triton frontend
        mask = valid[:, None, None] & w_ok[None, :, None]
    else:
        mask = valid[:, None, None] & w_ok[None, :, None] & (cols < RUN)[None, None, :]
    if EVICT:
        data = tl.load(stage_ptrs, mask=mask, eviction_policy="evict_first")
    else:
        data = tl.load(stage_ptrs, mask=mask)
    if STREAM:
        tl.store(pool_ptrs, data, mask=mask, cache_modifier=".cs")
    else:
        tl.store(pool_ptrs, data, mask=mask)


def is_interpreted() -> bool:
    """True when the kernel was built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_staging_copy_kernel, triton.runtime.jit.JITFunction)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shape of one launch: ``block_tokens`` tokens per program (all writers of them, when
    ``fuse_writers``), ``num_warps`` per program, streaming stores, and the grid order."""

    block_tokens: int
    num_warps: int
    stream: bool = False  # streaming-store cache hint
    slab_fastest: bool = False  # consecutive programs take consecutive buffers
    fuse_writers: bool = True  # a multi-writer scatter writes every writer's run of a token together
    evict: bool = True  # loads hint evict-first


SMALL_CHUNK_BYTES = 16 << 20


def launch_config(run_bytes: int, num_tokens: int, num_slabs: int, sm_count: int = 132,
                  block_bytes: int = 0, writers: int = 1) -> LaunchConfig:
    """Tile per launch, from H100 sweeps against SGLang's kernels (tools/bench_gpu_kernels.py).

    Chunks of at most 16 MiB (they may sit in L2): 32 tokens per program, 8 warps, consecutive
    programs on consecutive buffers, no cache hints, a multi-writer scatter fused (every writer's
    run of a token in one tile). Larger chunks: 4 KiB tiles, 4 warps, evict-first loads and
    streaming stores (the bytes are touched once), one writer per tile. ``writers`` > 1 sizes a
    fused tile."""
    row_bytes = triton.next_power_of_2(max(1, run_bytes))
    total = num_slabs * num_tokens * row_bytes
    cap = triton.next_power_of_2(max(1, num_tokens))
    if total <= SMALL_CHUNK_BYTES:
        per_token = row_bytes * triton.next_power_of_2(max(1, writers))
        tokens = block_bytes // per_token if block_bytes else max(1, 32 // triton.next_power_of_2(max(1, writers)))
        block_tokens = max(1, min(cap, tokens, 1024))
        warps = 8 if block_tokens * per_token >= 8192 else 4
        return LaunchConfig(block_tokens, warps, stream=False, slab_fastest=True, fuse_writers=True, evict=False)
    block_tokens = max(1, min(cap, (block_bytes or 4096) // row_bytes, 1024))
    return LaunchConfig(block_tokens, 4, stream=True, slab_fastest=False, fuse_writers=False, evict=True)


def _device_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of ``values`` on ``device``, cached: pools are registered once, so
    the same tables come back every call and no host-to-device copy is paid per launch."""
    key = (str(device), tuple(values))
    table = _tables.get(key)
    if table is None:
        # From pageable memory: staged by the driver at once, with no wait for work already on
        # the stream (an event loop that launches must never wait for an earlier copy).
        table = torch.tensor(list(values), dtype=torch.int64).to(device, non_blocking=True)
        _tables[key] = table
        if len(_tables) > _TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    if table.is_cuda:
        # The launch may run on another stream than the table was made on: keep its memory
        # from being reused by the caching allocator until that stream is past it.
        table.record_stream(torch.cuda.current_stream(device))
    return table


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def _alignment(values: Sequence[int], align: int = 16) -> int:
    """Largest power of two <= ``align`` dividing every value (addresses, strides, offsets in bytes)."""
    for value in values:
        while value % align:
            align //= 2
    return align


def _pool_table(pool: PoolBuffers) -> torch.Tensor:
    """The pool's buffer addresses on its device: made once per wrapped pool (plain lists hit
    the address-keyed cache), so launches pay no host-to-device copy."""
    if pool.table is None:
        pool.table = _device_table(pool.ptrs, pool.device)
    elif pool.table.is_cuda:
        pool.table.record_stream(torch.cuda.current_stream(pool.device))
    return pool.table


def _launch(staging: torch.Tensor, buffers: Sequence[torch.Tensor] | PoolBuffers, token_idx: torch.Tensor,
            head_starts: Sequence[int], num_heads: int, gather: bool, config: LaunchConfig | None) -> None:
    pool = PoolBuffers.of(buffers)
    for head_start in head_starts:
        check_args(pool, token_idx, head_start, num_heads, staging, num_writers=len(head_starts))
    device = pool.device
    if device.type != "cuda" and not is_interpreted():
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
                           "kvd_kernels is first imported; use the torch reference instead")
    if device.type != "cuda":
        check_rows(token_idx, pool.pool_tokens)  # cheap on the host; keeps CPU runs honest
    num_tokens = token_idx.numel()
    if num_tokens == 0:
        return
    unit_bytes = pool.head_dim * pool.itemsize
    run_bytes = num_heads * unit_bytes
    head_bytes = [h * unit_bytes for h in head_starts]
    align = _alignment([staging.data_ptr(), run_bytes, *head_bytes], pool.align)
    unit = min(align, 4)
    stage = staging.view(_UNIT_DTYPES[unit])
    run = run_bytes // unit
    num_slabs = len(head_starts) * len(pool)
    writers = len(head_starts)
    fused = not gather and writers > 1
    if config is None:
        config = launch_config(run_bytes, num_tokens, num_slabs, _sm_count(device),
                               writers=writers if fused else 1)
        if fused and not config.fuse_writers:
            config = launch_config(run_bytes, num_tokens, num_slabs, _sm_count(device))
    fused = fused and config.fuse_writers
    tiles = triton.cdiv(num_tokens, config.block_tokens)
    table = _pool_table(pool)
    heads = _device_table([h // unit for h in head_bytes], device)
    row_stride = pool.row_stride * pool.itemsize // unit
    if fused:
        _scatter_writers_kernel[(len(pool) * tiles,)](
            table, stage, token_idx, heads, num_tokens, pool.pool_tokens, row_stride, tiles, writers,
            NUM_BUFFERS=len(pool), RUN=run, BLOCK_T=config.block_tokens,
            BLOCK_W=triton.next_power_of_2(writers), BLOCK_R=triton.next_power_of_2(run), ALIGN=align,
            STREAM=config.stream, SLAB_FASTEST=config.slab_fastest, EVICT=config.evict, num_warps=config.num_warps,
        )
        return
    _staging_copy_kernel[(num_slabs * tiles,)](
        table, stage, token_idx, heads, num_tokens, pool.pool_tokens, row_stride, tiles,
        NUM_BUFFERS=len(pool), RUN=run, BLOCK_T=config.block_tokens,
        BLOCK_R=triton.next_power_of_2(run), ALIGN=align, GATHER=gather, STREAM=config.stream,
        SLABS=num_slabs if config.slab_fastest else 1, SLAB_FASTEST=config.slab_fastest, EVICT=config.evict,
        num_warps=config.num_warps,
    )


def gather_triton(buffers: Sequence[torch.Tensor] | PoolBuffers, token_idx: torch.Tensor, head_start: int,
                  num_heads: int, out: torch.Tensor, *, config: LaunchConfig | None = None) -> None:
    """Gather heads ``[head_start, head_start+num_heads)`` of rows ``token_idx`` of all buffers
    into the 1-D uint8 block ``out`` in one launch (asynchronous on the current stream)."""
    _launch(out, buffers, token_idx, [head_start], num_heads, True, config)


def scatter_triton(staging: torch.Tensor, buffers: Sequence[torch.Tensor] | PoolBuffers,
                   token_idx: torch.Tensor, head_start: int, num_heads: int, *,
                   config: LaunchConfig | None = None) -> None:
    """Scatter one writer's block into heads ``[head_start, head_start+num_heads)`` of rows ``token_idx``."""
    _launch(staging, buffers, token_idx, [head_start], num_heads, False, config)


def scatter_writers_triton(staging: torch.Tensor, buffers: Sequence[torch.Tensor] | PoolBuffers,
                           token_idx: torch.Tensor, head_starts: Sequence[int], num_heads: int, *,
                           config: LaunchConfig | None = None) -> None:
    """Scatter a whole chunk region ``[writer_0 | writer_1 | ...]`` in one launch.

    Writer ``w``'s block (``num_heads`` heads each) lands at head ``head_starts[w]``.
    """
    if len(head_starts) == 0:
        raise ValueError("scatter_writers needs at least one writer")
    _launch(staging, buffers, token_idx, list(head_starts), num_heads, False, config)

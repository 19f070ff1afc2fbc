"""SGLang's ``KVArgs`` -> a kvd pool (layout + memory map), and the features kvd refuses.

Pure translation: no SGLang import, no daemon. SGLang's MHA pool is ``[K_0..K_{L-1},
V_0..V_{L-1}]`` of ``[tokens][heads][head_dim]`` buffers (MLA: ``[C_0..C_{L-1}]``), the same
byte layout as a kvd pool, so a pool is registered in place.
"""

from __future__ import annotations

import os
from typing import Any

from kvd.core.layout import DTYPE_SIZES, PoolLayout
from kvd.engineclient.rawmem import shm_memory_for_pointers
from kvd.sglang import UnsupportedSGLang

_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp8_e4m3": "float8_e4m3fn",
                 "fp8_e5m2": "float8_e5m2", "float": "float32", "fp32": "float32"}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return getattr(obj, name, default)


def refusals(kv_args: Any, server_args: Any, mode: str) -> list[str]:
    """Every SGLang feature in this configuration that kvd cannot honour, by name."""
    out: list[str] = []
    if _get(kv_args, "state_types"):
        kinds = ", ".join(str(getattr(t, "value", t)) for t in kv_args.state_types)
        out.append(f"state buffers ({kinds}: Mamba/SWA/DSA/block-scale state) have no kvd equivalent")
    if _get(kv_args, "num_draft_entries", 0):
        out.append("draft-model KV buffers (speculative decoding) are not transferred by kvd")
    if _get(server_args, "pp_size", 1) != 1 or _get(kv_args, "prefill_start_layer", 0) not in (0, None):
        out.append("pipeline parallelism (PP layer ranges) is not supported by kvd")
    if _get(server_args, "attn_cp_size", 1) not in (1, None) or _get(server_args, "dcp_size", 1) not in (1, None):
        out.append("context parallelism (CP/DCP) is not supported by kvd")
    if _get(server_args, "disaggregation_decode_allocation_policy", "early") != "early":
        out.append(f"decode allocation policy {server_args.disaggregation_decode_allocation_policy!r} "
                   "(only 'early' is supported)")
    if mode == "decode" and _get(server_args, "disaggregation_decode_enable_radix_cache", False):
        out.append("the decode-side radix cache (decode_prefix_len) is not supported by kvd")
    if _get(server_args, "enable_hisparse", False):
        out.append("HiSparse host destinations through SGLang are not wired to kvd yet")
    if _get(kv_args, "host_kv_data_ptrs"):
        out.append("host KV destinations (host_kv_data_ptrs) are not supported by kvd")
    if os.environ.get("SGLANG_MOONCAKE_CUSTOM_MEM_POOL") == "INTRA_NODE_NVLINK":
        out.append("SGLANG_MOONCAKE_CUSTOM_MEM_POOL=INTRA_NODE_NVLINK puts aux rows on the GPU; kvd needs them in host memory")
    if _get(kv_args, "kv_layout") not in (None, "nhd", "NHD"):
        out.append(f"KV byte layout {kv_args.kv_layout!r} (kvd pools are token-major NHD)")
    lens = list(_get(kv_args, "kv_item_lens", []) or [])
    if not lens:
        out.append("no KV buffers were given (kv_item_lens is empty)")
    elif len(set(lens)) != 1:
        out.append(f"KV buffers have different item sizes {sorted(set(lens))} (e.g. K and V head dims differ); "
                   "kvd pools need one item size for every buffer")
    return out


def dtype_of(kv_cache_dtype_str: str | None) -> str | None:
    text = str(kv_cache_dtype_str or "").removeprefix("torch.")
    text = _TORCH_DTYPES.get(text, text)
    return text if text in DTYPE_SIZES else None


def pool_layout(kv_args: Any, *, role: str, engine_id: str, tp_size: int, tp_rank: int,
                is_mla: bool, memory_kind: str = "host") -> PoolLayout:
    """The kvd layout of SGLang's pool; unknown dtypes are described as raw bytes."""
    ps = int(kv_args.page_size)
    item = int(kv_args.kv_item_lens[0])
    n_buffers = len(kv_args.kv_data_ptrs)
    if is_mla:
        heads_local, total = 1, 1
        layers = n_buffers
    else:
        heads_local = int(kv_args.kv_head_num)
        total = int(_get(kv_args, "total_kv_head_num", 0) or heads_local * tp_size)
        if n_buffers % 2:
            raise UnsupportedSGLang(f"an MHA pool has K and V buffers per layer, got {n_buffers} buffers")
        layers = n_buffers // 2
    dtype = dtype_of(_get(kv_args, "kv_cache_dtype_str")) or "uint8"
    size = DTYPE_SIZES[dtype]
    per_token = item // ps
    if item % ps or per_token % (heads_local * size):
        dtype, size = "uint8", 1
    if per_token % heads_local:
        raise UnsupportedSGLang(f"KV item size {item} is not page_size {ps} x {heads_local} heads")
    head_dim = per_token // heads_local // size
    num_pages = min(int(n) for n in kv_args.kv_data_lens) // item
    return PoolLayout(engine_id=engine_id, role=role, tp_size=tp_size, tp_rank=tp_rank, num_layers=layers,
                      total_kv_heads=total, head_dim=head_dim, dtype=dtype, page_size=ps, num_pages=num_pages,
                      is_mla=is_mla, memory_kind=memory_kind)


def pool_memory(kv_args: Any) -> dict[str, Any]:
    """Where the pool lives, for the daemon: a /dev/shm segment (host) or CUDA IPC (GPU)."""
    ptrs, lens = list(kv_args.kv_data_ptrs), list(kv_args.kv_data_lens)
    if _get(kv_args, "gpu_id", None) is not None and _is_cuda_pointer(ptrs[0]):
        from kvd.engineclient.rawmem import cuda_memory_for_pointers

        return cuda_memory_for_pointers(ptrs, lens)
    return shm_memory_for_pointers(ptrs, lens)


def _is_cuda_pointer(ptr: int) -> bool:
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import ctypes

        attrs = ctypes.c_int()
        libcuda = ctypes.CDLL("libcuda.so.1")
        # CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2; CU_MEMORYTYPE_DEVICE = 2
        rc = libcuda.cuPointerGetAttribute(ctypes.byref(attrs), 2, ctypes.c_uint64(int(ptr)))
        return rc == 0 and attrs.value == 2
    except Exception:
        return False


def check_aux_index(item_lens: list[int], index: int, data_lens: list[int] | None) -> None:
    """ValueError unless row ``index`` lies inside every aux buffer (``data_lens``: their sizes,
    as KVArgs gives them; None: unknown, unchecked). The rows are read and written by raw
    pointer: an index out of range would read or write whatever lies beyond the buffer."""
    if index < 0:
        raise ValueError(f"aux row index {index} is negative")
    if data_lens is None:
        return
    if len(data_lens) != len(item_lens):
        raise ValueError(f"{len(item_lens)} aux buffers but {len(data_lens)} sizes")
    for i, (n, size) in enumerate(zip(item_lens, data_lens, strict=True)):
        if n < 0 or n * (index + 1) > size:
            raise ValueError(f"aux row {index} ({n} bytes) lies outside aux buffer {i} of {size} bytes")


def aux_row(ptrs: list[int], item_lens: list[int], index: int, data_lens: list[int] | None = None) -> bytes:
    """One request's aux rows (MetadataBuffers), concatenated buffer by buffer."""
    import ctypes

    check_aux_index(item_lens, index, data_lens)
    return b"".join(ctypes.string_at(p + n * index, n) for p, n in zip(ptrs, item_lens, strict=True))


def write_aux_row(ptrs: list[int], item_lens: list[int], index: int, data: bytes,
                  data_lens: list[int] | None = None) -> None:
    """Land ``data`` (as made by :func:`aux_row` on the prefill) in the decode's aux rows."""
    import ctypes

    check_aux_index(item_lens, index, data_lens)
    if len(data) != sum(item_lens):
        raise ValueError(f"aux rows of {len(data)} bytes do not match this engine's {sum(item_lens)} "
                         "(MetadataBuffers differ between prefill and decode)")
    pos = 0
    for p, n in zip(ptrs, item_lens, strict=True):
        ctypes.memmove(p + n * index, data[pos:pos + n], n)
        pos += n


__all__ = ["aux_row", "check_aux_index", "dtype_of", "pool_layout", "pool_memory", "refusals", "write_aux_row"]

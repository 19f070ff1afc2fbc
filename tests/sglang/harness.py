"""SGLang ranks in one process, the way SGLang's schedulers build them, over real kvd daemons.

Each rank gets SGLang's real ``KVArgs`` and ``MetadataBuffers``; its KV pool is per-layer torch
tensors (as SGLang's MHATokenToKVPool makes them) carved out of one /dev/shm segment, handed
to the backend as raw pointers. Classes come from SGLang's ``get_kv_class`` after the plug-in
registered ``kvd``.
"""

from __future__ import annotations

import socket
import types
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kv_classes() -> dict[str, Any]:
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend, get_kv_class

    from kvd.sglang.plugin import register

    register()
    from sglang.srt.plugins.hook_registry import HookRegistry

    HookRegistry.apply_hooks()
    import sglang.srt.disaggregation.utils as u

    backend = TransferBackend("kvd")
    return {t.value: u.get_kv_class(backend, t) for t in KVClassType} | {"_orig": get_kv_class}


@dataclass
class Rank:
    role: str
    tp_size: int
    tp_rank: int
    layers: int
    total_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    mla: bool = False
    shm: shared_memory.SharedMemory | None = None
    bufs: list[torch.Tensor] = field(default_factory=list)
    meta: Any = None
    mgr: Any = None

    @property
    def local_heads(self) -> int:
        return 1 if self.mla else max(1, self.total_heads // self.tp_size)

    def head_range(self) -> range:
        if self.mla:
            return range(0, 1)
        rep = max(1, self.tp_size // self.total_heads)
        first = (self.tp_rank // rep) * self.local_heads
        return range(first, first + self.local_heads)

    def allocate(self) -> None:
        tokens = (self.num_pages + 1) * self.page_size  # SGLang pads one page
        n_buf = self.layers * (1 if self.mla else 2)
        per = tokens * self.local_heads * self.head_dim * 2
        stride = (per + 4095) // 4096 * 4096
        self.shm = shared_memory.SharedMemory(create=True, size=stride * n_buf)
        whole = torch.frombuffer(self.shm.buf, dtype=torch.uint8)
        self.bufs = [whole[i * stride:i * stride + per].view(torch.bfloat16).view(tokens, self.local_heads,
                                                                                   self.head_dim)
                     for i in range(n_buf)]
        for b in self.bufs:
            b.zero_()
        from sglang.srt.disaggregation.utils import MetadataBuffers

        self.meta = MetadataBuffers(size=8, hidden_size=32, hidden_states_dtype=torch.bfloat16,
                                    max_sampling_mask_tokens=4)

    def kv_args(self) -> Any:
        from sglang.srt.disaggregation.base.conn import KVArgs

        a = KVArgs()
        a.engine_rank = self.tp_rank
        a.pp_rank = 0
        a.system_dp_rank = 0
        a.prefill_start_layer = 0
        a.kv_cache_dtype_str = "bfloat16"
        a.kv_data_ptrs = [b.data_ptr() for b in self.bufs]
        a.kv_data_lens = [b.nbytes for b in self.bufs]
        a.kv_item_lens = [b[0].nbytes * self.page_size for b in self.bufs]
        a.num_draft_entries = 0
        if not self.mla:
            a.kv_head_num = self.local_heads
            a.total_kv_head_num = self.total_heads
        a.page_size = self.page_size
        a.aux_data_ptrs, a.aux_data_lens, a.aux_item_lens = self.meta.get_buf_infos()
        a.state_types = []
        a.gpu_id = 0
        a.ib_device = ""
        return a

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.close()
        self.bufs = []
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()


def server_args(tp: int, bootstrap_port: int, sock: str, **extra: Any) -> Any:
    return types.SimpleNamespace(tp_size=tp, dp_size=1, pp_size=1, enable_dp_attention=False,
                                 disaggregation_bootstrap_port=bootstrap_port, kvd_socket=sock,
                                 disaggregation_decode_allocation_policy="early", port=30000 + bootstrap_port % 1000,
                                 **extra)


def fill_room(ranks: list[Rank], pages: list[int], seed: int) -> np.ndarray:
    """Random global KV for one room, written into each prefill rank's head slice."""
    r0 = ranks[0]
    tokens = len(pages) * r0.page_size
    n_buf = len(r0.bufs)
    heads = 1 if r0.mla else r0.total_heads
    g = torch.randn((n_buf, tokens, heads, r0.head_dim), generator=torch.Generator().manual_seed(seed))
    g = g.to(torch.bfloat16)
    for rank in ranks:
        hr = rank.head_range()
        for b in range(n_buf):
            for i, p in enumerate(pages):
                rank.bufs[b][p * rank.page_size:(p + 1) * rank.page_size] = \
                    g[b, i * rank.page_size:(i + 1) * rank.page_size, hr.start:hr.stop]
    return g.view(torch.int16).numpy()


def check_room(rank: Rank, pages: list[int], g: np.ndarray) -> int:
    """Byte-compare one decode rank's pages with the global KV; returns bytes checked."""
    hr = rank.head_range()
    checked = 0
    for b, buf in enumerate(rank.bufs):
        for i, p in enumerate(pages):
            got = buf[p * rank.page_size:(p + 1) * rank.page_size].view(torch.int16).numpy()
            want = g[b, i * rank.page_size:(i + 1) * rank.page_size, hr.start:hr.stop]
            assert np.array_equal(got, want), f"buffer {b} page {p} (room page {i}) differs"
            checked += got.nbytes
    return checked

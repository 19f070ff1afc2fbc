"""Mooncake's TransferEngine behind the transport interface (:mod:`kvd.transfer.base`).

``Transport``, ``BatchResult`` and ``TransportError`` live in :mod:`kvd.transfer.base` and are
re-exported here, so ``from kvd.transfer.mooncake import TransportError`` (and the old
``kvd.transport``) keep working.

A daemon owns one :class:`MooncakeTransport`: it registers memory once, and
writes batches of (src, dst, length) into a peer's registered memory. Mooncake's
calls block, so every one runs on worker threads; the event loop only awaits
futures. Each peer session has its own workers (per-peer dispatch), so one slow or
dead peer cannot hold up the others, and Mooncake's transfer timeout is tied to the
heartbeat window by the daemon.

Never call Mooncake from the event loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from kvd.transfer.base import BatchResult, Transport, TransportError

__all__ = ["BatchResult", "MooncakeTransport", "Transport", "TransportError"]


MAX_PEER_EXECUTORS = 256


class MooncakeTransport:
    """Mooncake TransferEngine with the P2P handshake (no metadata server)."""

    def __init__(self, hostname: str, protocol: str = "tcp", devices: str = "", workers: int = 4,
                 queues: int = 4, max_batch_ops: int = 1024, transfer_timeout_s: float = 0.0) -> None:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:  # pragma: no cover - install problem
            raise TransportError(
                "the Mooncake transfer engine is not installed: pip install "
                "mooncake-transfer-engine-non-cuda (CPU), mooncake-transfer-engine (CUDA 12) "
                f"or mooncake-transfer-engine-cuda13 ({exc})") from exc
        if transfer_timeout_s > 0:
            # Mooncake reads its transfer timeout from the environment when an engine starts: a
            # batch to a stalled peer gives up within the heartbeat window, not after 30 s.
            seconds = str(max(1, math.ceil(transfer_timeout_s)))
            os.environ["MC_TRANSFER_TIMEOUT"] = seconds
            os.environ["MC_TCP_PROGRESS_TIMEOUT_SEC"] = seconds  # TCP: a write with no progress fails
        self._engine = TransferEngine()
        rc = self._engine.initialize(hostname, "P2PHANDSHAKE", protocol, devices)
        if rc != 0:
            raise TransportError(f"Mooncake initialize({hostname!r}, P2PHANDSHAKE, {protocol!r}, "
                                 f"{devices!r}) failed with {rc}")
        self.protocol = protocol
        self.devices = devices or ("auto" if protocol == "rdma" else "-")
        self.session_id = f"{hostname}:{self._engine.get_rpc_port()}"
        self.max_batch_ops = max_batch_ops
        # Per-peer dispatch: each peer session gets its own few worker threads, so a stalled or
        # dead peer holds only its own threads (until Mooncake's transfer timeout), never the
        # batches of healthy peers. Idle executors beyond MAX_PEER_EXECUTORS are closed.
        self._per_peer = max(2, workers // max(1, queues))
        self._executors: OrderedDict[str, concurrent.futures.ThreadPoolExecutor] = OrderedDict()
        self._registered: dict[int, int] = {}

    # --- memory -----------------------------------------------------------------------------
    def register(self, addr: int, length: int) -> None:
        """Register once; a failure names the likely fix instead of Mooncake's bare code."""
        if addr in self._registered:
            return
        rc = self._engine.register_memory(addr, length)
        if rc != 0:
            raise TransportError(
                f"cannot register {length} bytes at {addr:#x} with Mooncake ({self.protocol}): rc {rc}. "
                "GPU memory from expandable segments / VMM cannot be registered: start the engine "
                "with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False, and raise the memlock "
                "limit (LimitMEMLOCK=infinity) for RDMA")
        self._registered[addr] = length

    def unregister(self, addr: int) -> None:
        if self._registered.pop(addr, None) is not None:
            self._engine.unregister_memory(addr)

    def regions(self) -> list[tuple[int, int]]:
        return sorted(self._registered.items())

    # --- data -------------------------------------------------------------------------------
    def _executor(self, peer_session: str) -> concurrent.futures.ThreadPoolExecutor:
        ex = self._executors.get(peer_session)
        if ex is None:
            ex = concurrent.futures.ThreadPoolExecutor(self._per_peer, thread_name_prefix="kvd-mooncake")
            self._executors[peer_session] = ex
            while len(self._executors) > MAX_PEER_EXECUTORS:
                _, old = self._executors.popitem(last=False)
                old.shutdown(wait=False)  # running batches finish; nothing new is queued there
        else:
            self._executors.move_to_end(peer_session)
        return ex

    def _write_blocking(self, peer_session: str, src: list[int], dst: list[int],
                        length: list[int]) -> tuple[int, float]:
        t0 = time.perf_counter()
        for i in range(0, len(src), self.max_batch_ops):
            j = i + self.max_batch_ops
            rc = self._engine.batch_transfer_sync_write(peer_session, src[i:j], dst[i:j], length[i:j])
            if rc < 0:
                return rc, time.perf_counter() - t0
        return 0, time.perf_counter() - t0

    async def write(self, peer_session: str, src: np.ndarray, dst: np.ndarray,
                    length: np.ndarray) -> BatchResult:
        """Write one batch into the peer's registered memory; raises TransportError on failure."""
        if len(src) == 0:
            return BatchResult(0, 0, 0.0)
        loop = asyncio.get_running_loop()
        args = (peer_session, src.tolist(), dst.tolist(), length.tolist())
        rc, seconds = await loop.run_in_executor(self._executor(peer_session), self._write_blocking, *args)
        if rc != 0:
            raise TransportError(f"Mooncake write of {len(src)} ops to {peer_session} failed (rc {rc})")
        return BatchResult(int(length.sum()), len(src), seconds)

    def write_blocking(self, peer_session: str, src: Sequence[int], dst: Sequence[int],
                       length: Sequence[int]) -> BatchResult:
        """Synchronous write, for benchmarks that measure the raw transport."""
        rc, seconds = self._write_blocking(peer_session, list(src), list(dst), list(length))
        if rc != 0:
            raise TransportError(f"Mooncake write to {peer_session} failed (rc {rc})")
        return BatchResult(int(sum(length)), len(src), seconds)

    def close(self) -> None:
        """Unregister everything, stop the workers and destroy the engine (its server sockets
        close and its threads are joined: ~1 s, so never on the event loop)."""
        for addr in list(self._registered):
            self.unregister(addr)
        for ex in self._executors.values():
            ex.shutdown(wait=True, cancel_futures=False)
        self._executors.clear()
        self._engine = None


def _conforms(transport: MooncakeTransport) -> Transport:  # checked by mypy: MooncakeTransport is a Transport
    return transport

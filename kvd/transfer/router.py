"""Per-peer routing: peers on this machine get GPU copies over CUDA IPC, the others the network.

:class:`SameNodeTransport` wraps the network transport (Mooncake, TCP or RDMA) and has the
same interface; the room sides do not know it is there. Every region registered with it is
registered with the network transport too, and, where it is device memory, exported on this
machine (:mod:`kvd.transfer.cudaipc`). On the first write to a peer session it decides that
peer's path once:

- ``local``: the peer is this daemon (both pools are ours): device-to-device copies;
- ``cuda_ipc``: the peer is another daemon on this machine and its regions opened here:
  copies from our memory straight into its (one pass, no network, no host bounce);
- ``network``: anything else, with the reason (another machine, no CUDA here, endpoint off...).

A batch on a same-node path whose source or destination is not in opened device memory
(host pools, a region the peer could not export) goes over the network instead: that is a
*fallback*, counted per peer with its reason and logged (the first time per reason at
warning level), never silent. :meth:`paths` returns all of it for ``kvctl status``.

Copies: up to ``memcpy_ops`` ops, or ops of 1 MiB and more on average, as ``cuMemcpyAsync``
each; many small ops as one batched Triton kernel (``kvd_kernels.copy_kernels.copy_ops_triton``); each batch
returns once its stream is done.

Who launches (``launch``): with ``"loop"`` (the default) the event loop itself launches a batch's
copies (asynchronous: microseconds) on its own stream, and a waiter thread only blocks on the
batch's end event. A copy thread that launches needs the GIL a dozen times per batch while the
loop holds it, and on the GPU host each hand-over cost milliseconds (a batch's ``device_s`` of
5-15 ms for 0.3 ms of copying, ``tools/gpu_e2e.py --timeline``). A Triton kernel shape never
launched before still goes through a copy thread once (its compile must not stop the loop);
``"worker"`` sends every batch there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import structlog

from kvd.core.planner import RegionIndex
from kvd.core.rows import RowBatch, RowCopy
from kvd.transfer.base import BatchResult, RowWriter, Transport, TransportError
from kvd.transfer.cudaipc import (
    ExportedRegion,
    IpcEndpoint,
    IpcPeer,
    cuda,
    endpoint_reachable,
    inside,
)

__all__ = ["PeerPath", "SameNodeTransport", "with_endpoint"]

log = structlog.get_logger("kvd.transfer")


@dataclass
class PeerPath:
    """How one peer session's writes go, and why."""

    path: str  # "local", "cuda_ipc" or "network"
    reason: str
    # "one_pass": same-node batches of row copies (a head slice straight into the peer's pool)
    batches: dict[str, int] = field(default_factory=lambda: {"same_node": 0, "one_pass": 0, "network": 0})
    bytes: dict[str, int] = field(default_factory=lambda: {"same_node": 0, "network": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"same_node": 0.0, "network": 0.0})
    fallbacks: dict[str, int] = field(default_factory=dict)  # reason -> batches sent over the network

    def count(self, route: str, result: BatchResult) -> BatchResult:
        """Add one batch that went by ``route`` ("same_node" or "network"); returns it."""
        self.batches[route] += 1
        self.bytes[route] += result.nbytes
        self.seconds[route] += result.seconds
        return result

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "batches": dict(self.batches), "bytes": dict(self.bytes),
                "seconds": {k: round(v, 6) for k, v in self.seconds.items()}, "fallbacks": dict(self.fallbacks)}


class SameNodeTransport:
    """:class:`~kvd.transfer.base.Transport` that routes each peer to CUDA IPC copies or the network."""

    def __init__(self, network: Transport, workers: int = 4, memcpy_ops: int = 16, launch: str = "loop") -> None:
        if launch not in ("loop", "worker"):
            raise ValueError(f"launch must be 'loop' or 'worker', got {launch!r}")
        self.network = network
        self.launch = launch
        self._compiled: set[tuple[int, ...]] = set()  # row-copy kernel shapes launched once already
        self.session_id = network.session_id
        self.protocol = network.protocol
        self.devices = network.devices
        self.memcpy_ops = memcpy_ops
        self.max_fallback_ops = 1 << 16  # a row copy that falls back to the network: at most this many ops
        self.disabled = ""  # why no peer can get a same-node path here ("" = they can)
        self._endpoint: IpcEndpoint | None = None
        try:
            cuda()  # first: without a CUDA driver there is nothing to share, and no torch to import (~1 s)
            import torch  # noqa: F401 - streams and the batched copy kernel need it

            self._endpoint = IpcEndpoint(self.session_id)
        except (TransportError, ImportError, OSError) as exc:
            self.disabled = str(exc)
        self._registered: dict[int, int] = {}
        # Exported device memory, replaced (never mutated) on each change.
        self._device_regions = RegionIndex([])
        self._devices: set[int] = set()  # the GPUs our exported regions are on
        self._not_exported: dict[int, str] = {}
        self._peers: dict[str, IpcPeer] = {}
        self._paths: dict[str, PeerPath] = {}
        self._deciding: dict[str, asyncio.Future[PeerPath]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="kvd-samenode")
        # Threads that only wait for a batch launched by the loop (never queued behind a copy).
        self._waiters = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="kvd-samenode-wait")
        self._local = threading.local()
        self._lock = threading.Lock()

    # --- memory -----------------------------------------------------------------------------
    def register(self, addr: int, length: int) -> None:
        self.network.register(addr, length)
        self._registered.setdefault(addr, length)
        if self._endpoint is None:
            return
        exported = self._endpoint.add(addr, length)
        with self._lock:
            if isinstance(exported, ExportedRegion):
                self._device_regions = RegionIndex(sorted({*self._device_regions.pairs, (addr, length)}))
                self._devices.add(exported.device)
            else:
                self._not_exported[addr] = exported
        if not isinstance(exported, ExportedRegion):
            log.info("same_node_region_not_exported", addr=hex(addr), bytes=length, reason=exported)

    def regions(self) -> list[tuple[int, int]]:
        return sorted(self._registered.items())


    def unregister(self, addr: int) -> None:
        self._registered.pop(addr, None)
        self.network.unregister(addr)
        if self._endpoint is not None:
            self._endpoint.remove(addr)
        with self._lock:
            self._device_regions = RegionIndex([r for r in self._device_regions.pairs if r[0] != addr])
            self._not_exported.pop(addr, None)

    # --- routing ------------------------------------------------------------------------------
    @property
    def same_node(self) -> str:
        """'cuda_ipc' when peers on this machine can get the same-node path, else 'off: <reason>'."""
        return f"off: {self.disabled}" if self.disabled else "cuda_ipc"

    def reaches_peer(self, peer_session: str) -> bool:
        """Whether ``peer_session`` is on this machine with its same-node endpoint up (its GPU
        memory can be opened here): such a peer can take row copies in one pass."""
        return not self.disabled and (peer_session == self.session_id or endpoint_reachable(peer_session))

    def device_memory(self, addresses: list[int]) -> bool:
        """Whether every address lies in device memory this daemon registered and exported."""
        if self.disabled or not addresses:
            return False
        addrs = np.asarray(addresses, dtype=np.int64)
        return inside(self._device_regions, addrs, np.ones_like(addrs))

    def paths(self) -> dict[str, dict[str, Any]]:
        """Per peer session: path, reason, batches and bytes by route, fallbacks by reason."""
        return {peer: p.to_dict() for peer, p in self._paths.items()}

    def _decide_blocking(self, peer_session: str) -> PeerPath:
        if self.disabled:
            return PeerPath("network", f"same-node path off on this daemon: {self.disabled}")
        links = self._peer_links()
        if peer_session == self.session_id:
            return PeerPath("local", f"the peer is this daemon: device-to-device copies{links}")
        # Copies run on our device: the peer's allocations are opened in its context, so a peer
        # on another GPU is reached over the GPUs' link (CUDA IPC's lazy peer access).
        peer = IpcPeer(peer_session, copy_device=min(self._devices) if len(self._devices) == 1 else None)
        try:
            peer.refresh()
        except TransportError as exc:
            return PeerPath("network", str(exc))
        self._peers[peer_session] = peer
        note = f"; {len(peer.skipped)} region(s) not opened: {peer.skipped[0]}" if peer.skipped else ""
        return PeerPath("cuda_ipc", f"same machine: {len(peer.starts)} region(s) opened over CUDA IPC{note}{links}")

    def _peer_links(self) -> str:
        """With several GPUs: peer access between every pair, enabled once (the reason where not)."""
        c = cuda()
        if c.device_count < 2:
            return ""
        access = c.enable_peer_access()
        off = {f"{a}->{b}": why for (a, b), why in access.items() if why != "on"}
        state = off if off else f"on between all {c.device_count} GPUs"
        return f"; GPU peer access {state}"

    async def _path(self, peer_session: str) -> PeerPath:
        path = self._paths.get(peer_session)
        if path is not None:
            return path
        pending = self._deciding.get(peer_session)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self._pool, self._decide_blocking, peer_session)
            self._deciding[peer_session] = pending
            path = await pending
            self._paths[peer_session] = path
            del self._deciding[peer_session]
            log.info("peer_path", peer=peer_session, path=path.path, reason=path.reason,
                     network=self.protocol)
            return path
        return await pending

    def _fallback(self, peer_session: str, path: PeerPath, reason: str) -> None:
        first = reason not in path.fallbacks
        path.fallbacks[reason] = path.fallbacks.get(reason, 0) + 1
        if first:
            log.warning("same_node_fallback", peer=peer_session, path=path.path, network=self.protocol,
                        reason=reason)

    def _destinations(self, peer_session: str, path: PeerPath, dst: np.ndarray,
                      length: np.ndarray, refresh: bool = True) -> np.ndarray | None:
        if path.path == "local":
            return dst if inside(self._device_regions, dst, length) else None
        peer = self._peers[peer_session]
        peer.check()  # raises once the peer revoked this session: the batch fails, it never lands
        mapped = peer.translate(dst, length)
        if mapped is None and refresh:  # a region registered after we looked: read the peer's list again
            try:
                peer.refresh()
            except TransportError:
                return None
            mapped = peer.translate(dst, length)
        return mapped

    async def write(self, peer_session: str, src: np.ndarray, dst: np.ndarray,
                    length: np.ndarray) -> BatchResult:
        if len(src) == 0:
            return BatchResult(0, 0, 0.0)
        path = await self._path(peer_session)
        if path.path != "network":
            s, d, n = (np.asarray(a, dtype=np.int64) for a in (src, dst, length))
            reason = ""
            if not inside(self._device_regions, s, n):
                reason = "source outside this daemon's exported device memory (host memory?)"
            else:
                result: BatchResult | str | None = None
                if self.launch == "loop" and self._memcpy_batch(n):
                    result = await self._on_loop(peer_session, path, lambda: self._launch_memcpy(
                        peer_session, path, s, d, n))
                if result is None:  # a copy thread launches (and opens new peer regions first)
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(self._pool, self._same_node, peer_session, path, s, d, n)
                if isinstance(result, BatchResult):
                    return path.count("same_node", result)
                reason = result
            self._fallback(peer_session, path, reason)
        return path.count("network", await self.network.write(peer_session, src, dst, length))

    async def write_rows(self, peer_session: str, batch: RowBatch) -> BatchResult:
        """Row copies (a strided head slice per buffer): on a same-node path one copy kernel from
        our pool into the peer's opened pool, one pass, no staging; otherwise, or where the
        memory is not shareable (a counted, logged fallback), the same bytes as network ops."""
        if len(batch) == 0:
            return BatchResult(0, 0, 0.0)
        path = await self._path(peer_session)
        if path.path != "network":
            reason = ""
            if not all(inside(self._device_regions, *part.spans("src")) for part in batch.parts):
                reason = "row copy source outside this daemon's exported device memory (host memory?)"
            else:
                keys = [(cuda().device_of(int(part.src_bases[0])) or 0, *_row_kernel_key(part)) for part in batch.parts]
                rows_result: BatchResult | str | None = None
                if self.launch == "loop" and all(k in self._compiled for k in keys):
                    rows_result = await self._on_loop(peer_session, path, lambda: self._launch_rows(
                        peer_session, path, batch))
                if rows_result is None:  # a copy thread launches (a compile, or new peer regions)
                    loop = asyncio.get_running_loop()
                    rows_result = await loop.run_in_executor(self._pool, self._same_node_rows, peer_session,
                                                             path, batch)
                    if isinstance(rows_result, BatchResult):
                        self._compiled.update(keys)
                if isinstance(rows_result, BatchResult):
                    path.batches["one_pass"] += 1
                    return path.count("same_node", rows_result)
                reason = rows_result
            self._fallback(peer_session, path, reason)
            if len(batch) > self.max_fallback_ops:
                # A one-pass room expanded to per-token ops over the network would take millions
                # of ops (and their memory): the room fails now, with the reason, instead.
                raise TransportError(f"same-node row copy to {peer_session} cannot go in one pass ({reason}); "
                                     f"{len(batch)} per-slice ops over {self.protocol} refused (set "
                                     "transport.one_pass = false to stage such rooms)")
        ops = batch.ops()
        return path.count("network", await self.network.write(peer_session, ops.src, ops.dst, ops.length))

    # --- launched by the event loop ---------------------------------------------------------------
    async def _on_loop(self, peer_session: str, path: PeerPath,
                       launch: Callable[[], tuple[int, int, Any, Any] | str | None]) -> BatchResult | str | None:
        """Launch a batch here (no GIL hand-over to a copy thread), then wait for its end event
        on a waiter thread: the loop goes on meanwhile. None: the batch needs a copy thread (a
        destination in a peer region not opened yet: opening it may take milliseconds)."""
        started = time.monotonic()
        t0 = time.perf_counter()
        try:
            launched = launch()
        except TransportError as exc:
            raise TransportError(f"same-node write to {peer_session} refused: {exc}") from exc
        except Exception as exc:  # torch / Triton / driver errors: the batch goes over the network
            return f"CUDA copy failed: {type(exc).__name__}: {exc}"
        if launched is None or isinstance(launched, str):
            return launched
        nbytes, ops, begin, end = launched
        try:
            await asyncio.get_running_loop().run_in_executor(self._waiters, end.synchronize)
            device_s = begin.elapsed_time(end) / 1e3
        except Exception as exc:  # a failed kernel surfaces at the sync: the bytes are unsure
            raise TransportError(f"same-node copy to {peer_session} failed on the device: {exc}") from exc
        return BatchResult(nbytes, ops, time.perf_counter() - t0, device_seconds=device_s, started=started,
                           ended=time.monotonic())

    @staticmethod
    def _loop_events(stream: Any) -> tuple[Any, Any]:
        """A fresh begin/end event pair, begin recorded (batches launched by the loop overlap, so
        they cannot share a thread's pair)."""
        import torch

        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        return begin, end

    def _launch_rows(self, peer_session: str, path: PeerPath,
                     batch: RowBatch) -> tuple[int, int, Any, Any] | str | None:
        """The row copies of a batch, launched on the loop's stream (indices uploaded from
        pageable memory: no wait on an earlier batch still copying on the same stream)."""
        import torch
        from kvd_kernels.copy_kernels import copy_rows_triton

        mapped = self._mapped_parts(peer_session, path, batch, refresh=False)
        if mapped is None:
            return None
        device, stream = self._source_stream(int(batch.parts[0].src_bases[0]))
        dev = torch.device("cuda", device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            begin, end = self._loop_events(stream)
            for part, dst_bases in mapped:
                n = int(part.src_rows.shape[0])
                both = np.concatenate((part.src_rows, part.dst_rows)).astype(np.int64, copy=False)
                rows = torch.from_numpy(both).to(dev, non_blocking=True)  # pageable: staged, no stream wait
                copy_rows_triton(part.src_bases.tolist(), dst_bases.tolist(), rows[:n], rows[n:], part.src_stride,
                                 part.dst_stride, part.src_offset, part.dst_offset, part.run, dev,
                                 rows_per_index=part.rows_per_index)
            end.record(stream)
        return batch.total_bytes, len(batch), begin, end

    def _memcpy_batch(self, length: np.ndarray) -> bool:
        """Whether a batch of ops goes as one cuMemcpyAsync per op (no kernel to compile)."""
        return len(length) <= self.memcpy_ops or int(length.sum()) >= len(length) << 20

    def _launch_memcpy(self, peer_session: str, path: PeerPath, src: np.ndarray, dst: np.ndarray,
                       length: np.ndarray) -> tuple[int, int, Any, Any] | str | None:
        mapped = self._destinations(peer_session, path, dst, length, refresh=False)
        if mapped is None:
            return None
        c = cuda()
        device, stream = self._source_stream(int(src[0]))
        begin, end = self._loop_events(stream)
        for s, d, n in zip(src.tolist(), mapped.tolist(), length.tolist(), strict=True):
            c.memcpy_async(d, s, n, stream.cuda_stream)
        end.record(stream)
        return int(length.sum()), len(src), begin, end

    def _mapped_parts(self, peer_session: str, path: PeerPath, batch: RowBatch,
                      refresh: bool = True) -> list[tuple[RowCopy, np.ndarray]] | None:
        """Each part with its destination bases in our mapping of the peer's pool (whole spans
        translated, so every row lands inside); None where a span is not in opened memory."""
        mapped = []
        for part in batch.parts:
            starts, lengths = part.spans("dst")
            ours = self._destinations(peer_session, path, starts, lengths, refresh=refresh)
            if ours is None:
                return None
            mapped.append((part, part.dst_bases + (ours - starts)))
        return mapped

    def _same_node_rows(self, peer_session: str, path: PeerPath, batch: RowBatch) -> BatchResult | str:
        """The row copies of one batch on the worker: each part's destination spans translated
        into our mapping of the peer's pool (whole spans, so every row lands inside), then one
        kernel per part, one stream sync for the batch."""
        started = time.monotonic()
        try:
            mapped = self._mapped_parts(peer_session, path, batch)
        except TransportError as exc:
            raise TransportError(f"same-node write to {peer_session} refused: {exc}") from exc
        if mapped is None:
            return f"destination outside the device memory {peer_session} exported (host pool?)"
        try:
            return replace(self._copy_rows(mapped), started=started, ended=time.monotonic())
        except TransportError as exc:
            return f"CUDA row copy failed: {exc}"

    def _copy_rows(self, parts: list[tuple[RowCopy, np.ndarray]]) -> BatchResult:
        import torch
        from kvd_kernels.copy_kernels import copy_rows_triton

        device, stream = self._source_stream(int(parts[0][0].src_bases[0]))
        t0 = time.perf_counter()
        nbytes = ops = 0
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                begin, end = self._timing_events(device)
                begin.record(stream)
                for part, dst_bases in parts:
                    copy_rows_triton(part.src_bases.tolist(), dst_bases.tolist(), part.src_rows, part.dst_rows,
                                     part.src_stride, part.dst_stride, part.src_offset, part.dst_offset, part.run,
                                     torch.device("cuda", device), rows_per_index=part.rows_per_index)
                    nbytes += part.total_bytes
                    ops += len(part)
                end.record(stream)
            stream.synchronize()
            device_s = begin.elapsed_time(end) / 1e3
        except Exception as exc:  # torch / Triton errors
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return BatchResult(nbytes, ops, time.perf_counter() - t0, device_seconds=device_s)

    def _same_node(self, peer_session: str, path: PeerPath, src: np.ndarray, dst: np.ndarray,
                   length: np.ndarray) -> BatchResult | str:
        """One worker-thread hop per batch: fence check, address translation, copy. A str is the
        reason the batch must go over the network instead; a revoked peer raises."""
        started = time.monotonic()
        try:
            mapped = self._destinations(peer_session, path, dst, length)
        except TransportError as exc:
            raise TransportError(f"same-node write to {peer_session} refused: {exc}") from exc
        if mapped is None:
            return f"destination outside the device memory {peer_session} exported (host pool?)"
        try:
            return replace(self._copy(src, mapped, length), started=started, ended=time.monotonic())
        except TransportError as exc:
            return f"CUDA copy failed: {exc}"

    # --- copies -------------------------------------------------------------------------------
    def _source_stream(self, src: int) -> tuple[int, Any]:
        """The GPU a batch reads from (current on this thread) and this thread's stream on it:
        copies run on the source device."""
        c = cuda()
        device = c.device_of(src)
        if device is None:
            raise TransportError(f"source {src:#x} is not device memory")
        c.use(device)
        return device, self._stream(device)

    def _per_thread(self, name: str, device: int, make: Callable[[], Any]) -> Any:
        """This thread's ``name`` object on ``device``, made once (each worker thread keeps its
        own stream and timing events; a batch syncs before the thread's next one)."""
        import torch

        cache = self._local.__dict__.setdefault(name, {})
        if device not in cache:
            with torch.cuda.device(device):
                cache[device] = make()
        return cache[device]

    def _timing_events(self, device: int) -> tuple[Any, Any]:
        import torch

        return self._per_thread("events", device, lambda: (torch.cuda.Event(enable_timing=True),
                                                            torch.cuda.Event(enable_timing=True)))

    def _stream(self, device: int) -> Any:
        import torch

        return self._per_thread("streams", device, lambda: torch.cuda.Stream(device=device))

    def _copy(self, src: np.ndarray, dst: np.ndarray, length: np.ndarray) -> BatchResult:
        import torch

        c = cuda()
        device, stream = self._source_stream(int(src[0]))
        t0 = time.perf_counter()
        try:
            # Few ops, or large ones (>= 1 MiB on average): one cuMemcpyAsync each runs at copy speed;
            # many small ops: one batched kernel launch.
            if self._memcpy_batch(length):
                for s, d, n in zip(src.tolist(), dst.tolist(), length.tolist(), strict=True):
                    c.memcpy_async(d, s, n, stream.cuda_stream)
            else:
                from kvd_kernels.copy_kernels import copy_ops_triton

                with torch.cuda.device(device), torch.cuda.stream(stream):
                    copy_ops_triton(src, dst, length, torch.device("cuda", device))
            stream.synchronize()
        except TransportError:
            raise
        except Exception as exc:  # torch / Triton errors
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return BatchResult(int(length.sum()), len(src), time.perf_counter() - t0)

    def close(self) -> None:
        if self._paths:
            log.info("same_node_totals", peers=self.paths())
        if self._endpoint is not None:
            self._endpoint.close()
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._waiters.shutdown(wait=True, cancel_futures=False)
        self._peers.clear()
        self.network.close()


def _row_kernel_key(part: RowCopy) -> tuple[int, ...]:
    """The compile key of a part's row-copy launch (``kvd_kernels.copy_kernels.copy_rows_key``),
    and the parity of its index count: both paths upload the source and destination rows as one
    array, so the destination rows' alignment (which Triton specialises pointers on) follows it."""
    from kvd_kernels.copy_kernels import copy_rows_key

    return (*copy_rows_key(part.src_bases.tolist(), part.dst_bases.tolist(),
                           int(part.src_rows.shape[0]) * part.rows_per_index, part.src_stride, part.dst_stride,
                           part.src_offset, part.dst_offset, part.run, part.rows_per_index),
            int(part.src_rows.shape[0]) % 2)


def with_endpoint(open_session: Callable[[], Transport]) -> Callable[[], Transport]:
    """Receive sessions (kvd.transfer.sessions) that same-node peers can find too: each session's
    memory is exported under the session's own id, and closing (revoking) the session closes that
    endpoint, so a same-node peer's next batch to it fails as a network write would."""

    def open_with_endpoint() -> Transport:
        return SameNodeTransport(open_session(), workers=1)

    return open_with_endpoint


def _conforms(transport: SameNodeTransport) -> Transport:  # checked by mypy: SameNodeTransport is a Transport
    return transport


def _writes_rows(transport: SameNodeTransport) -> RowWriter:  # and it takes row copies whole
    return transport

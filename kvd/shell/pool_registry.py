"""Every pool this daemon holds: its engines' pools, the decode pools peers announced, staging.

Opening, registering with the transport and closing an engine's pool; the staging pool
of each device (made on first use); and the lookups the room sides use. A closing pool
is unregistered only once no room can still read or write it (:meth:`reap`).

Opening and registering memory block (a CUDA IPC open, a Mooncake registration of GPU memory:
up to a second per region on the H100 host), so they run on one ``registrar`` thread, in
order, while the event loop keeps serving: :meth:`prepare` and :meth:`release` there,
:meth:`adopt` and the bookkeeping of :meth:`drop` on the loop. ``staging`` is replaced whole,
never changed in place, for the same reason.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from kvd.core.config import Config
from kvd.core.layout import LayoutError, PoolLayout
from kvd.mem.fdpool import ReceivedFd
from kvd.mem.memory import open_pool
from kvd.mem.opened import OpenedPool, PoolMemoryError
from kvd.mem.pools import LocalPool, RemotePool
from kvd.transfer.base import Transport

if TYPE_CHECKING:
    from kvd.mem.stagemem import KernelRunner, StagingPool

log = structlog.get_logger("kvd.pools")


@dataclass
class PreparedPool:
    """An engine's memory opened and registered off the loop, not yet one of the daemon's pools."""

    opened: OpenedPool
    tensors: Any = None  # the staging kernels' view of the buffers (torch), or None
    device: str = ""


class PoolRegistry:
    """Local pools by id, remote pools by key, staging pools by device."""

    def __init__(self, config: Config, transport: Callable[[], Transport]) -> None:
        self.config = config
        self._transport = transport
        self.local: dict[int, LocalPool] = {}
        self.remote_pools: dict[str, RemotePool] = {}
        #: When each remote pool was last announced or looked up (kvd.shell.directory forgets idle ones).
        self.remote_used: dict[str, float] = {}
        self.staging: dict[str, StagingPool] = {}
        self._kernels: KernelRunner | None = None
        self._next_id = 1
        #: Called with each engine pool once it is dropped (its prefill rank is withdrawn).
        self.drop_hooks: list[Callable[[LocalPool], None]] = []
        #: The one thread that opens, registers, unregisters and closes engine memory, in order.
        self.registrar = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvd-registrar")
        #: Set once the daemon stops: registrations still queued are refused, not carried out.
        self.stopping = False

    # --- lookups (what the room sides see) ---------------------------------------------------
    def prefill_pool(self, engine_id: str, rank: int) -> LocalPool | None:
        for pool in self.local.values():
            lay = pool.layout
            if lay.role == "prefill" and lay.engine_id == engine_id and lay.tp_rank == rank \
                    and not pool.closing:
                return pool
        return None

    def remote(self, pool_key: str) -> RemotePool | None:
        pool = self.remote_pools.get(pool_key)
        if pool is not None:
            self.remote_used[pool_key] = time.monotonic()
        return pool

    def prefill_layout(self, engine_id: str) -> PoolLayout | None:
        """Layout of any local rank of a prefill engine (ranks agree on everything but the rank)."""
        return next((p.layout for p in self.local.values() if p.layout.engine_id == engine_id), None)

    def staging_pool(self, pool: LocalPool) -> StagingPool | None:
        """The staging pool of a local pool's device (None: staging off for it)."""
        return self.staging.get(pool.device) if pool.device else None

    @property
    def kernels(self) -> KernelRunner:
        """The gather/scatter runner, made on first use (torch is imported only with staging on)."""
        if self._kernels is None:
            from kvd.mem.stagemem import KernelRunner

            self._kernels = KernelRunner(self.config.staging_kernel_threads)
        return self._kernels

    def send_ring_bytes(self) -> int:
        """The smallest send ring of this daemon's staging pools (0: no staging)."""
        return min((stage.send_capacity for stage in self.staging.values()), default=0)

    def kernel_seconds(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in (self._kernels.busy_s.items() if self._kernels else ())}

    # --- engine pools ------------------------------------------------------------------------
    def check_new(self, layout: PoolLayout) -> None:
        """LayoutError if the rank this pool would be is already registered."""
        if layout.role == "prefill" and self.prefill_pool(layout.engine_id, layout.tp_rank):
            raise LayoutError(f"prefill rank {layout.engine_id}/{layout.tp_rank} is already registered")

    def prepare(self, layout: PoolLayout, memory: dict[str, Any]) -> PreparedPool:
        """Open and register an engine's memory (blocking: run it on ``registrar``); raises
        PoolMemoryError / TransportError, with nothing left open or registered. Once the daemon
        stops, refused at once: a stop waits for the registrar, and each queued registration of
        GPU memory would hold it up to seconds (one per region) with the event loop blocked."""
        if self.stopping:
            close_held_fd(memory)
            raise PoolMemoryError("kvd is shutting down: the pool was not registered")
        opened = open_pool(layout, memory)
        transport = self._transport()
        registered: list[int] = []
        try:
            for base, length in opened.regions:
                transport.register(base, length)
                registered.append(base)
            tensors, device = None, ""
            # MLA rows are whole (no head slices to gather) and HiSparse writes tokens: neither
            # is ever staged, so neither needs this device's staging pool.
            if self.config.staging_enabled and not layout.hisparse and not layout.is_mla:
                from kvd.mem.stagemem import device_of, pool_tensors

                tensors, device = pool_tensors(layout, opened), device_of(opened)
                self._ensure_staging(device)
        except Exception:
            for base in registered:
                transport.unregister(base)
            opened.close()
            raise
        return PreparedPool(opened, tensors, device)

    def adopt(self, conn_id: int, layout: PoolLayout, prepared: PreparedPool, bootstrap: str,
              key_prefix: str) -> LocalPool:
        """Make prepared memory one of this daemon's pools (on the loop; no blocking call)."""
        pool_id = self._next_id
        self._next_id += 1
        pool = LocalPool(pool_id, f"{key_prefix}#{pool_id}", layout, prepared.opened, conn_id, bootstrap=bootstrap,
                         tensors=prepared.tensors, device=prepared.device)
        self.local[pool_id] = pool
        return pool

    def release_later(self, opened: OpenedPool) -> None:
        """:meth:`release` on the registrar, after what is queued there (a failure is logged; a
        registrar already shut down means the daemon is stopping, and the memory goes with it)."""
        try:
            future = self.registrar.submit(self.release, opened)
        except RuntimeError:
            return
        future.add_done_callback(_log_release_failure)

    def release(self, opened: OpenedPool) -> None:
        """Unregister and unmap memory nothing can use any more (blocking: run it on ``registrar``)."""
        transport = self._transport()
        for base, _ in opened.regions:
            transport.unregister(base)
        opened.close()

    def _ensure_staging(self, device: str) -> StagingPool:
        from kvd.mem.stagemem import StagingPool

        stage = self.staging.get(device)
        if stage is None:
            stage = StagingPool(device, self.config.staging_pool_bytes)
            self._transport().register(stage.base, stage.nbytes)
            self.staging = {**self.staging, device: stage}
            log.info("staging_ready", device=device, bytes=stage.nbytes, receive_bytes=stage.recv_bytes)
        return stage

    def drop(self, pool: LocalPool) -> None:
        """Forget a pool nothing uses any more; its memory is unregistered and unmapped on the
        registrar, after any registration queued before (an address reused by a new pool is
        registered after the old one is gone, in that order)."""
        self.local.pop(pool.pool_id, None)
        self.release_later(pool.opened)
        for hook in self.drop_hooks:
            try:
                hook(pool)
            except Exception:  # the pool is gone either way; a hook's bug is logged, not raised
                log.exception("pool_drop_hook_failed", pool=pool.key)

    @staticmethod
    def preload_gpu() -> str:
        """Import torch and initialise CUDA (slow: seconds), so that no CUDA IPC registration
        does it on the event loop; run it in a worker thread at start-up. What was found."""
        try:
            import torch
        except ImportError as exc:
            return f"torch unavailable: {exc}"
        if not torch.cuda.is_available():
            return f"torch {torch.__version__}, no CUDA device"
        torch.cuda.init()
        return f"torch {torch.__version__}, {torch.cuda.device_count()} CUDA device(s)"

    def pools_of(self, conn_id: int) -> list[LocalPool]:
        return [x for x in self.local.values() if x.conn_id == conn_id]

    def reap(self, busy: set[int]) -> bool:
        """Drop closing pools no room uses; True while some closing pool is still busy."""
        for pool in [x for x in self.local.values() if x.closing]:
            if pool.pool_id not in busy:
                self.drop(pool)
                log.info("pool_closed", pool=pool.key)
        return any(x.closing for x in self.local.values())

    def staging_figures(self) -> list[dict[str, Any]]:
        return [stage.stats() for stage in self.staging.values()]

    def close(self) -> None:
        self.stopping = True  # queued registrations are refused; only the one under way is waited for
        self.registrar.shutdown(wait=True)  # every queued release done before the transport closes
        for stage in self.staging.values():
            stage.close()
        if self._kernels is not None:
            self._kernels.close()
        for pool in self.local.values():
            pool.tensors = None
            pool.opened.close()


def close_held_fd(memory: Any) -> None:
    """Close the descriptor a registration that never ran was handed (a ReceivedFd)."""
    held = memory.get("fd") if isinstance(memory, dict) else None
    if isinstance(held, ReceivedFd):
        held.close()


def _log_release_failure(future: concurrent.futures.Future[None]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("pool_release_failed", error=f"{type(exc).__name__}: {exc}")


__all__ = ["PoolRegistry", "PreparedPool", "close_held_fd"]

"""What a room side may ask of the daemon: a small interface, not the daemon itself.

The sender and receiver sides see the daemon only through :class:`RoomContext`, about a
dozen named capabilities. The daemon implements it for production; the in-process pair
harness of the tests implements it with an in-memory peer queue and a memcpy transport.
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvd.core.config import Config
from kvd.core.layout import LayoutError
from kvd.core.rooms import RoomState
from kvd.mem.pools import LocalPool, RemotePool
from kvd.transfer.base import BatchResult, Transport
from kvd.wire import peer as wp
from kvd.wire.codec import Message
from kvd.wire.engine import RoomEvent

if TYPE_CHECKING:
    import asyncio

    from kvd.mem.stagemem import KernelRunner, StagingPool


class EngineNotReady(TimeoutError):
    """The prefill engine's ranks did not all register with its directory before the deadline."""


class LayoutConflict(LayoutError):
    """The prefill engine's ranks disagree on the layout: its rooms fail at once, not at timeout."""


class PoolRefused(LayoutError):
    """A sender daemon refused this decode pool (layouts that cannot be paired); names both."""


@dataclass(frozen=True)
class PoolAccepted:
    """A sender daemon's answer to a pool announce."""

    staging: bool  # both sides will take the staged path for this pool
    send_ring_bytes: int = 0  # the sender's send ring: a staged block must fit (0: unknown)
    one_pass: bool = False  # the sender writes head slices straight into this pool (same node, GPU)


class PoolLookup(Protocol):
    """The pools a side may touch: this daemon's prefill ranks and the decode pools peers announced."""

    def prefill_pool(self, engine_id: str, rank: int) -> LocalPool | None: ...
    def remote(self, pool_key: str) -> RemotePool | None: ...


class Bootstrap(Protocol):
    """Directory and pool-announce services a receiver room needs before it can ask for bytes."""

    async def engine_info(self, bootstrap: str, engine_id: str, deadline: float | None) -> wp.EngineInfo:
        """Every prefill rank's layout and daemon; raises EngineNotReady / LayoutConflict."""
        ...

    async def announce_pool(self, daemon: str, pool: LocalPool, engine_id: str,
                            deadline: float | None) -> PoolAccepted:
        """Announce a decode pool to a sender daemon once; what the sender agreed to."""
        ...

    def engine_info_now(self, bootstrap: str, engine_id: str) -> wp.EngineInfo | None:
        """The topology if it is known now (no query, no wait); None: ask with engine_info."""
        ...

    def pool_accepted_now(self, daemon: str, pool: LocalPool, engine_id: str) -> PoolAccepted | None:
        """What the sender agreed to, if the pool was announced to it and it is current; None:
        announce with announce_pool."""
        ...

    def forget_announce(self, daemon: str, pool_key: str) -> None:
        """The sender daemon does not know the pool any more: the next announce_pool sends it again."""
        ...


class RoomContext(Protocol):
    """The daemon as a room side sees it."""

    @property
    def config(self) -> Config: ...
    @property
    def pools(self) -> PoolLookup: ...
    @property
    def bootstrap(self) -> Bootstrap: ...
    @property
    def transport(self) -> Transport: ...
    @property
    def kernels(self) -> KernelRunner: ...

    def now(self) -> float: ...
    def send_peer(self, addr: str, msg: Message) -> None:
        """Queue a peer message; the peer hub stamps this daemon's ``src`` and ``token``."""
    def tell_engine(self, pool: LocalPool, event: RoomEvent) -> None: ...
    def count_error(self, kind: str) -> None: ...
    def room_changed(self, role: str, before: RoomState | None, after: RoomState, **ctx: Any) -> None: ...
    def observe_batch(self, result: BatchResult) -> None: ...
    def observe_inline(self, nbytes: int) -> None:
        """Bytes a sender put in a status message instead of a transport write."""
    def observe_room(self, seconds: float, nbytes: int) -> None:
        """A decode room succeeded after ``seconds`` with ``nbytes`` received."""
    def staging_pool(self, pool: LocalPool) -> StagingPool | None: ...
    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...
    async def revoke_peer(self, peer: str, reason: str) -> None:
        """Close ``peer``'s receive session: once this returns, no write from it can land here."""
        ...


__all__ = ["RoomContext", "PoolLookup", "Bootstrap", "PoolAccepted", "EngineNotReady", "LayoutConflict", "PoolRefused"]

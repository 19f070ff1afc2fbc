"""The transport interface the room sides write through, and what it returns and raises.

A transport moves batches of one-sided writes ``(src, dst, length)`` from memory registered
here into memory a peer registered with its own transport, named by the peer's
``session_id``. :class:`kvd.transfer.mooncake.MooncakeTransport` is the production one;
:class:`kvd.transfer.memcpy.MemcpyTransport` copies inside one process, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from kvd.core.rows import Plan, RowBatch

__all__ = ["BatchResult", "RowWriter", "Transport", "TransportError", "write_plan"]


class TransportError(RuntimeError):
    """The transport refused an operation; the message says which and, where known, the fix."""


@dataclass(frozen=True)
class BatchResult:
    """Bytes and time of one batch, measured together (a speed is never mixed across batches)."""

    nbytes: int
    ops: int
    seconds: float
    # time.monotonic() when the transport's worker took the batch and when it was done with it
    # (0: not measured): the queueing and hand-back around ``seconds`` (issue 14's timeline).
    started: float = 0.0
    ended: float = 0.0
    device_seconds: float = 0.0  # the copy's own time on the device (CUDA events; 0: not measured)


class Transport(Protocol):
    """What a daemon needs of a transport: register memory, write batches into a peer's, close."""

    session_id: str  # what peers pass as ``peer_session`` to write into this transport's memory
    protocol: str  # "tcp", "rdma", ... ("memcpy" in process)
    devices: str  # the devices actually used, for logs and ``kvctl status``

    def register(self, addr: int, length: int) -> None:
        """Make ``[addr, addr+length)`` writable by peers and readable as a source; idempotent per addr."""
        ...

    def unregister(self, addr: int) -> None:
        """Forget the region registered at ``addr`` (nothing if none is)."""
        ...

    async def write(self, peer_session: str, src: np.ndarray, dst: np.ndarray,
                    length: np.ndarray) -> BatchResult:
        """Write op ``i``: ``length[i]`` bytes from local ``src[i]`` to the peer's ``dst[i]``.

        Returns only once every byte is in place; raises :class:`TransportError` on failure.
        """
        ...

    def close(self) -> None:
        """Unregister everything and stop; no write may follow."""
        ...


@runtime_checkable
class RowWriter(Protocol):
    """A transport that can move a :class:`~kvd.core.rows.RowBatch` without expanding it
    (the same-node path: one copy kernel from our pool into the peer's mapped pool)."""

    async def write_rows(self, peer_session: str, batch: RowBatch) -> BatchResult:
        """Like :meth:`Transport.write` for every row of ``batch``; never partial on success."""
        ...


async def write_plan(transport: Transport, peer_session: str, plan: Plan) -> BatchResult:
    """Write a sender's plan: row copies to a transport that takes them whole, else as ops."""
    if isinstance(plan, RowBatch):
        if isinstance(transport, RowWriter):
            return await transport.write_rows(peer_session, plan)
        plan = plan.ops()
    return await transport.write(peer_session, plan.src, plan.dst, plan.length)

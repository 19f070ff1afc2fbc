"""Prefill engine directories and pool announces: how a receiver room learns whom to ask.

Two roles, one component:

* **Directory** (this daemon is a prefill engine's bootstrap): records which daemon serves
  each prefill rank (``RankAnnounce``), answers ``EngineQuery`` and remembers who asked
  while the engine is not complete, so that it can push the answer once the last rank
  registers (or the ranks turn out to disagree on the layout).
* **Client** (a decode room needs a prefill engine's topology): :meth:`engine_info` waits
  on an event, bounded by the room's deadline, that the pushed answer sets; a slow
  re-query covers a lost message or a directory of an older release that does not push.
  :meth:`announce_pool` announces a decode pool to a sender daemon once and waits for its
  ``PoolAck``. Failures are types (:class:`EngineNotReady`, :class:`LayoutConflict`,
  :class:`PoolRefused`), never substrings.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from kvd.core.config import Config
from kvd.core.layout import LayoutError, PoolLayout, check_compatible
from kvd.mem.pools import LocalPool, RemotePool
from kvd.shell.pool_registry import PoolRegistry
from kvd.sides.context import EngineNotReady, LayoutConflict, PoolRefused
from kvd.transfer.base import Transport
from kvd.wire import peer as wp
from kvd.wire.codec import Message

log = structlog.get_logger("kvd.directory")

#: A client re-asks a directory this often while it waits (pushed answers arrive at once).
REQUERY_S = 1.0


class Directory:
    def __init__(self, config: Config, registry: PoolRegistry, transport: Callable[[], Transport],
                 send_peer: Callable[[str, Message], None], count_error: Callable[[str], None],
                 now: Callable[[], float]) -> None:
        self.config = config
        self.registry = registry
        self._transport = transport
        self._send = send_peer
        self._count_error = count_error
        self._now = now
        self.address = ""
        # directory role: engine -> rank -> (layout, serving daemon); engine -> conflict text
        self.ranks: dict[str, dict[int, tuple[PoolLayout, str]]] = {}
        self.conflicts: dict[str, str] = {}
        self._watchers: dict[str, set[str]] = {}  # engine -> daemons waiting for it to be complete
        # client role
        self._info: dict[tuple[str, str], wp.EngineInfo] = {}
        self._refused: dict[tuple[str, str], str] = {}
        self._changed: dict[tuple[str, str], asyncio.Event] = {}
        self._announced: dict[tuple[str, str, str], asyncio.Future[bool]] = {}
        self._peer_staging: dict[tuple[str, str], bool] = {}

    def handlers(self) -> dict[type, Callable[..., None]]:
        return {wp.RankAnnounce: self.on_rank_announce, wp.EngineQuery: self.on_engine_query,
                wp.EngineInfo: self.on_engine_info, wp.PoolAnnounce: self.on_pool_announce,
                wp.PoolAck: self.on_pool_ack}

    # --- directory role ------------------------------------------------------------------------
    def announce_rank(self, layout: PoolLayout, directory: str) -> None:
        """A local prefill rank registered: tell its engine's directory (maybe this daemon)."""
        msg = wp.RankAnnounce(src=self.address, layout=layout.to_dict())
        if directory == self.address:
            self.on_rank_announce(msg)  # raises LayoutConflict: the engine's registration fails
        else:
            self._send(directory, msg)

    def on_rank_announce(self, msg: wp.RankAnnounce) -> None:
        """Record which daemon serves a prefill rank; ranks that disagree on the layout are refused
        and the conflict is reported to every decode daemon that asks (its rooms fail at once)."""
        layout = PoolLayout.from_dict(msg.layout)
        ranks = self.ranks.setdefault(layout.engine_id, {})
        shape = {k: v for k, v in layout.to_dict().items() if k != "tp_rank"}
        for other, _ in ranks.values():
            if other.tp_rank != layout.tp_rank and \
                    {k: v for k, v in other.to_dict().items() if k != "tp_rank"} != shape:
                self._count_error("layout")
                problem = (f"prefill ranks of engine {layout.engine_id!r} disagree on the layout: "
                           f"[{layout.describe()}] vs [{other.describe()}]")
                self.conflicts[layout.engine_id] = problem
                log.warning("rank_layout_mismatch", engine=layout.engine_id, error=problem)
                self._engine_changed(layout.engine_id)
                raise LayoutConflict(problem)
        ranks[layout.tp_rank] = (layout, msg.src)
        self._engine_changed(layout.engine_id)

    def _engine_changed(self, engine_id: str) -> None:
        """Push the answer to everyone waiting once the engine is complete or in conflict."""
        reply = self.engine_info_reply(engine_id)
        if not (reply.ready or reply.conflict):
            return
        for daemon in self._watchers.pop(engine_id, set()):
            self._send(daemon, reply)
        self._learn((self.address, engine_id), reply)

    def engine_info_reply(self, engine_id: str) -> wp.EngineInfo:
        ranks = self.ranks.get(engine_id, {})
        conflict = self.conflicts.get(engine_id, "")
        ready = not conflict and bool(ranks) and len(ranks) == next(iter(ranks.values()))[0].tp_size
        ordered = [ranks[r] for r in sorted(ranks)] if ready else []
        return wp.EngineInfo(src=self.address, engine_id=engine_id, ready=ready,
                             tp_size=ordered[0][0].tp_size if ordered else 0,
                             layouts=[lay.to_dict() for lay, _ in ordered], daemons=[d for _, d in ordered],
                             error=conflict or ("" if ranks else f"no rank of engine {engine_id!r} registered here"),
                             conflict=bool(conflict))

    def on_engine_query(self, msg: wp.EngineQuery) -> None:
        reply = self.engine_info_reply(msg.engine_id)
        if not (reply.ready or reply.conflict):
            self._watchers.setdefault(msg.engine_id, set()).add(msg.src)
        self._send(msg.src, reply)

    # --- client role ---------------------------------------------------------------------------
    def on_engine_info(self, msg: wp.EngineInfo) -> None:
        if msg.ready and (len(msg.layouts) != msg.tp_size or len(msg.daemons) != msg.tp_size):
            self._count_error("bad_peer_message")
            return
        self._learn((msg.src, msg.engine_id), msg)

    def _learn(self, key: tuple[str, str], msg: wp.EngineInfo) -> None:
        if msg.ready:
            self._info[key] = msg
        elif msg.conflict:
            self._refused[key] = msg.error
        else:
            return
        event = self._changed.pop(key, None)
        if event is not None:
            event.set()

    async def engine_info(self, bootstrap: str, engine_id: str, deadline: float | None) -> wp.EngineInfo:
        """Topology of a prefill engine once every rank is registered with its directory."""
        key = (bootstrap, engine_id)
        while True:
            if key in self._info:
                return self._info[key]
            if key in self._refused:
                raise LayoutConflict(self._refused[key])
            if bootstrap == self.address:
                self._learn(key, self.engine_info_reply(engine_id))
                if key in self._info or key in self._refused:
                    continue
            else:
                self._send(bootstrap, wp.EngineQuery(engine_id=engine_id))
            left = None if deadline is None else deadline - self._now()
            if left is not None and left <= 0:
                raise EngineNotReady(f"prefill engine {engine_id!r} at {bootstrap} did not become ready")
            event = self._changed.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), REQUERY_S if left is None else min(left, REQUERY_S))

    async def announce_pool(self, daemon: str, pool: LocalPool, engine_id: str, deadline: float | None) -> bool:
        """Announce a decode pool to a sender daemon once; True if both sides will stage."""
        key = (daemon, pool.key, engine_id)
        fut = self._announced.get(key)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = asyncio.get_running_loop().create_future()
            self._announced[key] = fut
            stage = self.registry.staging_pool(pool)
            self._send(daemon, wp.PoolAnnounce(
                pool_key=pool.key, layout=pool.layout.to_dict(), buffers=list(pool.buffers),
                session_id=self._transport().session_id, prefill_engine_id=engine_id,
                staging_base=stage.base if stage else 0, staging_bytes=stage.recv_bytes if stage else 0))
        timeout = max(0.1, deadline - self._now()) if deadline is not None else None
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            self._announced.pop(key, None)
            raise TimeoutError(f"prefill daemon {daemon} did not accept pool {pool.key}") from None
        return self.registry.staging_pool(pool) is not None and self._peer_staging.get((daemon, pool.key), False)

    def on_pool_announce(self, msg: wp.PoolAnnounce) -> None:
        error = ""
        try:
            layout = PoolLayout.from_dict(msg.layout)
            if len(msg.buffers) != layout.num_buffers:
                raise LayoutError(f"{len(msg.buffers)} buffers announced, layout has {layout.num_buffers}")
            ranks = self.ranks.get(msg.prefill_engine_id) or {}
            sender = self.registry.prefill_layout(msg.prefill_engine_id) or \
                next((lay for lay, _ in ranks.values()), None)
            if sender is None:
                raise LayoutError(f"no rank of prefill engine {msg.prefill_engine_id!r} is served here")
            check_compatible(sender, layout)
            if msg.staging_base < 0 or msg.staging_bytes < 0:
                raise LayoutError(f"staging range [{msg.staging_base}, +{msg.staging_bytes}) is invalid")
            self.registry.remote_pools[msg.pool_key] = RemotePool(
                msg.pool_key, layout, list(msg.buffers), msg.session_id, msg.src,
                staging_base=msg.staging_base, staging_bytes=msg.staging_bytes)
        except (LayoutError, ValueError) as exc:
            self._count_error("layout")
            error = str(exc)
        staging = not error and self.config.staging_enabled and msg.staging_bytes > 0 and bool(self.registry.staging)
        self._send(msg.src, wp.PoolAck(pool_key=msg.pool_key, ok=not error, error=error, staging=staging))

    def on_pool_ack(self, msg: wp.PoolAck) -> None:
        for (daemon, pool_key, _), fut in self._announced.items():
            if daemon == msg.src and pool_key == msg.pool_key and not fut.done():
                if msg.ok:
                    self._peer_staging[(daemon, pool_key)] = msg.staging
                    fut.set_result(True)
                else:
                    fut.set_exception(PoolRefused(msg.error))
                    fut.exception()  # retrieved: the room that awaits it reports it

    def peer_dead(self, peer: str) -> None:
        """Forget what a dead peer told us: it may come back with other ranks or pools."""
        self._info = {k: v for k, v in self._info.items() if k[0] != peer}
        self._refused = {k: v for k, v in self._refused.items() if k[0] != peer}
        self._announced = {k: v for k, v in self._announced.items() if k[0] != peer}


__all__ = ["Directory", "REQUERY_S"]

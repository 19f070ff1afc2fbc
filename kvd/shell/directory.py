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

Bounded both ways: a decode pool peers announced here is forgotten once no room uses it for
``peer.pool_idle_s``, or to make room past ``peer.max_pools`` of one peer, and the peer is told
(``PoolAck.forgotten``); an announce of a pool that is gone here (its engine left), or that the
sender daemon forgot, is dropped, so the next room announces it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet

import structlog

from kvd.core.config import Config
from kvd.core.layout import MAX_ENGINE_ID, LayoutError, PoolLayout, check_compatible
from kvd.mem.pools import LocalPool, RemotePool
from kvd.shell.pool_registry import PoolRegistry
from kvd.sides.context import EngineNotReady, LayoutConflict, PoolAccepted, PoolRefused
from kvd.wire import peer as wp
from kvd.wire.codec import Message

log = structlog.get_logger("kvd.directory")

#: A client re-asks a directory this often while it waits (pushed answers arrive at once).
REQUERY_S = 1.0
#: Daemons remembered per engine as waiting for it, or as holding an answer to update.
MAX_ASKERS = 4096
#: Engines not complete yet whose askers are remembered (past this, an asker is answered but
#: not remembered: it asks again every REQUERY_S anyway).
MAX_WATCHED_ENGINES = 4096
#: Longest engine id or pool key a peer may name (engines' own are held to the same on the socket).
MAX_NAME = MAX_ENGINE_ID


def _name_problem(what: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        return f"{what} must be a non-empty string of at most {MAX_NAME} characters, got {str(value)[:80]!r}"
    return ""


def _shape(layout: PoolLayout) -> dict[str, object]:
    """What every rank of one engine must agree on: the layout but the rank."""
    return {k: v for k, v in layout.to_dict().items() if k != "tp_rank"}


class _TooManyPools(LayoutError):
    """An announce past ``peer.max_pools`` of its peer, every pool of which rooms use."""


class _Abandoned(Exception):
    """A pool announce whose room was cancelled before the announce was sent."""


def _retrieve(fut: asyncio.Future[bool]) -> None:
    """Mark an announce's failure as seen (waiters may all be gone)."""
    if not fut.cancelled():
        fut.exception()


class Directory:
    def __init__(self, config: Config, registry: PoolRegistry, receive_session: Callable[[str], Awaitable[str]],
                 send_peer: Callable[[str, Message], None], count_error: Callable[[str], None],
                 now: Callable[[], float]) -> None:
        self.config = config
        self.registry = registry
        self._receive_session = receive_session
        self._send = send_peer
        self._count_error = count_error
        self._now = now
        self.address = ""
        # directory role: engine -> rank -> (layout, serving daemon); engine -> conflict text
        self.ranks: dict[str, dict[int, tuple[PoolLayout, str]]] = {}
        self._rank_pool: dict[tuple[str, int], str] = {}  # (engine, rank) -> the announced pool's key
        self.conflicts: dict[str, str] = {}  # engine -> the last refused rank's problem (while incomplete)
        self._watchers: dict[str, set[str]] = {}  # engine -> daemons waiting for it to be complete
        self._told: dict[str, set[str]] = {}  # engine -> daemons holding a ready answer (told of changes)
        # client role
        self._info: dict[tuple[str, str], wp.EngineInfo] = {}
        self._refused: dict[tuple[str, str], tuple[str, float]] = {}  # conflict text, when learnt
        #: Whether a peer was heard from (same incarnation) within some seconds; the daemon wires
        #: the peer hub's in. Cached answers of a peer not heard from lately are asked again.
        self.current: Callable[[str, float], bool] = lambda peer, within: True
        #: Whether a peer is alive (heard from, not declared dead, not forgotten); the daemon wires
        #: the peer hub's in. A rank whose serving daemon is not may change hands, or shape.
        self.alive: Callable[[str], bool] = lambda peer: True
        #: Whether this daemon's transport reaches a peer's receive session on this machine, and
        #: whether addresses are device memory it can copy GPU to GPU (the daemon wires the
        #: same-node transport's in; off: never). Both hold: head slices go in one pass.
        self.same_node_peer: Callable[[str], bool] = lambda session: False
        self.device_memory: Callable[[list[int]], bool] = lambda addresses: False
        self._changed: dict[tuple[str, str], asyncio.Event] = {}
        # (directory, engine) -> when it was last asked: rooms waiting on one engine share its
        # queries (one per REQUERY_S, not one per room).
        self._queried: dict[tuple[str, str], float] = {}
        self._announced: dict[tuple[str, str, str], asyncio.Future[bool]] = {}
        self._accepted: dict[tuple[str, str], PoolAccepted] = {}
        #: Remote pool keys that rooms in flight here write into (never forgotten); the daemon wires it.
        self.pools_in_use: Callable[[], AbstractSet[str]] = set
        #: Idle remote pools whose announcer was told they are forgotten, and when: they stay
        #: usable for a grace, so that a request it sent before the notice reached it still
        #: finds its pool (a request naming one revives it).
        self._forgetting: dict[str, float] = {}

    def handlers(self) -> dict[type, Callable[..., None]]:
        return {wp.RankAnnounce: self.on_rank_announce, wp.EngineQuery: self.on_engine_query,
                wp.EngineInfo: self.on_engine_info, wp.PoolAnnounce: self.on_pool_announce,
                wp.PoolAck: self.on_pool_ack}

    # --- directory role ------------------------------------------------------------------------
    def announce_rank(self, layout: PoolLayout, directory: str, pool_key: str = "") -> None:
        """A local prefill rank registered: tell its engine's directory (maybe this daemon)."""
        msg = wp.RankAnnounce(src=self.address, layout=layout.to_dict(), pool_key=pool_key)
        if directory == self.address:
            self.on_rank_announce(msg)  # raises LayoutConflict: this rank's registration fails
        else:
            self._send(directory, msg)

    def withdraw_rank(self, layout: PoolLayout, directory: str, pool_key: str) -> None:
        """A local prefill rank's pool is gone: its directory forgets the rank (an engine that
        registers again, maybe with another layout, is not refused because of it)."""
        msg = wp.RankAnnounce(src=self.address, layout=layout.to_dict(), pool_key=pool_key, withdraw=True)
        if directory == self.address:
            self.on_rank_announce(msg)
        else:
            self._send(directory, msg)

    def on_rank_announce(self, msg: wp.RankAnnounce) -> None:
        """Record which daemon serves a prefill rank, replacing what that rank announced before.

        A rank whose layout disagrees with the engine's other ranks is refused (a local one
        with LayoutConflict: its registration fails); the others keep their entries, and the
        conflict is reported to decode daemons only while the engine is incomplete. Nothing is
        sticky: a withdraw, a re-registration or the announcing daemon's restart heals it."""
        layout = PoolLayout.from_dict(msg.layout)
        engine, rank = layout.engine_id, layout.tp_rank
        if problem := _name_problem("engine_id", engine):
            raise LayoutError(problem)
        ranks = self.ranks.setdefault(engine, {})
        if msg.withdraw:
            entry = ranks.get(rank)
            if entry is not None and entry[1] == msg.src and self._rank_pool.get((engine, rank), "") == msg.pool_key:
                del ranks[rank]
                self._rank_pool.pop((engine, rank), None)
                log.info("rank_withdrawn", engine=engine, rank=rank, daemon=msg.src)
                self._engine_changed(engine)
            if not ranks:
                self.ranks.pop(engine, None)
            return
        if ranks.get(rank) == (layout, msg.src) and self._rank_pool.get((engine, rank)) == msg.pool_key:
            return  # announced again (its daemon does so now and then): nothing changed
        shape = _shape(layout)
        gone = [r for r, (other, daemon) in ranks.items()
                if r != rank and _shape(other) != shape and daemon not in (self.address, msg.src)
                and not self.alive(daemon)]
        for other_rank in gone:
            # The engine came back in another shape after the node that served these ranks was
            # lost: a daemon that is dead (or forgotten) withdraws nothing, so they go here.
            log.info("rank_forgotten", engine=engine, rank=other_rank, daemon=ranks[other_rank][1],
                     reason="its daemon is dead")
            del ranks[other_rank]
            self._rank_pool.pop((engine, other_rank), None)
        for other_rank, (other, _) in ranks.items():
            if other_rank != rank and _shape(other) != shape:
                self._count_error("layout")
                problem = (f"prefill rank {rank} of engine {engine!r} disagrees with rank {other_rank} on "
                           f"the layout: [{layout.describe()}] vs [{other.describe()}]; rank {rank} refused")
                self.conflicts[engine] = problem
                log.warning("rank_layout_mismatch", engine=engine, daemon=msg.src, error=problem)
                self._engine_changed(engine)
                raise LayoutConflict(problem)
        before = ranks.get(rank)
        ranks[rank] = (layout, msg.src)
        self._rank_pool[(engine, rank)] = msg.pool_key
        if before is not None and before != (layout, msg.src):
            log.info("rank_replaced", engine=engine, rank=rank, daemon=msg.src, previous=before[1])
        self._engine_changed(engine)

    def rank_owners(self) -> set[str]:
        """Other daemons serving ranks of engines this daemon is the directory of: watched by
        heartbeat, so that a lost one is declared dead and its ranks may move."""
        return {daemon for ranks in self.ranks.values() for _, daemon in ranks.values()} - {self.address}

    def _engine_changed(self, engine_id: str) -> None:
        """Tell everyone who waits for the engine, or holds an answer about it, what it looks like now."""
        reply = self.engine_info_reply(engine_id)
        if reply.ready:
            self.conflicts.pop(engine_id, None)  # the engine is whole and consistent again
        waiting = self._watchers.pop(engine_id, set()) if reply.ready or reply.conflict else set()
        for daemon in waiting | self._told.get(engine_id, set()):
            self._send(daemon, reply)
        if reply.ready:
            self._told.setdefault(engine_id, set()).update(waiting)
        self._learn((self.address, engine_id), reply)

    def engine_info_reply(self, engine_id: str) -> wp.EngineInfo:
        ranks = self.ranks.get(engine_id, {})
        first = next(iter(ranks.values()))[0] if ranks else None
        ready = first is not None and len(ranks) == first.tp_size and set(ranks) == set(range(first.tp_size))
        conflict = "" if ready else self.conflicts.get(engine_id, "")
        ordered = [ranks[r] for r in sorted(ranks)] if ready else []
        return wp.EngineInfo(src=self.address, engine_id=engine_id, ready=ready,
                             tp_size=ordered[0][0].tp_size if ordered else 0,
                             layouts=[lay.to_dict() for lay, _ in ordered], daemons=[d for _, d in ordered],
                             error=conflict or ("" if ranks else f"no rank of engine {engine_id!r} registered here"),
                             conflict=bool(conflict))

    def on_engine_query(self, msg: wp.EngineQuery) -> None:
        if problem := _name_problem("engine_id", msg.engine_id):
            self._count_error("bad_peer_message")
            log.warning("engine_query_refused", src=msg.src, error=problem)
            return
        reply = self.engine_info_reply(msg.engine_id)
        askers = self._told if reply.ready else self._watchers
        if msg.engine_id in askers or reply.ready or len(askers) < MAX_WATCHED_ENGINES:
            daemons = askers.setdefault(msg.engine_id, set())
            if len(daemons) < MAX_ASKERS:  # decode daemons of a cluster; a flood of names is not kept
                daemons.add(msg.src)
        self._send(msg.src, reply)

    # --- client role ---------------------------------------------------------------------------
    def on_engine_info(self, msg: wp.EngineInfo) -> None:
        if problem := _name_problem("engine_id", msg.engine_id):
            self._count_error("bad_peer_message")
            log.warning("engine_info_refused", src=msg.src, error=problem)
            return
        key = (msg.src, msg.engine_id)
        if key not in self._queried and key not in self._info and key not in self._refused:
            # A directory answers (and later updates) only those that asked it: an answer nobody
            # here asked for is not kept, or a peer could fill the cache with answers of any size.
            self._count_error("stale_message")
            return
        if msg.ready and not _topology_adds_up(msg):
            # Rooms waiting on it fail at once with the reason, not at their deadline.
            self._count_error("bad_peer_message")
            log.warning("engine_info_refused", src=msg.src, engine=msg.engine_id, tp_size=msg.tp_size,
                        ranks=len(msg.layouts))
            msg = dataclasses.replace(msg, ready=False, conflict=True, error=(
                f"directory {msg.src} answered an unusable topology for engine {msg.engine_id!r} "
                f"(tp_size {msg.tp_size}, {len(msg.layouts)} layouts, {len(msg.daemons)} daemons)"))
        self._learn(key, msg)

    def _learn(self, key: tuple[str, str], msg: wp.EngineInfo) -> None:
        """Keep the newest answer about an engine: ready, in conflict, or neither (what was
        cached before is stale: the engine changed)."""
        self._refused.pop(key, None)
        if msg.ready:
            if key not in self._info and len(self._info) >= MAX_WATCHED_ENGINES:
                del self._info[next(iter(self._info))]  # the oldest answer: asked again if needed
            self._info[key] = msg
        else:
            self._info.pop(key, None)
            if msg.conflict:
                if len(self._refused) >= MAX_WATCHED_ENGINES:
                    del self._refused[next(iter(self._refused))]
                self._refused[key] = (msg.error, self._now())
            else:
                return
        event = self._changed.pop(key, None)
        if event is not None:
            event.set()

    def _cached(self, key: tuple[str, str]) -> wp.EngineInfo | None:
        """A cached answer, if the directory daemon is known to be the same incarnation still."""
        info = self._info.get(key)
        if info is not None and not self.current(key[0], self.config.heartbeat_timeout_s):
            del self._info[key]  # idle for a while: it may have restarted; ask again
            return None
        return info

    async def engine_info(self, bootstrap: str, engine_id: str, deadline: float | None) -> wp.EngineInfo:
        """Topology of a prefill engine once every rank is registered with its directory."""
        key = (bootstrap, engine_id)
        while True:
            if (info := self._cached(key)) is not None:
                return info
            refused = self._refused.get(key)
            if refused is not None and self._now() - refused[1] < REQUERY_S:
                raise LayoutConflict(refused[0])
            if bootstrap == self.address:
                self._learn(key, self.engine_info_reply(engine_id))
                if key in self._info or key in self._refused:
                    continue
            elif self._now() - self._queried.get(key, float("-inf")) >= REQUERY_S * 0.9:
                if len(self._queried) >= MAX_WATCHED_ENGINES:
                    self._queried.clear()
                self._queried[key] = self._now()
                self._send(bootstrap, wp.EngineQuery(engine_id=engine_id))
            left = None if deadline is None else deadline - self._now()
            if left is not None and left <= 0:
                raise EngineNotReady(f"prefill engine {engine_id!r} at {bootstrap} did not become ready")
            event = self._changed.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), REQUERY_S if left is None else min(left, REQUERY_S))

    async def announce_pool(self, daemon: str, pool: LocalPool, engine_id: str,
                            deadline: float | None) -> PoolAccepted:
        """Announce a decode pool to a sender daemon once, naming the receive session meant for
        that daemon alone (revoking it is the write fence); what the sender agreed to."""
        key = (daemon, pool.key, engine_id)
        while True:
            fut = self._announced.get(key)
            if fut is not None and fut.done() and not self.current(daemon, self.config.heartbeat_timeout_s):
                fut = None  # not heard from lately: it may have restarted and forgotten the pool
            if fut is None or (fut.done() and fut.exception() is not None):
                fut = asyncio.get_running_loop().create_future()
                fut.add_done_callback(_retrieve)
                self._announced[key] = fut
                stage = self.registry.staging_pool(pool)
                try:
                    session = await self._receive_session(daemon)
                except BaseException as exc:
                    # Other rooms may wait on this announce: they must not wait for one that is
                    # never sent (this room cancelled meanwhile: they start it again; an error:
                    # they fail with it).
                    self._announced.pop(key, None)
                    if not fut.done():
                        fut.set_exception(_Abandoned() if isinstance(exc, asyncio.CancelledError) else exc)
                    raise
                self._send(daemon, wp.PoolAnnounce(
                    pool_key=pool.key, layout=pool.layout.to_dict(), buffers=list(pool.buffers),
                    session_id=session, prefill_engine_id=engine_id,
                    staging_base=stage.base if stage else 0, staging_bytes=stage.recv_bytes if stage else 0))
            timeout = max(0.1, deadline - self._now()) if deadline is not None else None
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            except _Abandoned:
                continue  # the room that began the announce went away before sending it
            except TimeoutError:
                self._announced.pop(key, None)
                raise TimeoutError(f"prefill daemon {daemon} did not accept pool {pool.key}") from None
            break
        return self._agreed(daemon, pool)

    def _agreed(self, daemon: str, pool: LocalPool) -> PoolAccepted:
        """What ``daemon`` agreed to for ``pool`` (staging only while this side still has it)."""
        accepted = self._accepted.get((daemon, pool.key), PoolAccepted(False))
        return PoolAccepted(accepted.staging and self.registry.staging_pool(pool) is not None,
                            accepted.send_ring_bytes, accepted.one_pass and self.device_memory(pool.buffers))

    def engine_info_now(self, bootstrap: str, engine_id: str) -> wp.EngineInfo | None:
        return self._cached((bootstrap, engine_id))

    def pool_accepted_now(self, daemon: str, pool: LocalPool, engine_id: str) -> PoolAccepted | None:
        fut = self._announced.get((daemon, pool.key, engine_id))
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None \
                or not self.current(daemon, self.config.heartbeat_timeout_s):
            return None
        return self._agreed(daemon, pool)

    def on_pool_announce(self, msg: wp.PoolAnnounce) -> None:
        error = ""
        one_pass = False
        try:
            if problem := _name_problem("pool_key", msg.pool_key) or _name_problem(
                    "prefill_engine_id", msg.prefill_engine_id) or _name_problem("session_id", msg.session_id):
                raise LayoutError(problem)
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
            if msg.pool_key not in self.registry.remote_pools:
                self._make_room_for_pool(msg.src)
            self.registry.remote_used[msg.pool_key] = self._now()
            self.registry.remote_pools[msg.pool_key] = RemotePool(
                msg.pool_key, layout, list(msg.buffers), msg.session_id, msg.src,
                staging_base=msg.staging_base, staging_bytes=msg.staging_bytes)
            # One pass needs the decode daemon on this machine and this engine's pools in GPU
            # memory here (the decode side checks its own pool before it relies on it).
            ours = [b for p in self.registry.local.values() if p.layout.engine_id == msg.prefill_engine_id
                    and p.layout.role == "prefill" for b in p.buffers]
            one_pass = bool(ours) and self.same_node_peer(msg.session_id) and self.device_memory(ours)
        except (LayoutError, ValueError) as exc:
            self._count_error("peer_pools" if isinstance(exc, _TooManyPools) else "layout")
            error = str(exc)
        staging = not error and self.config.staging_enabled and msg.staging_bytes > 0 and bool(self.registry.staging)
        self._send(msg.src, wp.PoolAck(pool_key=msg.pool_key, ok=not error, error=error, staging=staging,
                                       send_ring_bytes=self.registry.send_ring_bytes(), one_pass=one_pass))

    def _make_room_for_pool(self, peer: str) -> None:
        """At ``peer.max_pools`` of ``peer``: forget the one it used longest ago that no room
        uses; raises LayoutError (the announce is refused) when every one is in use."""
        mine = [k for k, pool in self.registry.remote_pools.items() if pool.daemon == peer]
        if len(mine) < self.config.peer_max_pools:
            return
        in_use = self.pools_in_use()
        idle = [(self.registry.remote_used.get(k, 0.0), k) for k in mine if k not in in_use]
        if not idle:
            raise _TooManyPools(f"{peer} has {len(mine)} decode pools announced here, every one in use "
                              f"(peer.max_pools {self.config.peer_max_pools})")
        self._forget_pool(min(idle)[1], f"peer.max_pools {self.config.peer_max_pools}", at_once=True)

    def _forget_pool(self, key: str, reason: str, *, at_once: bool = False) -> None:
        """Tell a remote pool's announcer it is forgotten (it announces it again if it needs it);
        the pool goes after a grace of two heartbeat timeouts, or ``at_once`` (``peer.max_pools``),
        unless a request or announce names it meanwhile. An announcer of an older release ignores
        the notice: its next room there after the pool went fails, once."""
        pool = self.registry.remote_pools.get(key)
        self.registry.remote_used.pop(key, None)
        if pool is None:
            return
        if at_once:
            del self.registry.remote_pools[key]
            self._forgetting.pop(key, None)
        elif key in self._forgetting:
            return
        else:
            self._forgetting[key] = self._now()
        log.info("remote_pool_forgotten", pool=key, daemon=pool.daemon, reason=reason)
        self._send(pool.daemon, wp.PoolAck(pool_key=key, ok=False, forgotten=True,
                                           error=f"pool {key} forgotten ({reason})"))

    def expire_pools(self, now: float) -> None:
        """Forget the remote pools no room in flight uses and none was named for
        ``peer.pool_idle_s``; drop those whose notice is older than the grace and unused since."""
        grace = 2 * self.config.heartbeat_timeout_s
        for key, told in list(self._forgetting.items()):
            if key in self.registry.remote_used or key not in self.registry.remote_pools:
                del self._forgetting[key]  # named again since the notice (revived), or gone
            elif now - told >= grace:
                del self._forgetting[key]
                del self.registry.remote_pools[key]
        idle_s = self.config.peer_pool_idle_s
        stale = [k for k, used in self.registry.remote_used.items() if now - used >= idle_s]
        if stale:
            in_use = self.pools_in_use()
            for key in stale:
                if key in in_use:
                    self.registry.remote_used[key] = now
                else:
                    self._forget_pool(key, f"unused for {idle_s:g} s")

    def pool_dropped(self, pool: LocalPool) -> None:
        """A local pool is gone (its engine left): forget its announces (the key is never reused)."""
        self._announced = {k: v for k, v in self._announced.items() if k[1] != pool.key}
        self._accepted = {k: v for k, v in self._accepted.items() if k[1] != pool.key}

    def forget_announce(self, daemon: str, pool_key: str) -> None:
        """Forget that ``daemon`` accepted ``pool_key`` (it forgot the pool, or restarted): the
        next announce_pool sends it again. An announce in flight is left alone (it is answered
        after this)."""
        for key in [k for k, fut in self._announced.items() if k[0] == daemon and k[1] == pool_key and fut.done()]:
            del self._announced[key]
        self._accepted.pop((daemon, pool_key), None)

    def announces(self) -> int:
        return len(self._announced)

    def on_pool_ack(self, msg: wp.PoolAck) -> None:
        if msg.forgotten:
            # The sender daemon forgot an accepted pool: the next room announces it again.
            self.forget_announce(msg.src, msg.pool_key)
            return
        for (daemon, pool_key, _), fut in self._announced.items():
            if daemon == msg.src and pool_key == msg.pool_key and not fut.done():
                if msg.ok:
                    self._accepted[(daemon, pool_key)] = PoolAccepted(msg.staging, msg.send_ring_bytes, msg.one_pass)
                    fut.set_result(True)
                else:
                    fut.set_exception(PoolRefused(msg.error))
                    fut.exception()  # retrieved: the room that awaits it reports it

    def peer_dead(self, peer: str) -> None:
        """Forget what a dead peer told us: it may come back with other ranks or pools."""
        self._info = {k: v for k, v in self._info.items() if k[0] != peer}
        self._refused = {k: v for k, v in self._refused.items() if k[0] != peer}
        self._announced = {k: v for k, v in self._announced.items() if k[0] != peer}

    def peer_restarted(self, peer: str) -> None:
        """``peer`` is a new incarnation: drop everything its old one told us, in both roles
        (the ranks it served here, the pools it announced, what we learnt from it)."""
        self.peer_dead(peer)
        self._accepted = {k: v for k, v in self._accepted.items() if k[0] != peer}
        for engine in [e for e, ranks in self.ranks.items() if any(d == peer for _, d in ranks.values())]:
            ranks = self.ranks[engine]
            for rank in [r for r, (_, d) in ranks.items() if d == peer]:
                del ranks[rank]
                self._rank_pool.pop((engine, rank), None)
            log.info("ranks_forgotten", engine=engine, daemon=peer, reason="restarted")
            if not ranks:
                del self.ranks[engine]
            self._engine_changed(engine)
        for told in self._told.values():
            told.discard(peer)
        dropped = [k for k, pool in self.registry.remote_pools.items() if pool.daemon == peer]
        for key in dropped:
            del self.registry.remote_pools[key]
            self.registry.remote_used.pop(key, None)
        if dropped:
            log.info("remote_pools_forgotten", daemon=peer, pools=len(dropped), reason="restarted")


def _topology_adds_up(msg: wp.EngineInfo) -> bool:
    """A ready answer names every rank once, in order, with layouts of that TP size."""
    if msg.tp_size < 1 or len(msg.layouts) != msg.tp_size or len(msg.daemons) != msg.tp_size:
        return False
    try:
        return all(lay.get("tp_size") == msg.tp_size and lay.get("tp_rank") == i
                   for i, lay in enumerate(msg.layouts))
    except AttributeError:
        return False


__all__ = ["Directory", "REQUERY_S"]

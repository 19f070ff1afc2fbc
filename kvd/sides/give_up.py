"""Telling prefill ranks that a decode room was given up before it asked them.

A decode room that fails before its requests went out (an engine abort while bootstrapping, a
recv the daemon refused) was never asked of any sender rank: nothing of theirs can land in its
pages, but each prefill engine's room of that id (a GQA replica's too) waits for a request,
holding its pages until its waiting deadline. An ``AbortTransfer`` naming the prefill engine
(protocol 7) ends it at once. The ranks are the room's links or, failed before it linked them,
what the directory knows (or learns, within the bootstrap timeout) of the prefill engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from kvd.core.layout import LayoutError, PoolLayout, check_compatible
from kvd.core.planner import PlanError, map_heads
from kvd.sides.context import RoomContext
from kvd.wire import peer as wp

#: Rooms given up before their prefill engine was known: engines waited for at once, and rooms
#: per engine. Past either, a prefill room ends at its own deadline.
GIVE_UP_ENGINES = 64
GIVE_UP_ROOMS = 1024


class GivenUp(NamedTuple):
    """What telling the sender ranks of a given-up room takes (not the room: its indices)."""

    room: int
    transfer_id: int
    pool_key: str
    layout: PoolLayout
    prefill_engine_id: str
    reason: str


class GiveUpNotices:
    """Sends the give-ups of one daemon's receiver rooms; one task per unknown prefill engine."""

    def __init__(self, ctx: RoomContext, layouts: Callable[[wp.EngineInfo], list[PoolLayout]]) -> None:
        self.ctx = ctx
        self._layouts = layouts
        # Rooms given up before their prefill engine was known here, per (bootstrap, engine):
        # one task per engine waits for the directory's answer, whatever the number of rooms an
        # engine opens and aborts meanwhile (bounded: GIVE_UP_* above).
        self._waiting: dict[tuple[str, str], list[GivenUp]] = {}

    @property
    def waiting(self) -> int:
        """Give-ups waiting for their prefill engine's topology (kvctl-style observability, tests)."""
        return sum(len(notes) for notes in self._waiting.values())

    def to_links(self, note: GivenUp, ranks: list[tuple[int, str]]) -> None:
        """Tell the ranks ``(sender rank, daemon)`` the room linked before it failed."""
        for rank, daemon in ranks:
            self.ctx.send_peer(daemon, wp.AbortTransfer(
                room=note.room, transfer_id=note.transfer_id, pool_key=note.pool_key, sender_rank=rank,
                reason=note.reason, prefill_engine_id=note.prefill_engine_id))

    def to_engine(self, bootstrap_addr: str, note: GivenUp) -> None:
        """Tell every rank of the prefill engine the room would have asked, once it is known."""
        info = self.ctx.bootstrap.engine_info_now(bootstrap_addr, note.prefill_engine_id)
        if info is not None:
            self.to_links(note, self._notified_by(note.layout, info))
            return
        key = (bootstrap_addr, note.prefill_engine_id)
        waiting = self._waiting.get(key)
        if waiting is None:
            if len(self._waiting) >= GIVE_UP_ENGINES:
                return  # (bounded: those prefill rooms end at their own deadline)
            waiting = self._waiting[key] = []
            self.ctx.spawn(self._when_known(key), f"give-up-{note.prefill_engine_id}")
        if len(waiting) < GIVE_UP_ROOMS:
            waiting.append(note)

    async def _when_known(self, key: tuple[str, str]) -> None:
        deadline = self.ctx.now() + self.ctx.config.bootstrap_timeout_s
        try:
            info = await self.ctx.bootstrap.engine_info(key[0], key[1], deadline)
        except Exception:  # noqa: BLE001 - the engine never became known: nobody to tell
            return
        finally:
            notes = self._waiting.pop(key, [])
        for note in notes:
            self.to_links(note, self._notified_by(note.layout, info))

    def flush(self, bootstrap_addr: str, prefill_engine_id: str, info: wp.EngineInfo) -> None:
        """Send the give-ups waiting for this engine's topology now that it is known: before any
        request of a room of that engine goes out (the request of a reissued id must not overtake
        the give-up of the old one: the prefill side reads a giving daemon's messages in order)."""
        for note in self._waiting.pop((bootstrap_addr, prefill_engine_id), []):
            self.to_links(note, self._notified_by(note.layout, info))

    def _notified_by(self, layout: PoolLayout, info: wp.EngineInfo) -> list[tuple[int, str]]:
        """The prefill ranks (and their daemons) a decode rank of ``layout`` asks, dummies included."""
        try:
            check_compatible(self._layouts(info)[0], layout)
            mapping = map_heads(layout.total_kv_heads, info.tp_size, layout.tp_size)
            return [(s, info.daemons[s]) for s in mapping.notified_senders(layout.tp_rank)]
        except (PlanError, LayoutError, ValueError, IndexError):
            return []  # it could never have been served: its sender ranks fail it themselves

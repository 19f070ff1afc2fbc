"""Transfer state machine per room, kept as data; completion accounting per sender rank.

Everything that decides a room's state lives here (like h11's ``_state.py``): the
states, the inputs, one transition table, and the deadline of every non-final
state. The daemon feeds inputs and reads states; an input with no entry in the
table is a :class:`RoomError` that the daemon turns into a failed room, never an
exception that escapes the loop. Pure: no I/O, no clocks (callers pass ``now``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class RoomState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"
    WAITING_FOR_INPUT = "waiting_for_input"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (RoomState.SUCCESS, RoomState.FAILED)


class TransferPath(enum.Enum):
    """How a room's bytes move; decided once per room (receiver: at bootstrap; sender: from the
    request it got), never re-derived from strings."""

    DIRECT = "direct"      # per-slice writes straight into the decode pool
    STAGED = "staged"      # gather -> one bulk write per chunk -> receiver scatter
    HISPARSE = "hisparse"  # token-indexed writes into the decode host-DRAM pool

    @classmethod
    def of_request(cls, *, hisparse: bool, chunk_tokens: int) -> TransferPath:
        """The path a TransferRequest asks for (its fields are the receiver's one decision)."""
        if hisparse:
            return cls.HISPARSE
        return cls.STAGED if chunk_tokens > 0 else cls.DIRECT


class RoomInput(enum.Enum):
    BOOTSTRAPPED = "bootstrapped"  # peers known, requests matched: ready for data
    PROGRESS = "progress"          # a chunk was written (sender) or reported (receiver)
    COMPLETED = "completed"        # every chunk written / every required sender reported
    FAIL = "fail"                  # error, timeout, dead peer, abort


S, In = RoomState, RoomInput

#: (state, input) -> next state. Anything not listed is a protocol violation.
TRANSITIONS: Mapping[tuple[RoomState, RoomInput], RoomState] = {
    (S.BOOTSTRAPPING, In.BOOTSTRAPPED): S.WAITING_FOR_INPUT,
    (S.BOOTSTRAPPING, In.FAIL): S.FAILED,
    (S.WAITING_FOR_INPUT, In.PROGRESS): S.TRANSFERRING,
    (S.WAITING_FOR_INPUT, In.COMPLETED): S.SUCCESS,
    (S.WAITING_FOR_INPUT, In.FAIL): S.FAILED,
    (S.TRANSFERRING, In.PROGRESS): S.TRANSFERRING,
    (S.TRANSFERRING, In.COMPLETED): S.SUCCESS,
    (S.TRANSFERRING, In.FAIL): S.FAILED,
    # A failure that arrives after the room ended changes nothing (Failed dominates while
    # live; a finished room is never resurrected or re-failed by a late message).
    (S.SUCCESS, In.FAIL): S.SUCCESS,
    (S.FAILED, In.FAIL): S.FAILED,
}


@dataclass(frozen=True)
class Deadlines:
    """Seconds a room may stay in each non-final state; PROGRESS restarts the clock.

    ``lifetime`` caps the room's whole life, progress or not: a peer that reports one new byte
    just inside each transfer deadline cannot keep a room (and its engine) waiting past it."""

    bootstrapping: float
    waiting_for_input: float
    transferring: float
    lifetime: float = math.inf

    def for_state(self, state: RoomState) -> float | None:
        return {
            S.BOOTSTRAPPING: self.bootstrapping,
            S.WAITING_FOR_INPUT: self.waiting_for_input,
            S.TRANSFERRING: self.transferring,
        }.get(state)


class RoomError(RuntimeError):
    """An input the room's current state does not allow, or bad completion accounting."""


class TooManyRooms(RoomError):
    """A pool already has as many rooms in flight as it may (back-pressure: retry later)."""


#: Longest failure reason a room keeps, logs and reports: a peer's text rides in some reasons
#: ("receiver failed the room: ..."), and is cut here, not kept whole (up to a peer message).
MAX_REASON = 1024


def short_reason(reason: str) -> str:
    """``reason``, cut to :data:`MAX_REASON` characters."""
    return reason if len(reason) <= MAX_REASON else reason[:MAX_REASON - 3] + "..."


@dataclass
class RoomMachine:
    """State, reason and deadline of one room; the only place its state changes."""

    deadlines: Deadlines
    created_at: float
    state: RoomState = S.BOOTSTRAPPING
    reason: str = ""
    entered_at: float = 0.0
    history: list[tuple[float, RoomState]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.entered_at = self.created_at
        self.history.append((self.created_at, self.state))

    @property
    def deadline(self) -> float | None:
        limit = self.deadlines.for_state(self.state)
        if limit is None:
            return None
        return min(self.entered_at + limit, self.created_at + self.deadlines.lifetime)

    @property
    def is_live(self) -> bool:
        """Ready for data and not ended: the only states in which progress counts."""
        return self.state in (S.WAITING_FOR_INPUT, S.TRANSFERRING)

    def progress(self, now: float) -> bool:
        """Record progress (restarts the deadline) if the room is live; True if it was."""
        if not self.is_live or self.expired(now):
            return False  # a room past its deadline is not revived by a late report: it expires
        self.apply(In.PROGRESS, now)
        return True

    def expired(self, now: float) -> bool:
        deadline = self.deadline
        return deadline is not None and now >= deadline

    def apply(self, event: RoomInput, now: float, reason: str = "") -> RoomState:
        """Feed one input; returns the new state. Raises RoomError for a forbidden input."""
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise RoomError(f"input {event.value} is not allowed in state {self.state.value}")
        if event is In.FAIL and self.state is S.FAILED:
            return self.state  # keep the first reason
        if nxt is not self.state or event is In.PROGRESS:
            self.entered_at = now
        if nxt is not self.state:
            self.history.append((now, nxt))
        if event is In.FAIL and not self.state.final:
            self.reason = short_reason(reason) if reason else "failed"
        self.state = nxt
        return nxt

    def fail(self, now: float, reason: str) -> bool:
        """Fail unless already final; True if this call failed the room."""
        if self.state.final:
            return False
        self.apply(In.FAIL, now, reason)
        return True

    def timeout_reason(self) -> str:
        limit = self.deadlines.for_state(self.state)
        if limit is not None and self.created_at + self.deadlines.lifetime < self.entered_at + limit:
            return (f"timed out: the room's lifetime of {self.deadlines.lifetime:g} s ended in state "
                    f"{self.state.value}")
        return f"timed out after {limit:g} s in state {self.state.value}"


class CompletionTracker:
    """Which sender ranks a receiver still waits for, keyed by the sender's *engine rank*.

    Keying by anything several senders share (a pipeline rank, say) makes reports collide
    and the receiver wait forever; so a second report from one rank is an error, and the
    room is done only when every required rank has reported.
    """

    def __init__(self, required: Iterable[int]) -> None:
        self.required = frozenset(required)
        self.reported: dict[int, bool] = {}

    def report(self, sender_rank: int, ok: bool) -> None:
        if sender_rank not in self.required:
            raise RoomError(f"sender rank {sender_rank} is not one of the expected senders "
                            f"{sorted(self.required)}")
        if sender_rank in self.reported:
            raise RoomError(f"sender rank {sender_rank} reported twice")
        self.reported[sender_rank] = ok

    @property
    def failed(self) -> bool:
        return not all(self.reported.values())

    @property
    def done(self) -> bool:
        return self.required.issubset(self.reported) and not self.failed

    @property
    def missing(self) -> list[int]:
        return sorted(self.required - set(self.reported))


__all__ = ["MAX_REASON", "short_reason", "RoomState", "RoomInput", "TransferPath", "TRANSITIONS", "Deadlines", "RoomError", "RoomMachine",
           "CompletionTracker"]

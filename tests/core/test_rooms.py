"""Room state machine (every state x input pair) and per-sender-rank completion accounting."""

from __future__ import annotations

import itertools

import pytest

from kvd.rooms import (
    TRANSITIONS,
    CompletionTracker,
    Deadlines,
    RoomError,
    RoomInput,
    RoomMachine,
    RoomState,
)

D = Deadlines(bootstrapping=1.0, waiting_for_input=2.0, transferring=3.0)


def test_happy_path():
    m = RoomMachine(D, created_at=0.0)
    assert m.state is RoomState.BOOTSTRAPPING and m.deadline == 1.0
    m.apply(RoomInput.BOOTSTRAPPED, 0.5)
    assert m.deadline == 2.5
    m.apply(RoomInput.PROGRESS, 1.0)
    m.apply(RoomInput.PROGRESS, 2.0)  # progress restarts the clock
    assert m.deadline == 5.0
    m.apply(RoomInput.COMPLETED, 2.5)
    assert m.state is RoomState.SUCCESS and m.deadline is None and not m.expired(1e9)


@pytest.mark.parametrize("state, event", list(itertools.product(RoomState, RoomInput)))
def test_every_state_input_pair_is_either_in_the_table_or_an_error(state, event):
    m = RoomMachine(D, created_at=0.0)
    m.state = state
    if (state, event) in TRANSITIONS:
        assert m.apply(event, 1.0) is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(RoomError):
            m.apply(event, 1.0)


def test_every_non_final_state_has_a_deadline():
    for state in RoomState:
        assert (D.for_state(state) is None) == state.final


def test_failure_keeps_first_reason_and_never_resurrects():
    m = RoomMachine(D, created_at=0.0)
    assert m.fail(0.1, "peer died")
    assert not m.fail(0.2, "later")
    assert m.reason == "peer died"
    done = RoomMachine(D, created_at=0.0)
    done.apply(RoomInput.BOOTSTRAPPED, 0)
    done.apply(RoomInput.COMPLETED, 0)
    assert not done.fail(1.0, "late failure") and done.state is RoomState.SUCCESS


def test_expiry_in_each_state():
    m = RoomMachine(D, created_at=10.0)
    assert not m.expired(10.9) and m.expired(11.0)
    assert "bootstrapping" in m.timeout_reason()


def test_progress_never_carries_a_room_past_its_lifetime():
    """The transfer deadline restarts on progress; the lifetime does not: a room that reports
    progress just inside every transfer deadline still ends at created_at + lifetime."""
    m = RoomMachine(Deadlines(1.0, 2.0, 3.0, lifetime=10.0), created_at=100.0)
    m.apply(RoomInput.BOOTSTRAPPED, 100.5)
    now = 100.5
    while m.progress(now):
        assert m.deadline is not None and m.deadline <= 110.0
        now += 2.9
    assert m.expired(now) and now >= 110.0 and now - 2.9 < 110.0
    assert "lifetime of 10 s" in m.timeout_reason() and "transferring" in m.timeout_reason()
    fresh = RoomMachine(Deadlines(1.0, 2.0, 3.0, lifetime=10.0), created_at=0.0)
    assert fresh.deadline == 1.0 and "after 1 s in state bootstrapping" in fresh.timeout_reason()


def test_four_senders_one_receiver_waits_for_all_four():
    """Regression (SGLang PR 22145): reports keyed by a shared rank collided and decode hung;
    kvd keys by sender engine rank and is done only after all four."""
    t = CompletionTracker([0, 1, 2, 3])
    for rank in (0, 1, 2):
        t.report(rank, True)
        assert not t.done
    assert t.missing == [3]
    t.report(3, True)
    assert t.done


def test_duplicate_or_unknown_sender_report_is_an_error():
    t = CompletionTracker([0, 1])
    t.report(0, True)
    with pytest.raises(RoomError, match="twice"):
        t.report(0, True)
    with pytest.raises(RoomError, match="not one of"):
        t.report(5, True)


def test_one_failed_sender_fails_the_room():
    t = CompletionTracker([0, 1])
    t.report(0, False)
    t.report(1, True)
    assert t.failed and not t.done

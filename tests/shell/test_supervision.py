"""Supervision (issue 12, item 2): every loop and task has an owner; a failure is logged with its
traceback and counted, then the loop goes on or the daemon becomes fatal (exits non-zero); the
watchdog is pinged only while the loops do their work."""

from __future__ import annotations

import asyncio

import pytest

from kvd.obs.sdnotify import Watchdog
from kvd.sides.tasks import TaskOwner


async def test_a_failing_pass_is_counted_and_the_loop_goes_on():
    crashes: list[str] = []
    owner = TaskOwner(on_crash=lambda name, exc: crashes.append(name))
    done = []
    for i in range(5):
        with owner.guard("loop"):
            if i % 2 == 0:
                raise RuntimeError(f"pass {i}")
            done.append(i)
    assert done == [1, 3]
    assert crashes == ["loop"] * 3 and owner.failures["loop"] == 3
    assert owner.fatal_reason is None and not owner.healthy("loop")
    with owner.guard("loop"):
        pass
    assert owner.healthy("loop")


async def test_a_loop_that_only_fails_is_fatal():
    owner = TaskOwner(max_failures=3)
    for _ in range(3):
        with owner.guard("housekeeping.peers"):
            raise OSError("Too many open files")
    assert owner.fatal_reason is not None and "housekeeping.peers" in owner.fatal_reason
    assert await asyncio.wait_for(owner.wait_fatal(), 1) == owner.fatal_reason


async def test_guard_never_swallows_cancellation():
    owner = TaskOwner()
    with pytest.raises(asyncio.CancelledError), owner.guard("loop"):
        raise asyncio.CancelledError
    assert owner.failures["loop"] == 0


@pytest.mark.parametrize("end", ["crash", "return"])
async def test_a_critical_task_that_ends_is_fatal(end):
    """Before: the peer receive loop or housekeeping could end and the process lived on, half
    dead, still pinging the watchdog."""
    crashes: list[str] = []
    owner = TaskOwner(on_crash=lambda name, exc: crashes.append(name))

    async def loop() -> None:
        await asyncio.sleep(0)
        if end == "crash":
            raise UnicodeEncodeError("ascii", "ü", 0, 1, "not ascii")

    owner.spawn(loop(), "peer-receive", critical=True)
    reason = await asyncio.wait_for(owner.wait_fatal(), 1)
    assert "peer-receive" in reason and not owner.critical_alive()
    assert crashes == (["peer-receive"] if end == "crash" else [])


async def test_cancelling_at_shutdown_is_not_fatal():
    owner = TaskOwner()
    owner.spawn(asyncio.sleep(10), "housekeeping", critical=True)
    assert owner.critical_alive()
    await owner.close()
    assert owner.fatal_reason is None


async def test_a_plain_task_crash_is_logged_and_counted_but_not_fatal():
    crashes: list[str] = []
    owner = TaskOwner(on_crash=lambda name, exc: crashes.append(name))

    async def boom() -> None:
        raise ValueError("x")

    task = owner.spawn(boom(), "abort-transfer")
    await asyncio.wait([task])
    await asyncio.sleep(0)
    assert crashes == ["abort-transfer"] and owner.fatal_reason is None


def test_watchdog_pings_only_while_every_loop_beats(monkeypatch):
    sent: list[str] = []
    monkeypatch.setattr("kvd.obs.sdnotify.watchdog_ping", lambda: sent.append("WATCHDOG=1") or True)
    wd = Watchdog(interval=1.0)
    wd.watch("housekeeping", 5.0, now=0.0)
    wd.watch("peer-receive", 5.0, now=0.0)
    assert wd.maybe_ping(1.0) and len(sent) == 1
    assert not wd.maybe_ping(1.5)  # not due yet
    wd.beat("housekeeping", 6.0)
    # peer-receive last beat at 0: it is stuck, so no ping although housekeeping runs
    assert not wd.maybe_ping(6.0) and wd.lagging(6.0) == ["peer-receive"] and wd.withheld == 1
    wd.beat("peer-receive", 6.5)
    assert wd.maybe_ping(6.5) and len(sent) == 2


def test_watchdog_off_without_systemd():
    wd = Watchdog(interval=None)
    wd.watch("housekeeping", 1.0, now=0.0)
    assert not wd.maybe_ping(100.0)

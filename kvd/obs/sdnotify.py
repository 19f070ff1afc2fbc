"""systemd's notify protocol (sd_notify), without libsystemd: one datagram per state change.

``Type=notify`` lets systemd start dependent units only once kvd really listens, and
``WatchdogSec=`` restarts a daemon whose loop has hung; both need these few lines. Every
call is a no-op returning False when ``$NOTIFY_SOCKET`` is unset (not under systemd,
tests), and a send error never raises: losing a notification must not take kvd down.

:class:`Watchdog` pings only while every loop it watches has reported a finished pass
recently: a loop that hangs or keeps failing stops the pings, and systemd restarts kvd.
It never pings from a timer of its own.
"""

from __future__ import annotations

import os
import socket

__all__ = ["Watchdog", "notify", "ready", "status", "stopping", "watchdog_interval", "watchdog_ping"]


def _address(raw: str) -> str | None:
    if raw.startswith("@"):
        return "\0" + raw[1:]  # abstract namespace socket
    if raw.startswith("/"):
        return raw
    return None  # e.g. "vsock:..." (systemd 254+, VMs): not supported here


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to systemd; True if it was sent."""
    raw = os.environ.get("NOTIFY_SOCKET", "")
    address = _address(raw) if raw else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def _with_status(state: str, text: str | None) -> str:
    # STATUS= is one line; a newline would start a bogus assignment.
    return state if text is None else f"{state}\nSTATUS={' '.join(text.splitlines())}"


def ready(status_text: str | None = None) -> bool:
    """Tell systemd start-up is done (sockets bound, transport up), optionally with a status line."""
    return notify(_with_status("READY=1", status_text))


def status(text: str) -> bool:
    """Update the one-line status ``systemctl status kvd`` shows."""
    return notify(_with_status("", text).lstrip("\n"))


def watchdog_ping() -> bool:
    """Tell the watchdog the loop is alive; call every ``watchdog_interval()`` seconds."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    """Tell systemd a graceful shutdown has begun, so it waits instead of declaring a hang."""
    return notify(_with_status("STOPPING=1", status_text))


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec``, as systemd advises); None if off.

    Like sd_watchdog_enabled(): ignored when ``$WATCHDOG_PID`` names another process
    (the variable was inherited, not meant for us).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        value = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1e6 / 2


class Watchdog:
    """Pings systemd's watchdog only while the loops it watches do their work.

    Each loop calls :meth:`beat` after a pass that did its job; :meth:`maybe_ping` (called
    from one of them, with the loop clock) pings at ``interval`` only if every loop beat
    within its allowed staleness. Clock values are passed in, so it is tested without time.
    """

    def __init__(self, interval: float | None) -> None:
        self.interval = interval
        self._stale_after: dict[str, float] = {}
        self._beats: dict[str, float] = {}
        self._last_ping = float("-inf")
        self.pings = 0
        self.withheld = 0

    def watch(self, name: str, stale_after: float, now: float) -> None:
        """Require ``name`` to beat at least every ``stale_after`` seconds (from ``now`` on)."""
        self._stale_after[name] = stale_after
        self._beats[name] = now

    def beat(self, name: str, now: float) -> None:
        self._beats[name] = now

    def lagging(self, now: float) -> list[str]:
        """The loops that have not beaten in time."""
        return [n for n, limit in self._stale_after.items() if now - self._beats.get(n, float("-inf")) > limit]

    def maybe_ping(self, now: float) -> bool:
        """Ping if due and every loop is healthy; True if a ping was sent (or would be, off systemd)."""
        if self.interval is None or now - self._last_ping < self.interval:
            return False
        if self.lagging(now):
            self.withheld += 1
            return False
        self._last_ping = now
        self.pings += 1
        watchdog_ping()
        return True

"""systemd's notify protocol (sd_notify), without libsystemd: one datagram per state change.

``Type=notify`` lets systemd start dependent units only once kvd really listens, and
``WatchdogSec=`` restarts a daemon whose loop has hung; both need these few lines. Every
call is a no-op returning False when ``$NOTIFY_SOCKET`` is unset (not under systemd,
tests), and a send error never raises: losing a notification must not take kvd down.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "ready", "status", "stopping", "watchdog_interval", "watchdog_ping"]


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

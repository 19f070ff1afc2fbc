"""systemd notify protocol against a real daemon: READY=1 once the socket is bound, WATCHDOG=1 pings."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvd import sdnotify

pytestmark = pytest.mark.e2e


@dataclass
class Note:
    """One datagram as systemd would see it, and what was true of the engine socket on arrival."""

    at: float
    fields: dict[str, str]
    socket_exists: bool
    socket_answers: bool


@dataclass
class NotifyListener:
    """A stand-in for systemd's $NOTIFY_SOCKET: an AF_UNIX datagram socket read by a thread."""

    path: Path
    engine_socket: Path
    notes: list[Note] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            exists = self.engine_socket.exists()
            answers = False
            if "READY" in fields and exists:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(1)
                    try:
                        probe.connect(str(self.engine_socket))
                        answers = True
                    except OSError:
                        pass
            self.notes.append(Note(now, fields, exists, answers))

    def with_key(self, key: str) -> list[Note]:
        return [n for n in list(self.notes) if key in n.fields]

    def wait_for(self, key: str, count: int = 1, timeout: float = 10.0) -> list[Note]:
        deadline = time.monotonic() + timeout
        while len(found := self.with_key(key)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Callable[[str], NotifyListener]]:
    made: list[NotifyListener] = []

    def make(daemon_name: str) -> NotifyListener:
        # The fixture puts a daemon named N on tmp_path / "N.sock".
        lst = NotifyListener(tmp_path / "notify.sock", tmp_path / f"{daemon_name}.sock")
        lst.start()
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst.close()


def test_ready_after_the_socket_is_bound_and_watchdog_pings(daemons: Callable[..., Any],
                                                           listener: Callable[[str], NotifyListener]) -> None:
    lst = listener("notified")
    t0 = time.monotonic()
    d = daemons("notified", env={"NOTIFY_SOCKET": str(lst.path), "WATCHDOG_USEC": "400000"})

    (ready,) = lst.wait_for("READY")
    assert ready.fields["READY"] == "1"
    assert ready.socket_exists and ready.socket_answers  # READY only once engines can connect
    assert d.socket_path in ready.fields.get("STATUS", "")  # the one-line status names the socket
    assert d.address in ready.fields.get("STATUS", "")

    # WATCHDOG_USEC=400 ms: a ping every ~200 ms, and they keep coming.
    time.sleep(2.0)
    pings = [n for n in lst.with_key("WATCHDOG") if n.at >= ready.at]
    assert all(n.fields["WATCHDOG"] == "1" for n in pings)
    assert len(pings) >= 6, [n.fields for n in lst.notes]
    gaps = [b.at - a.at for a, b in zip(pings, pings[1:], strict=False)]
    assert max(gaps) < 0.4, gaps  # never as late as the watchdog's own limit
    assert pings[-1].at > time.monotonic() - 0.5  # still pinging now, not just at start
    assert ready.at > t0
    assert not any("READY" in n.fields for n in lst.notes if n is not ready)  # READY once

    # A graceful stop tells systemd it is stopping, so it waits instead of declaring a hang.
    d.stop()
    assert d.proc.returncode == 0
    assert lst.wait_for("STOPPING", timeout=5), [n.fields for n in lst.notes]


def test_no_watchdog_pings_without_watchdog_usec(daemons: Callable[..., Any],
                                                 listener: Callable[[str], NotifyListener]) -> None:
    lst = listener("plain")
    daemons("plain", env={"NOTIFY_SOCKET": str(lst.path)})
    assert lst.wait_for("READY")
    time.sleep(0.6)
    assert lst.with_key("WATCHDOG") == []


def test_watchdog_interval_ignores_another_process_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == pytest.approx(0.2)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == pytest.approx(0.2)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    monkeypatch.delenv("WATCHDOG_PID")
    assert sdnotify.watchdog_interval() is None


def test_notify_without_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody.sock"))
    assert sdnotify.watchdog_ping() is False  # nobody listens: no exception either

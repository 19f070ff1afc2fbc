"""systemd integration: the unit file passes `systemd-analyze verify`, and sd_notify really sends."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvd import sdnotify

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "kvd.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# --- the unit file ---


def test_unit_declares_notify_and_watchdog() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["on-failure"]
    assert s["ExecStart"] == ["/usr/local/bin/kvd --config /etc/kvd/kvd.toml"]
    assert s["LimitMEMLOCK"] == ["infinity"]
    assert "KVD_LOG_FORMAT=json" in s["Environment"]
    assert s["RuntimeDirectory"] == ["kvd"]
    assert s["User"] == ["kvd"] and s["Group"] == ["kvd"]


def test_unit_keeps_rdma_gpus_and_shared_memory_reachable() -> None:
    s = unit_settings()
    assert "PrivateDevices" not in s and "PrivateIPC" not in s  # they would hide GPUs, RDMA, /dev/shm
    assert "MemoryDenyWriteExecute" not in s  # CUDA/Triton JIT
    assert s["ReadWritePaths"] == ["/dev/shm"]
    families = s["RestrictAddressFamilies"][0].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)
    allowed = [v.split()[0] for v in s["DeviceAllow"]]
    assert "char-infiniband_verbs" in allowed and "char-nvidia*" in allowed
    # systemd stat()s a DeviceAllow path: a glob there silently allows nothing.
    assert not any(a.startswith("/dev/") and "*" in a for a in allowed)


def _verify(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on ``text`` as kvd.service; return rc and lines about our unit."""
    unit = tmp_path / "kvd.service"
    unit.write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    # Other units on the host may have their own warnings; only ours count.
    ours = [line for line in lines if "kvd.service" in line or str(tmp_path) in line]
    return proc.returncode, ours


def _runnable_unit() -> str:
    # /usr/local/bin/kvd need not exist here; verify checks that ExecStart is executable.
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/kvd " in text
    return text.replace("ExecStart=/usr/local/bin/kvd ", f"ExecStart={sys.executable} ")


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    _rc, ours = _verify(tmp_path, _runnable_unit())
    assert ours == []


@needs_systemd_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    # Guards the filter above: a real mistake in our unit must show up in `ours`.
    broken = _runnable_unit().replace("Type=notify", "Type=notifyy\nWatchdogSecs=30")
    _rc, ours = _verify(tmp_path, broken)
    assert any("notifyy" in line for line in ours)
    assert any("WatchdogSecs" in line for line in ours)


# --- sd_notify over a real datagram socket ---


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


def test_notify_messages(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("serving on /run/kvd/kvd.sock")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving on /run/kvd/kvd.sock"
    assert sdnotify.ready()
    assert notify_socket.recv(4096) == b"READY=1"
    assert sdnotify.watchdog_ping()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.status("3 rooms\nin flight")  # a status is one line
    assert notify_socket.recv(4096) == b"STATUS=3 rooms in flight"
    assert sdnotify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"kvd-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.watchdog_ping() is False  # a send error never raises
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 15.0  # half of WatchdogSec=30
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # inherited, meant for another process
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "abc", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None

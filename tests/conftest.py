"""Fixtures that start real kvd daemon processes on loopback (real Mooncake over TCP)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvd.client import KvdClient

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DaemonProc:
    name: str
    socket_path: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def client(self, timeout: float = 10.0) -> KvdClient:
        return KvdClient(self.socket_path, timeout=timeout)

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_daemon(tmp: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> DaemonProc:
    """Start `python -m kvd` and wait until its socket answers a status request."""
    sock = str(tmp / f"{name}.sock")
    port = free_port()
    log_path = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "kvd", "--socket-path", sock, "--peer-port", str(port),
           "--node-hostname", "127.0.0.1", "--log-format", "json",
           "--timeouts-heartbeat-interval-s", "0.5", *extra]
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    d = DaemonProc(name, sock, port, proc, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvd {name} exited with {proc.returncode}:\n{d.log()}")
        try:
            d.status()
            return d
        except OSError:
            time.sleep(0.1)
        except Exception:
            time.sleep(0.1)
    d.stop()
    raise RuntimeError(f"kvd {name} did not come up:\n{d.log()}")


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    """Factory: daemons("prefill", *flags) starts one more daemon; all stop at teardown."""
    started: list[DaemonProc] = []

    def make(name: str, *extra: str, env: dict[str, str] | None = None) -> DaemonProc:
        d = start_daemon(tmp_path, name, *extra, env=env)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def pair(daemons) -> tuple[DaemonProc, DaemonProc]:
    """A prefill daemon and a decode daemon with short timeouts."""
    flags = ("--timeouts-waiting-s", "8", "--timeouts-bootstrap-s", "5", "--timeouts-transfer-s", "8",
             "--timeouts-abort-fence-s", "2")
    return daemons("prefill", *flags), daemons("decode", *flags)

"""kvctl status against real daemons, and the engine socket's lifecycle (mode, live and stale sockets)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvd.hostpool import HostPool
from kvd.kvctl import main as kvctl_main
from kvd.layout import PoolLayout

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def kvctl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``kvctl`` CLI in a subprocess, as an operator would."""
    return subprocess.run([sys.executable, "-m", "kvd.kvctl", *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)


def kvctl_here(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``kvctl.main`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    capsys.readouterr()
    rc = kvctl_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def layouts() -> tuple[PoolLayout, PoolLayout]:
    base = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)
    return PoolLayout("P", "prefill", 1, 0, **base), PoolLayout("D", "decode", 1, 0, **base)


@pytest.fixture
def host_pools() -> Iterator[Callable[[PoolLayout], HostPool]]:
    made: list[HostPool] = []

    def make(layout: PoolLayout) -> HostPool:
        pool = HostPool.create(layout)
        pool.fill(0)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


def test_status_table_and_json_against_a_real_daemon(daemons: Callable[..., Any]) -> None:
    d = daemons("solo")
    st_mode = os.stat(d.socket_path).st_mode
    assert stat.S_ISSOCK(st_mode) and stat.S_IMODE(st_mode) == 0o660  # never world-accessible

    res = kvctl("status", "--socket", d.socket_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    header = res.stdout.splitlines()[0]
    assert "transport tcp" in header and f"pid {d.proc.pid}" in header
    assert "no rooms in flight" in res.stdout
    assert d.address in res.stdout  # the peer address line

    res = kvctl("status", "--json", "--socket", d.socket_path)
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert {"daemon", "rooms", "peers"} <= set(st)
    assert st["daemon"]["transport"]["protocol"] == "tcp"
    assert st["daemon"]["pid"] == d.proc.pid
    assert st["rooms"] == [] and st["peers"] == []


def test_status_shows_a_room_in_flight(pair: tuple[Any, Any], host_pools: Callable[[PoolLayout], HostPool],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pre_d, dec_d = pair
    pl, dl = layouts()
    room = 4711
    # Both clients stay connected for the whole test: a closed connection would fail the room.
    with pre_d.client() as pc, dec_d.client() as dc:
        pc.register_pool(pl, host_pools(pl).memory, bootstrap=pre_d.address)
        did = dc.register_pool(dl, host_pools(dl).memory)
        dc.recv(did, room, pre_d.address, "P", np.array([1, 2, 3]))  # no prefill engine ever sends

        deadline = time.monotonic() + 6
        mine: dict[str, Any] = {}
        while time.monotonic() < deadline:  # until the room has planned its senders
            rooms = dec_d.status()["rooms"]
            mine = next((r for r in rooms if r.get("room") == room), {})
            if mine.get("senders_required"):
                break
            time.sleep(0.1)
        assert mine.get("senders_required") == [0], mine

        rc, out, err = kvctl_here(capsys, "status", "--json", "--socket", dec_d.socket_path)
        assert rc == 0, err
        st = json.loads(out)
        (r,) = [x for x in st["rooms"] if x["room"] == room]
        assert r["role"] == "decode" and r["engine_id"] == "D" and r["rank"] == 0
        assert r["state"] in ("bootstrapping", "waiting_for_input")
        assert r["senders_required"] == [0] and r["senders_reported"] == []
        assert pre_d.address in r["peer"]
        assert any(p["peer"] == pre_d.address for p in st["peers"]), st["peers"]

        rc, out, err = kvctl_here(capsys, "status", "--socket", dec_d.socket_path)
        assert rc == 0, err
        lines = out.splitlines()
        assert any(line.startswith("ROOM") and "STATE" in line and "SENDERS" in line for line in lines)
        (row,) = [line for line in lines if line.startswith(str(room))]
        cells = row.split()
        assert cells[1] == "decode" and cells[2] == "D"
        assert any(c in ("bootstrapping", "waiting_for_input") for c in cells), row
        assert "0/1" in row  # no sender has reported, one is required
        assert dc.poll(room).state in ("bootstrapping", "waiting_for_input")  # still in flight


def test_stopped_daemon_exits_2_with_one_line(daemons: Callable[..., Any]) -> None:
    d = daemons("gone")
    d.stop()
    assert not os.path.exists(d.socket_path)  # a graceful stop removes its socket
    res = kvctl("status", "--socket", d.socket_path)
    assert res.returncode == 2
    assert res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1
    assert "cannot reach kvd" in res.stderr and d.socket_path in res.stderr


def test_killed_daemon_stale_socket_exits_2(daemons: Callable[..., Any],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    d = daemons("killed")
    d.kill()
    assert os.path.exists(d.socket_path)  # SIGKILL leaves the socket file behind
    rc, out, err = kvctl_here(capsys, "status", "--socket", d.socket_path)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "refused" in err.lower()


def test_second_daemon_on_a_live_socket_refuses_to_start(daemons: Callable[..., Any], tmp_path: Path) -> None:
    first = daemons("live")
    log = tmp_path / "second.log"
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "kvd", "--socket-path", first.socket_path, "--peer-port", str(free_port()),
             "--node-hostname", "127.0.0.1", "--log-format", "json"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, timeout=30)
    text = log.read_text(errors="replace")
    assert proc.returncode != 0, text
    assert "already" in text, text
    # The first daemon keeps its socket and keeps serving.
    assert first.alive()
    assert stat.S_ISSOCK(os.stat(first.socket_path).st_mode)
    assert first.status()["daemon"]["pid"] == first.proc.pid


def test_stale_socket_file_is_replaced(daemons: Callable[..., Any], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "stale.sock"  # the path the fixture gives a daemon named "stale"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # bound, never listened, closed: the file stays, nobody answers
    os.chmod(path, 0o600)
    assert stat.S_ISSOCK(os.stat(path).st_mode)

    d = daemons("stale")  # the fixture returns only once a status request was answered there
    assert d.socket_path == str(path) and d.alive()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    rc, out, err = kvctl_here(capsys, "status", "--json", "--socket", d.socket_path)
    assert rc == 0, err
    assert json.loads(out)["daemon"]["pid"] == d.proc.pid

"""kvctl: status rendering from a sample dict (no daemon), socket resolution, unreachable daemon."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from kvd import kvctl
from kvd.kvctl import human_bytes, human_duration, main, render_status, resolve_socket_path

SAMPLE: dict[str, Any] = {
    "daemon": {
        "version": "0.1.0",
        "pid": 4242,
        "uptime_s": 7384.2,
        "hostname": "10.0.0.7",
        "peer_address": "10.0.0.7:17500",
        "transport": {"protocol": "rdma", "devices": "mlx5_0,mlx5_1", "session_id": "10.0.0.7:15432"},
        "staging": {
            "enabled": True,
            "pool_bytes": 4 << 30,
            "reserved_bytes": 1 << 30,
            "in_use_bytes": 512 << 20,
            "waiting_rooms": 3, "chunks_sent": {"gathered": 12, "ungathered": 30},
        },
        "errors": {"timeout": 2, "peer_dead": 1},
        "bytes_total": 5 << 40,
        "write_ops_total": 123456,
    },
    "rooms": [
        {
            "room": 17,
            "role": "decode",
            "engine_id": "decode-0",
            "rank": 1,
            "peer": "10.0.0.8:17500",
            "state": "Transferring",
            "path": "staged",
            "bytes_done": 1 << 30,
            "bytes_total": 2 << 30,
            "age_s": 3.5,
            "senders_required": [0, 1, 2, 3],
            "senders_reported": [0, 1],
        },
        {
            "room": 18,
            "role": "prefill",
            "engine_id": "prefill-0",
            "rank": 0,
            "peer": "10.0.0.9:17500",
            "state": "WaitingForInput",
            "path": "direct",
            "bytes_done": 0,
            "bytes_total": 4096,
            "age_s": 301.0,
            "senders_required": [],
            "senders_reported": [],
        },
    ],
    "peers": [
        {"peer": "10.0.0.8:17500", "state": "alive", "rooms": 1, "bytes": 3 << 30, "last_seen_s": 0.4},
        {"peer": "10.0.0.9:17500", "state": "dead", "rooms": 1, "bytes": 0, "last_seen_s": 65.0},
    ],
}


def test_render_header_tables_and_units() -> None:
    out = render_status(SAMPLE)
    lines = out.splitlines()
    header = lines[0]
    for part in ("pid 4242", "up 2h03m", "transport rdma [mlx5_0,mlx5_1]", "session 10.0.0.7:15432"):
        assert part in header
    assert "staging on, 512.0 MiB in use / 1.0 GiB reserved / 4.0 GiB pool, 3 rooms waiting" in header
    assert "chunks sent 12 gathered / 30 ungathered" in header
    assert "errors peer_dead=1 timeout=2" in lines[1]
    assert "5.0 TiB sent" in lines[1]

    room_header = next(line for line in lines if line.startswith("ROOM"))
    assert room_header.split() == [
        "ROOM",
        "ROLE",
        "ENGINE",
        "RANK",
        "PEER",
        "STATE",
        "PATH",
        "BYTES",
        "AGE",
        "SENDERS",
    ]
    row17 = next(line for line in lines if line.startswith("17 "))
    assert "decode-0" in row17 and "Transferring" in row17 and "staged" in row17
    assert "1.0 GiB/2.0 GiB" in row17
    assert "3.50s" in row17
    assert row17.endswith("2/4 [0,1]")
    row18 = next(line for line in lines if line.startswith("18 "))
    assert "0 B/4.0 KiB" in row18 and "5m01s" in row18 and row18.endswith("-")

    peer_header = next(line for line in lines if line.startswith("PEER"))
    assert peer_header.split() == ["PEER", "STATE", "ROOMS", "BYTES", "LAST", "SEEN"]
    dead = next(line for line in lines if line.startswith("10.0.0.9:17500"))
    assert "dead" in dead and "1m05s" in dead


def test_columns_line_up() -> None:
    lines = render_status(SAMPLE).splitlines()
    start = lines.index(next(line for line in lines if line.startswith("ROOM")))
    header, row17 = lines[start], lines[start + 1]
    for column in ("STATE", "PATH", "BYTES"):
        assert row17[header.index(column) - 1] == " "  # every cell starts under its header


def test_render_tolerates_missing_and_odd_fields() -> None:
    out = render_status({})
    assert (
        "pid -" in out
        and "transport - session -" in out
        and "no rooms in flight" in out
        and "no peers" in out
    )
    odd = {
        "daemon": {"pid": "x", "transport": "tcp", "staging": {"enabled": False}, "errors": None},
        "rooms": [{"room": 1}, "garbage", {"room": 2, "bytes_done": "many", "senders_required": [0]}],
        "peers": [{"peer": "p"}],
    }
    out = render_status(odd)
    assert "staging off" in out
    row1 = next(line for line in out.splitlines() if line.startswith("1 "))
    assert set(row1.split()[1:]) == {"-"}
    row2 = next(line for line in out.splitlines() if line.startswith("2 "))
    assert row2.endswith("0/1 []")
    assert "errors none" in out


def test_render_both_directions() -> None:
    out = render_status({"daemon": {"bytes_total": {"sent": 1024, "received": 2048}}})
    assert "1.0 KiB sent, 2.0 KiB received" in out


def test_units() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(None) == "-"
    assert human_duration(0.25) == "0.25s"
    assert human_duration(42) == "42.0s"
    assert human_duration(3 * 86400 + 4 * 3600) == "3d04h"
    assert human_duration(-1) == "-"


# --- socket path resolution ---


def test_socket_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "kvd.toml"
    conf.write_text('[socket]\npath = "/srv/kvd/from-file.sock"\n')
    monkeypatch.setattr(kvctl, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    env = {"KVD_SOCKET_PATH": "/srv/kvd/from-env.sock"}
    assert resolve_socket_path("/flag.sock", str(conf), env) == "/flag.sock"
    assert resolve_socket_path(None, str(conf), env) == "/srv/kvd/from-env.sock"
    assert resolve_socket_path(None, str(conf), {}) == "/srv/kvd/from-file.sock"
    assert resolve_socket_path(None, None, {"KVD_CONFIG": str(conf)}) == "/srv/kvd/from-file.sock"
    assert resolve_socket_path(None, None, {}) == "/run/kvd/kvd.sock"
    monkeypatch.setattr(kvctl, "DEFAULT_CONFIG_PATH", str(conf))
    assert resolve_socket_path(None, None, {}) == "/srv/kvd/from-file.sock"


def test_config_file_is_read_without_the_daemons_env(tmp_path: Path) -> None:
    conf = tmp_path / "kvd.toml"
    conf.write_text('[socket]\npath = "/srv/x.sock"\n')
    # kvctl must not fail on KVD_* variables meant for the daemon, or on their typos.
    assert resolve_socket_path(None, str(conf), {"KVD_TYPO": "1"}) == "/srv/x.sock"


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "kvd.toml"
    conf.write_text("[sockets]\npath = 1\n")
    assert main(["status", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvctl: bad configuration: ") and "unknown section [sockets]" in err


# --- talking to a daemon ---


def test_unreachable_socket_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "kvd.sock")
    assert main(["status", "--socket", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"kvctl: cannot reach kvd at {path}: [Errno 2] No such file or directory\n"


def test_refused_socket_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "kvd.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)  # bound but never listening: connect() is refused
        assert main(["status", "--socket", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvctl: cannot reach kvd at {path}: ") and err.count("\n") == 1


def test_silent_daemon_times_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "kvd.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(1)  # accepts (in the backlog) but never answers
        assert main(["status", "--socket", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvctl: cannot reach kvd at {path}: ") and err.count("\n") == 1


class _FakeClient:
    """Stands in for KvdClient: records how kvctl calls it, returns SAMPLE."""

    calls: list[tuple[str, float]] = []

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.calls.append((socket_path, timeout))

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return SAMPLE


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[_FakeClient]:
    import kvd.client

    _FakeClient.calls = []
    monkeypatch.setattr(kvd.client, "KvdClient", _FakeClient)
    return _FakeClient


def test_status_table(fake_client: type[_FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--socket", "/x.sock"]) == 0
    assert fake_client.calls == [("/x.sock", 3.0)]
    assert capsys.readouterr().out == render_status(SAMPLE)


def test_status_json(fake_client: type[_FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--json", "--socket", "/x.sock"]) == 0
    assert json.loads(capsys.readouterr().out) == SAMPLE


def test_socket_from_env(
    fake_client: type[_FakeClient], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVD_SOCKET_PATH", "/from/env.sock")
    assert main(["status"]) == 0
    assert fake_client.calls == [("/from/env.sock", 3.0)]


def test_status_shows_each_peers_path_and_fallbacks() -> None:
    """Issue 14: the path every peer uses, and a fallback never silent."""
    from kvd.ops.kvctl import render_status

    st = {"daemon": {"peer_paths": {
        "10.0.0.2:16000": {"path": "cuda_ipc", "reason": "same machine: 3 region(s) opened over CUDA IPC",
                           "bytes": {"same_node": 1 << 30, "network": 4096},
                           "fallbacks": {"destination outside the device memory (host pool?)": 2}},
        "10.0.0.9:16000": {"path": "network", "reason": "another machine", "bytes": {"network": 10},
                           "fallbacks": {}}}}, "rooms": [], "peers": []}
    out = render_status(st)
    assert "PEER SESSION" in out and "cuda_ipc" in out and "another machine" in out
    assert "host pool?) x2" in out

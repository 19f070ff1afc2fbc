"""Peer keys, the authorized-keys directory and the src binding (kvd.shell.peer_auth), and the
token check, in process; two real PeerHubs talking CURVE over loopback."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq
import zmq.asyncio

from kvd.core.config import Config
from kvd.shell.peer_auth import (
    LOCAL,
    KeyRing,
    PeerAuth,
    TrustError,
    certificate_metadata,
    keygen,
    token_matches,
)
from kvd.shell.peer_hub import PeerHub
from kvd.sides.tasks import TaskOwner
from kvd.wire import peer as wp
from kvd.wire.codec import Message


def conf(tmp: Path, name: str, **kw: Any) -> SimpleNamespace:
    return SimpleNamespace(peer_insecure=False, peer_key_file=str(tmp / name / "kvd.key_secret"),
                           peer_authorized_keys=str(tmp / "authorized"), auth_token="", **kw)


def trust(tmp: Path, name: str, address: str) -> Path:
    public, _ = keygen(tmp / name, address)
    (tmp / "authorized").mkdir(exist_ok=True)
    (tmp / "authorized" / f"{name}.key").write_bytes(public.read_bytes())
    return public


def test_keygen_writes_a_private_secret_and_a_public_key_bound_to_its_address(tmp_path: Path) -> None:
    public, secret = keygen(tmp_path / "k", "tcp://10.0.0.1:17500")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644
    assert certificate_metadata(public) == {"address": "tcp://10.0.0.1:17500"}
    assert "secret-key" not in public.read_text()
    with pytest.raises(FileExistsError):
        keygen(tmp_path / "k", "tcp://10.0.0.1:17500")


def test_keyring_skips_unbound_and_duplicate_keys_and_picks_up_new_ones(tmp_path: Path) -> None:
    now = [0.0]
    trust(tmp_path, "a", "tcp://h:1")
    public, _ = keygen(tmp_path / "nobind")
    (tmp_path / "authorized" / "nobind.key").write_bytes(public.read_bytes())
    dup, _ = keygen(tmp_path / "dup", "tcp://h:1")  # claims a's address
    (tmp_path / "authorized" / "zz-dup.key").write_bytes(dup.read_bytes())
    ring = KeyRing(str(tmp_path / "authorized"), clock=lambda: now[0])
    ring.load()
    # two keys claim tcp://h:1: neither is trusted for it (which file sorts first must not decide)
    assert len(ring) == 0 and ring.key_for("tcp://h:1") is None
    assert any("no address" in p for p in ring.problems) and any("2 different keys" in p for p in ring.problems)
    b = trust(tmp_path, "b", "tcp://h:2")
    now[0] += 2.0  # rescans are rate-limited; the new file shows up on the next lookup miss
    assert ring.key_for("tcp://h:2") == zmq.auth.load_certificate(str(b))[0]


@pytest.mark.parametrize("offered", ["sekret2", "sekre", "", "séкрет", "\udcff", 12345, None, b"sekret",
                                     ["sekret"], {"t": 1}])
def test_a_wrong_token_of_any_type_is_refused_without_raising(offered: object) -> None:
    assert token_matches("sekret", offered) is False


def test_the_right_token_matches_also_non_ascii() -> None:
    assert token_matches("sekret", "sekret") and token_matches("sé", "sé")


def test_no_key_refuses_to_start_unless_insecure(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="kvd keygen"):
        PeerAuth.from_config(conf(tmp_path, "missing"))
    insecure = PeerAuth.from_config(SimpleNamespace(peer_insecure=True, auth_token=""))
    assert not insecure.secure and insecure.describe()["peer_auth"] == "insecure"
    assert "warning" in insecure.describe()


def test_admit_binds_src_to_the_key(tmp_path: Path) -> None:
    pa = trust(tmp_path, "a", "tcp://h:1")
    trust(tmp_path, "b", "tcp://h:2")
    auth = PeerAuth.from_config(conf(tmp_path, "b"))
    key_a = zmq.auth.load_certificate(str(pa))[0].decode()
    assert auth.admit("tcp://h:1", "", key_a) == ""
    assert auth.admit("tcp://h:2", "", key_a) == "peer_identity"  # a valid key claiming b
    assert auth.admit(123, "", key_a) == "peer_identity"
    assert auth.admit("tcp://h:1", "", "x" * 40) == "peer_key_refused"
    assert auth.admit("tcp://h:1", "", None) == "peer_key_refused"
    assert auth.admit("anything", "", LOCAL) == ""
    assert "secret" not in str(auth.describe()).lower() or "public_key" in auth.describe()


class Recorder:
    def __init__(self) -> None:
        self.got: list[Message] = []
        self.errors: dict[str, int] = {}

    def on_peer_message(self, msg: Message) -> None:
        self.got.append(msg)

    def peer_dead(self, peer: str) -> None:
        pass

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def now(self) -> float:
        return asyncio.get_running_loop().time()


async def _hub(tmp: Path, name: str, port: int) -> tuple[PeerHub, Recorder, TaskOwner]:
    handler, tasks = Recorder(), TaskOwner()
    config = Config(hostname="127.0.0.1", peer_port=port, peer_key_file=str(tmp / name / "kvd.key_secret"),
                    peer_authorized_keys=str(tmp / "authorized"))
    hub = PeerHub(config, handler, tasks)
    hub.auth = PeerAuth.from_config(config, handler.count_error)
    await hub.start()
    return hub, handler, tasks


async def _until(cond: Any, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not cond() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)


def _free() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_two_hubs_talk_curve_and_impostors_are_refused(tmp_path: Path) -> None:
    pa, pb = _free(), _free()
    trust(tmp_path, "a", f"tcp://127.0.0.1:{pa}")
    trust(tmp_path, "b", f"tcp://127.0.0.1:{pb}")
    (a, ra, ta), (b, _, tb) = await _hub(tmp_path, "a", pa), await _hub(tmp_path, "b", pb)
    try:
        assert b.send(a.address, wp.EngineQuery(engine_id="E"))
        await _until(lambda: ra.got)
        assert [type(m) for m in ra.got] == [wp.EngineQuery] and ra.got[0].src == b.address

        ctx = zmq.asyncio.Context.instance()
        server = zmq.auth.load_certificate(str(tmp_path / "a" / "kvd.key"))[0]

        def dealer(keys: tuple[bytes, bytes] | None) -> zmq.asyncio.Socket:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if keys is not None:
                s.curve_publickey, s.curve_secretkey = keys
                s.curve_serverkey = server
            s.connect(a.address)
            return s

        forged = wp.stamped(wp.EngineQuery(engine_id="FORGED"), b.address, "")
        # No key at all: the handshake fails, nothing arrives.
        plain = dealer(None)
        await plain.send(forged.encode())
        # A key nobody authorized: ZAP refuses it (counted).
        stranger = dealer(zmq.curve_keypair())
        await stranger.send(forged.encode())
        # A valid key (c's) claiming b's identity: refused and counted.
        trust(tmp_path, "c", "tcp://127.0.0.1:1")
        await asyncio.sleep(1.1)  # the directory is rescanned at most once a second
        impostor = dealer(zmq.auth.load_certificate(str(tmp_path / "c" / "kvd.key_secret")))
        await impostor.send(forged.encode())
        await _until(lambda: ra.errors.get("peer_identity") and ra.errors.get("peer_key_refused"))
        await asyncio.sleep(0.3)
        assert all(getattr(m, "engine_id", "") != "FORGED" for m in ra.got)
        assert ra.errors.get("peer_identity") == 1 and ra.errors.get("peer_key_refused", 0) >= 1
        # The same key speaking as itself is heard.
        await impostor.send(wp.stamped(wp.EngineQuery(engine_id="C"), "tcp://127.0.0.1:1", "").encode())
        await _until(lambda: any(getattr(m, "engine_id", "") == "C" for m in ra.got))
        assert any(getattr(m, "engine_id", "") == "C" for m in ra.got)
        for s in (plain, stranger, impostor):
            s.close()
        # A hub never talks to an address whose key it does not know.
        assert not a.send("tcp://127.0.0.1:9", wp.EngineQuery(engine_id="E")) and ra.errors["peer_key_unknown"] == 1
    finally:
        for hub, tasks in ((a, ta), (b, tb)):
            await tasks.close()
            await hub.stop()
            assert hub.auth is not None
            hub.auth.stop()

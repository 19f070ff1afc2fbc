"""Red team round 9: authorized keys changed while the daemon runs (two real PeerHubs over CURVE).

* The key ring noticed a change of ``peer.authorized_keys`` by the directory's mtime and entry
  count only, so a key file rewritten in place (a rotated key copied over the old file, a file
  emptied to revoke it) changed nothing: the old key stayed trusted until a restart.
* A hub's DEALER to a peer was made once with the peer's key and kept: after the peer was
  re-keyed it failed every handshake (rooms with that peer failed until a restart), and after
  the key was deleted it went on talking to the revoked peer.
* Two key files binding one address: the file that sorted first won, so a node's stale key left
  behind when its address went to a new node spoke as the new node (and locked its real key out)
  half the time. Such an address is now trusted for neither key until one file goes.
* A key bound to this daemon's own address could speak as this daemon *to itself* (its own
  messages never come over ZMQ): refused as ``peer_identity``.
* Malformed files in the directory (a FIFO, an oversized file, a key with no address, garbage)
  are skipped, and do not block or crash a rescan.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
import zmq.auth

from kvd.shell.peer_auth import RESCAN_S, KeyRing, keygen
from kvd.wire import peer as wp
from tests.trust.test_peer_auth import _free, _hub, _until, trust


def test_a_key_file_rewritten_in_place_is_seen(tmp_path: Path) -> None:
    now = [0.0]
    ring = KeyRing(str(tmp_path / "authorized"), clock=lambda: now[0])
    old = trust(tmp_path, "n", "tcp://10.0.0.2:5")
    ring.rescan()
    old_key = zmq.auth.load_certificate(str(old))[0]
    assert ring.key_for("tcp://10.0.0.2:5") == old_key
    new, _ = keygen(tmp_path / "n2", "tcp://10.0.0.2:5")
    shutil.copyfile(new, tmp_path / "authorized" / "n.key")  # rotated in place, same name and size
    now[0] += RESCAN_S
    assert ring.key_for("tcp://10.0.0.2:5") == zmq.auth.load_certificate(str(new))[0]
    assert ring.get(old_key) is None
    (tmp_path / "authorized" / "n.key").write_text("")  # emptied: revoked
    now[0] += RESCAN_S
    assert ring.key_for("tcp://10.0.0.2:5") is None and len(ring) == 0


def test_malformed_key_files_are_skipped(tmp_path: Path) -> None:
    good = trust(tmp_path, "good", "tcp://10.0.0.3:5")
    d = tmp_path / "authorized"
    os.mkfifo(d / "fifo.key")  # would block a read forever
    (d / "big.key").write_bytes(b"#" * (1 << 20))
    (d / "garbage.key").write_bytes(b"\xff\xfe\x00 not a certificate")
    (d / "dir.key").mkdir()
    keygen(tmp_path / "noaddr")
    shutil.copyfile(tmp_path / "noaddr" / "kvd.key", d / "noaddr.key")
    ring = KeyRing(str(d))
    ring.load()
    assert len(ring) == 1 and ring.key_for("tcp://10.0.0.3:5") == zmq.auth.load_certificate(str(good))[0]
    assert len(ring.problems) == 5


async def test_a_rekeyed_peer_is_reached_and_a_revoked_one_is_not(tmp_path: Path) -> None:
    pa, pb = _free(), _free()
    trust(tmp_path, "a", f"tcp://127.0.0.1:{pa}")
    trust(tmp_path, "b", f"tcp://127.0.0.1:{pb}")
    (a, ra, ta), (b, rb, tb) = await _hub(tmp_path, "a", pa), await _hub(tmp_path, "b", pb)
    hubs = [(a, ta), (b, tb)]
    try:
        assert b.send(a.address, wp.EngineQuery(engine_id="before"))
        await _until(lambda: ra.got)
        assert [m.engine_id for m in ra.got] == ["before"]  # type: ignore[attr-defined]
        # a is re-keyed: restarted with a new keypair, its new kvd.key copied over the old one
        await ta.close()
        await a.stop()
        assert a.auth is not None
        a.auth.stop()
        hubs.remove((a, ta))
        shutil.rmtree(tmp_path / "a")
        trust(tmp_path, "a", f"tcp://127.0.0.1:{pa}")
        a, ra, ta = await _hub(tmp_path, "a", pa)
        hubs.append((a, ta))
        await asyncio.sleep(RESCAN_S + 0.1)

        async def reached(engine: str) -> bool:
            for _ in range(30):  # a send may go out on the old socket before the rescan sees the key
                b.send(a.address, wp.EngineQuery(engine_id=engine))
                await asyncio.sleep(0.1)
                if any(getattr(m, "engine_id", "") == engine for m in ra.got):
                    return True
            return False

        assert await reached("after-rekey")
        assert rb.errors.get("peer_key_changed", 0) >= 1
        # a is revoked on b: b's socket to it is closed, and nothing more is sent to it
        (tmp_path / "authorized" / "a.key").unlink()
        await asyncio.sleep(RESCAN_S + 0.1)
        assert not b.send(a.address, wp.EngineQuery(engine_id="after-revoke"))
        await asyncio.sleep(0.3)
        assert all(getattr(m, "engine_id", "") != "after-revoke" for m in ra.got)
        assert rb.errors.get("peer_key_unknown", 0) >= 1
    finally:
        for hub, tasks in hubs:
            await tasks.close()
            await hub.stop()
            if hub.auth is not None:
                hub.auth.stop()


@pytest.fixture(autouse=True)
def _no_leftover_fifo(tmp_path: Path):  # a FIFO left in tmp would trip tools that read every file
    yield
    fifo = tmp_path / "authorized" / "fifo.key"
    if fifo.exists():
        fifo.unlink()


@pytest.mark.parametrize("stale_name", ["0-old-node.key", "zz-old-node.key"])
def test_an_address_two_keys_claim_is_trusted_for_neither(tmp_path: Path, stale_name: str) -> None:
    new = trust(tmp_path, "new", "tcp://10.0.0.7:5")
    old, _ = keygen(tmp_path / "old", "tcp://10.0.0.7:5,tcp://10.0.0.9:5")  # the address's former owner
    shutil.copyfile(old, tmp_path / "authorized" / stale_name)
    ring = KeyRing(str(tmp_path / "authorized"))
    ring.load()
    assert ring.key_for("tcp://10.0.0.7:5") is None
    assert ring.get(zmq.auth.load_certificate(str(new))[0]) is None
    old_key = zmq.auth.load_certificate(str(old))[0]
    assert ring.key_for("tcp://10.0.0.9:5") == old_key  # its other, uncontested address stays
    assert ring.get(old_key) is not None and ring.get(old_key).addresses == frozenset({"tcp://10.0.0.9:5"})
    assert any("2 different keys" in p for p in ring.problems)


async def test_a_key_bound_to_this_daemons_own_address_cannot_speak_as_it(tmp_path: Path) -> None:
    import zmq.asyncio

    from kvd.wire.peer import stamped

    pa = _free()
    keygen(tmp_path / "a", f"tcp://127.0.0.1:{pa}")  # a's own key is not in the directory
    (tmp_path / "authorized").mkdir()
    trust(tmp_path, "stale", f"tcp://127.0.0.1:{pa}")  # another key claims a's address
    a, ra, ta = await _hub(tmp_path, "a", pa)
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(
            str(tmp_path / "stale" / "kvd.key_secret"))
        sock.curve_serverkey = zmq.auth.load_certificate(str(tmp_path / "a" / "kvd.key"))[0]
        sock.connect(a.address)
        await sock.send(stamped(wp.EngineQuery(engine_id="forged"), a.address, "").encode())
        await _until(lambda: ra.errors.get("peer_identity"))
        assert ra.errors.get("peer_identity") == 1
        assert not any(getattr(m, "engine_id", "") == "forged" for m in ra.got)
    finally:
        sock.close()
        await ta.close()
        await a.stop()
        assert a.auth is not None
        a.auth.stop()

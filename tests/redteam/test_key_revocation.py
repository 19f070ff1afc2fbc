"""Red team: an operator revokes a compromised node by deleting its key file from
``peer.authorized_keys`` (notes/security-model.md: "revoke a compromised node by deleting its
key file"), and the node keeps talking.

The key ring reloads the directory only when an *unknown* key or address shows up
(``KeyRing.get`` / ``key_for`` rescan on a miss). A revoked key is still in the ring, found
without a rescan, so ZAP keeps admitting its connections and ``PeerAuth.admit`` its messages
(its "removed from the directory since it connected" branch is never reached) until some
other, unknown key happens to trigger a reload; a cluster whose membership does not change
never revokes anything.

Invariant: peers authenticate with keys the operator allows: a deleted key is refused (and
counted) within the rescan period."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvd import protocol as p
from tests.redteam.mallory import FLAGS, Mallory

pytestmark = pytest.mark.e2e


def test_a_deleted_key_is_refused(daemons, tmp_path: Path) -> None:
    pre = daemons("prefill", *FLAGS)
    m = Mallory(tmp_path, pre)
    try:
        m.send(p.EngineQuery(src=m.address, token="", engine_id="before"))
        assert m.expect(p.EngineInfo).engine_id == "before"  # authorized: answered
        (tmp_path / "trust" / "authorized" / "peer-mallory.key").unlink()  # the operator revokes mallory
        time.sleep(3.0)  # past the key ring's rescan period (1 s), and a heartbeat or two
        m.send(p.EngineQuery(src=m.address, token="", engine_id="after"))
        with pytest.raises(AssertionError, match="no EngineInfo"):
            m.expect(p.EngineInfo, timeout=3.0)  # KvdError-free: a revoked peer hears nothing
        assert pre.status()["daemon"]["errors"].get("peer_key_refused", 0) >= 1
    finally:
        m.close()

"""A daemon stopped (SIGTERM: ``systemctl stop``/``restart``) while engines are still connected,
their pools registered and a room in flight, stops cleanly.

Found by red team round 8: the stop closes the task owner first, then the engine connections;
each connection's end then failed its rooms (a fence task each) and asked for a pool reaper, and
``spawn`` refused ("task owner is closed"): an unhandled exception in the engine server's
connection callback, logged with its traceback, for every engine attached (what the fault kit
counts as a defect), which also skipped the rest of that connection's clean-up. Invariants: exit
status 0, no traceback in the log, and the engines see their connection end."""

from __future__ import annotations

import pytest

from kvd.client import KvdError
from kvd.hostpool import HostPool
from kvd.layout import PoolLayout

pytestmark = pytest.mark.e2e

SHAPE = dict(num_layers=2, total_kv_heads=4, head_dim=8, dtype="bfloat16", page_size=4, num_pages=16)


def test_a_daemon_stopped_with_engines_attached_stops_cleanly(daemons) -> None:
    pre, dec = daemons("prefill"), daemons("decode")
    pl, dl = PoolLayout("P", "prefill", 1, 0, **SHAPE), PoolLayout("D", "decode", 1, 0, **SHAPE)
    with HostPool.create(pl) as ph, HostPool.create(dl) as dh, pre.client() as pc, dec.client() as dc:
        pid = pc.register_pool(pl, ph, bootstrap=pre.address)
        did = dc.register_pool(dl, dh)
        dc.recv(did, 1, pre.address, "P", [1, 2])
        pc.send(pid, 1, [3], False)  # the room waits for its last chunk
        for d in (pre, dec):
            d.proc.terminate()
        for d in (pre, dec):
            assert d.proc.wait(20) == 0, d.log_tail()
        with pytest.raises(KvdError):
            dc.wait(1, timeout=5)
    for d in (pre, dec):
        log = d.log()
        assert "Traceback" not in log and "Unhandled exception" not in log, d.log_tail(12)

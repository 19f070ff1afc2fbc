"""Red team: a local engine (any user in ``socket.group``) names its engine with terminal
control sequences: an engine id is any string of up to 256 characters. ``kvctl status``, run by
root or the kvd user (who see every engine's rooms), printed the id as it was, so the operator's
terminal obeyed it: clear the screen, home the cursor, print a forged all-clear, retitle the
window, hide what follows. kvctl folded whitespace into one line per cell but let every other
control character through.

Invariant: what an engine or peer names is shown to the operator, never executed by the
operator's terminal (control characters are printed escaped)."""

from __future__ import annotations

import numpy as np
import pytest

from kvd.engineclient.hostpool import HostPool
from kvd.layout import PoolLayout
from kvd.ops import kvctl

pytestmark = pytest.mark.e2e

EVIL = "\x1b]0;kvd ok\x07\x1b[2J\x1b[Hkvd: 0 rooms, all healthy\x1b[8m\u202e"
SHAPE = dict(num_layers=1, total_kv_heads=1, head_dim=8, dtype="uint8", page_size=1, num_pages=8)


def test_kvctl_status_prints_control_characters_escaped(daemons, capsys) -> None:
    pre = daemons("prefill", "--timeouts-waiting-s", "60")
    pl = PoolLayout(EVIL, "prefill", 1, 0, **SHAPE)
    ph = HostPool.create(pl)
    try:
        with pre.client() as pc:
            pid = pc.register_pool(pl, ph, bootstrap=pre.address)
            pc.send(pid, 1, np.array([0]), False)  # a room: the engine's id is in the table
            capsys.readouterr()
            assert kvctl.main(["status", "--socket", pre.socket_path]) == 0
            out = capsys.readouterr().out
    finally:
        ph.close()
    assert "ROOM" in out
    assert not [c for c in out if not c.isprintable() and c != "\n"], "control characters reach the terminal"
    assert "\\x1b[2J" in out  # shown, escaped

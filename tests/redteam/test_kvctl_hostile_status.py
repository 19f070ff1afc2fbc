"""Red team round 9: ``kvctl status`` against a daemon whose status is hostile or odd.

kvctl promises to tolerate missing or odd fields and never to hand a control character to the
operator's terminal (``test_kvctl_escapes.py`` pinned the engine id). Found: chunk counts, the
senders that reported, the keys of a two-direction byte total and each path's fallbacks were
printed raw; a room with ``chunks_total`` but no ``chunks_done`` raised KeyError, peer paths
with keys of two types a TypeError, ``rooms`` that is not a list a TypeError, a NaN or infinite
figure a ValueError/OverflowError (msgpack carries both); and any ``peer_auth`` other than
"insecure" (an unknown mode, a mode a newer daemon adds) was printed as "peers curve",
authenticated. Here a scripted daemon serves such a status over the real engine socket."""

from __future__ import annotations

from typing import Any

import pytest

from kvd.ops import kvctl
from kvd.wire import engine as we
from kvd.wire import framing
from tests.support import ThreadedEngineServer

EVIL = "\x1b]0;kvd ok\x07\x1b[2J\x1b[Hall healthy\x1b[8m"

HOSTILE: list[dict[str, Any]] = [
    {"daemon": {"bytes_total": {EVIL: 5}, "errors": {EVIL: EVIL},
                "peer_paths": {"s": {"path": EVIL, "fallbacks": {EVIL: EVIL}}, 7: {"path": "tcp"}},
                "trust": {"peer_auth": "curve", "authorized_keys": EVIL}},
     "rooms": [{"room": 1, "chunks_total": EVIL, "chunks_done": EVIL, "senders_required": [EVIL],
                "senders_reported": [EVIL]}, {"room": 2, "chunks_total": 3}],
     "peers": [{"peer": EVIL}]},
    {"daemon": {"uptime_s": float("nan"), "bytes_total": float("inf"), "trust": {"peer_auth": "not started"}},
     "rooms": [{"room": 3, "age_s": float("-inf"), "bytes_done": float("nan"), "bytes_total": 2**63}]},
    {"daemon": 5, "rooms": 5, "peers": "x"},
    {"daemon": {"trust": {"peer_auth": ["curve"]}}, "rooms": [5, None, {"room": {"a": 1}}]},
]


class HostileDaemon(ThreadedEngineServer):
    def __init__(self, path: str, status: dict[str, Any]) -> None:
        super().__init__(path)
        self.status = status

    def handle(self, msg: Any, writer: Any) -> bool:
        writer.write(framing.frame(we.StatusReply(req_id=msg.req_id, status=self.status).encode()))
        return True


@pytest.mark.parametrize("status", HOSTILE)
def test_kvctl_renders_a_hostile_status_safely(tmp_path, capsys, status: dict[str, Any]) -> None:
    sock = str(tmp_path / "kvd.sock")
    with HostileDaemon(sock, status):
        capsys.readouterr()
        assert kvctl.main(["status", "--socket", sock]) == 0
        out = capsys.readouterr().out
    assert not [c for c in out if not c.isprintable() and c != "\n"], "control characters reach the terminal"
    trust = [line for line in out.splitlines() if line.startswith("trust:")]
    daemon = status.get("daemon")
    mode = daemon.get("trust", {}).get("peer_auth") if isinstance(daemon, dict) else None
    if mode is not None and mode != "curve":
        assert trust and "curve" not in trust[0] and "UNKNOWN" in trust[0]


def test_insecure_is_spelled_out() -> None:
    out = kvctl.render_status({"daemon": {"trust": {"peer_auth": "insecure", "token": True}}})
    assert "trust: INSECURE" in out and "shared token on" in out

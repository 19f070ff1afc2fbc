"""Red team: an authorized peer (mallory) asks a prefill daemon's directory about engines that do
not exist: 32 EngineQuery messages, each naming a different 4 MiB engine id; or announces 32
prefill ranks of engines with such ids (RankAnnounce); or sends 32 answers about such engines
that nobody asked for (EngineInfo: the client role caches every ready answer).

The directory remembers every asker of an engine that is not complete yet, so it can push the
answer later (``Directory._watchers``: engine id -> askers), and forgets an entry only when that
engine becomes ready or conflicts. Nothing bounds the number of engines or the length of their
ids (engines' own ids are held to 256 characters on the Unix socket; a peer's are not), so each
query keeps its 4 MiB id for good: 128 MiB here, as much as the peer likes in general (distinct
short ids grow it just the same, one entry per query). A RankAnnounce's layout is parsed first,
and ``PoolLayout.from_dict`` keeps the last 1,024 layouts it parsed, 4 MiB id and all, besides the
directory's own entry for the rank.

Invariants: memory stays bounded; bad input gets a clear error and a counter."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvd import protocol as p
from kvd.layout import PoolLayout
from tests.redteam.mallory import FLAGS, SHAPE, Mallory

pytestmark = pytest.mark.e2e

QUERIES, ID_BYTES = 32, 4 << 20


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def _query(m: Mallory, engine: str) -> p.Message:
    return p.EngineQuery(src=m.address, token="", engine_id=engine)


def _announce(m: Mallory, engine: str) -> p.Message:
    layout = PoolLayout("E", "prefill", 1, 0, **SHAPE).to_dict() | {"engine_id": engine}
    return p.RankAnnounce(src=m.address, token="", layout=layout, pool_key=f"{m.address}#x#1")


def _info(m: Mallory, engine: str) -> p.Message:
    """An answer nobody asked for, about an engine of that name (the client role keeps it)."""
    layout = PoolLayout("E", "prefill", 1, 0, **SHAPE).to_dict()
    return p.EngineInfo(src=m.address, token="", engine_id=engine, ready=True, tp_size=1, layouts=[layout],
                        daemons=[m.address])


@pytest.mark.parametrize("make", [_query, _announce, _info], ids=["query", "announce", "info"])
def test_long_engine_ids_from_a_peer_do_not_grow_the_directory_without_bound(daemons, tmp_path: Path, make) -> None:
    pre = daemons("prefill", *FLAGS)
    m = Mallory(tmp_path, pre)
    try:
        m.send(p.EngineQuery(src=m.address, token="", engine_id="warm-up"))
        m.expect(p.EngineInfo)
        time.sleep(0.5)
        before = _rss(pre.proc.pid)
        for i in range(QUERIES):
            m.send(make(m, f"{i:04d}" + "x" * ID_BYTES))
            time.sleep(0.05)
        time.sleep(3.0)  # handled (and any answer sent back)
        grown = _rss(pre.proc.pid) - before
        assert pre.alive()
        assert grown < 32 << 20, (f"the prefill daemon's RSS grew {grown >> 20} MiB after {QUERIES} messages "
                                  f"naming {ID_BYTES >> 20} MiB engine ids")
        assert pre.status()["daemon"]["errors"], "refused without a counter"
    finally:
        m.close()

"""End to end, byte for byte: real daemons, real Mooncake TCP, fake engine rank processes,
every kind of prefill/decode TP combination on the direct (per-slice) path."""

from __future__ import annotations

import pytest

from e2e_cluster import run_cluster

pytestmark = pytest.mark.e2e


def _check(reports) -> None:
    bad = [(r.role, r.rank, r.rooms_failed, r.mismatches[:3], r.error) for r in reports if not r.ok]
    assert not bad, bad
    assert any(r.role == "decode" and r.bytes > 0 for r in reports)


@pytest.mark.parametrize("prefill_tp, decode_tp, kv_heads", [
    (1, 1, 4),   # same TP
    (1, 2, 4), (2, 1, 4), (4, 1, 8), (1, 4, 8), (2, 4, 8), (4, 2, 8), (8, 2, 8),
    (4, 2, 2), (2, 4, 2),  # GQA: 2 kv heads replicated on TP 4 (both directions)
    (4, 4, 2), (2, 8, 2),
])
def test_hetero_tp_byte_exact(pair, prefill_tp, decode_tp, kv_heads):
    prefill, decode = pair
    _check(run_cluster(prefill, decode, prefill_tp=prefill_tp, decode_tp=decode_tp, kv_heads=kv_heads))


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 4), (4, 1), (1, 1)])
def test_mla_byte_exact(pair, prefill_tp, decode_tp):
    prefill, decode = pair
    _check(run_cluster(prefill, decode, prefill_tp=prefill_tp, decode_tp=decode_tp, mla=True,
                       head_dim=24))

"""Red team round 14: shapes the other SGLang tests do not cover, SGLang's real classes over two
real kvd daemons, in the scheduler's call order (``run_pd``).

Attack: MLA with prefill TP != decode TP (odd pairs included), GQA with fewer KV heads than TP on
both sides, odd TP pairs (3->2, 2->6), page sizes 1 and 64, a chunked prefill whose last chunk
is empty. Invariant: every decode rank's pages are byte-exact to the prefill's global KV, its aux
(MetadataBuffers) rows byte-exact to the prefill's, and both sides poll Success (or a clean
Failed with a reason: ``run_pd`` prints it and fails the test).
"""

from __future__ import annotations

import pytest

from tests.sglang.test_transfer import gloo, run_pd  # noqa: F401  (gloo: a fixture)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("ptp,dtp", [(3, 2), (2, 3), (1, 4), (4, 1), (2, 6)])
def test_mla_hetero(pair, gloo, ptp, dtp):  # noqa: F811
    assert run_pd(pair, gloo, ptp=ptp, dtp=dtp, mla=True, rooms=1) > 0


@pytest.mark.parametrize("ptp,dtp,heads", [(4, 4, 2), (2, 4, 1), (4, 2, 1), (3, 2, 6), (2, 6, 6), (3, 2, 1),
                                           (2, 6, 2)])
def test_gqa_odd(pair, gloo, ptp, dtp, heads):  # noqa: F811
    assert run_pd(pair, gloo, ptp=ptp, dtp=dtp, heads=heads, rooms=1) > 0


@pytest.mark.parametrize("page_size,ptp,dtp", [(1, 1, 1), (1, 2, 1), (64, 1, 1), (64, 1, 2), (64, 3, 2)])
def test_page_sizes(pair, gloo, page_size, ptp, dtp):  # noqa: F811
    assert run_pd(pair, gloo, ptp=ptp, dtp=dtp, heads=6, page_size=page_size, num_pages=16, rooms=2,
                  pages_per_room=3, chunk_pages=2) > 0


@pytest.mark.parametrize("ptp,dtp", [(2, 1), (1, 2)])
def test_chunked_zero_page_last_hetero(pair, gloo, ptp, dtp):  # noqa: F811
    assert run_pd(pair, gloo, ptp=ptp, dtp=dtp, pages_per_room=4, chunk_pages=2, zero_last=True) > 0

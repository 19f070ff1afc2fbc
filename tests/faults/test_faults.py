"""Faults against real daemons on separate network-namespace nodes, on the direct, staged and
HiSparse paths, asserting kvd's invariants (tools/faultkit.py lists them): every room ends
within its deadline, byte-exact or failed with a reason, zero bytes after release (a sentinel
written into released pages survives the healed fault), rooms and staging reclaimed, the
sender never reports success for a room its receiver failed, other rooms unaffected, and the
cluster serves a fresh byte-exact transfer afterwards.

The three paths of one fault run at once (each in its own namespaces) to keep the suite
short; the first test of a fault runs them and the others read the cached result.
"""

from __future__ import annotations

import pytest

from tools.faultkit import DEFECTS, FAULTS, PATHS, Result, run_many

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

_cache: dict[str, dict] = {}


@pytest.fixture(scope="session")
def fault_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")

    def get(fault: str, path: str) -> Result:
        if fault not in _cache:
            _cache[fault] = run_many(base, [(p, fault) for p in PATHS])
        return _cache[fault][(path, fault)]

    return get


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fault", [pytest.param(f, marks=pytest.mark.defect(*DEFECTS.get(f, ()))) for f in FAULTS])
def test_fault(fault_results, fault, path):
    res = fault_results(fault, path)
    print(res.summary())
    assert not res.violations, res.summary()

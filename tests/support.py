"""The end-to-end tests' cluster runner lives in tools/cluster.py (shared with the benchmarks)."""

from tools.cluster import failures, hisparse_plan, make_plan, run_cluster, throughput


def check_reports(reports) -> None:
    """Every rank ok (byte-exact, every room done) and some bytes actually verified."""
    bad = failures(reports)
    assert not bad, bad
    assert any(r.role == "decode" and r.bytes > 0 for r in reports)


__all__ = ["check_reports", "failures", "hisparse_plan", "make_plan", "run_cluster", "throughput"]

"""The end-to-end tests' cluster runner lives in tools/cluster.py (shared with the benchmarks)."""

from tools.cluster import hisparse_plan, make_plan, run_cluster, throughput

__all__ = ["hisparse_plan", "make_plan", "run_cluster", "throughput"]

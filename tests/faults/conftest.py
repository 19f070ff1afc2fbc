"""The fault-injection suite: real daemons on network-namespace "nodes" (tools/netns.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.netns import leftover_namespaces, sh  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "defect(*numbers): the issue-12 defects a fault test covers")
    config.addinivalue_line("markers", "faults: fault injection against daemons in network namespaces")


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_namespaces():
    """Namespaces of a crashed earlier run would only waste addresses: remove them first."""
    for ns in leftover_namespaces():
        sh("ip", "netns", "del", ns, check=False)
    yield

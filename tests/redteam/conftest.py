"""Fixtures the in-memory red-team tests share."""

from __future__ import annotations

import pytest

from tests.sides.pair import Cluster


@pytest.fixture
async def cluster():
    """Two fake daemons over the in-memory transport and peers of tests/sides/pair.py."""
    c = Cluster()
    yield c
    await c.close()

"""Fixtures that start real kvd daemon processes on loopback (real Mooncake over TCP)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import DaemonProc, free_port, start_daemon  # noqa: E402

__all__ = ["DaemonProc", "free_port", "start_daemon"]

@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    """Factory: daemons("prefill", *flags) starts one more daemon; all stop at teardown."""
    started: list[DaemonProc] = []

    def make(name: str, *extra: str, env: dict[str, str] | None = None) -> DaemonProc:
        d = start_daemon(tmp_path, name, *extra, env=env)
        started.append(d)
        return d

    yield make
    for d in started:
        d.begin_stop()
    for d in started:
        d.stop()


@pytest.fixture
def pair(daemons) -> tuple[DaemonProc, DaemonProc]:
    """A prefill daemon and a decode daemon with short timeouts."""
    from tests.support import PAIR_FLAGS

    return daemons("prefill", *PAIR_FLAGS), daemons("decode", *PAIR_FLAGS)

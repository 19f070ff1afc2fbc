"""kvd.metrics: counters, gauges and histograms in a per-daemon registry, and /metrics over HTTP."""

from __future__ import annotations

import re
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from kvd.metrics import DIRECTIONS, Metrics


def sample(text: str | bytes, name: str, **labels: str) -> float | None:
    """The value of one sample in exposition text; None if it is absent."""
    if isinstance(text, bytes):
        text = text.decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
        if got == want:
            return float(m.group(3))
    return None


def free_port() -> int:
    """A TCP port free on loopback right now (as tests/conftest.py picks peer ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        assert resp.status == 200
        return resp.read().decode()


# --- unit tests -------------------------------------------------------------------------------


def test_observe_batch_records_bytes_ops_and_a_speed_sample_of_the_same_batch() -> None:
    m = Metrics()
    m.observe_batch(4_000_000, 0.002, 7)  # 2 GB/s
    text = m.render()
    assert sample(text, "kvd_bytes_total", direction="sent") == 4_000_000
    assert sample(text, "kvd_write_ops_total") == 7
    assert sample(text, "kvd_batches_total") == 1
    assert sample(text, "kvd_transfer_speed_bytes_per_second_count") == 1
    assert sample(text, "kvd_transfer_speed_bytes_per_second_sum") == pytest.approx(2e9)
    assert sample(text, "kvd_batch_seconds_count") == 1
    assert sample(text, "kvd_batch_seconds_sum") == pytest.approx(0.002)
    # 2e9 B/s lies in the bucket above 1e6 * 2**10 (1.024e9) and below 1e6 * 2**11 (2.048e9).
    assert sample(text, "kvd_transfer_speed_bytes_per_second_bucket", le="1.024e+09") == 0
    assert sample(text, "kvd_transfer_speed_bytes_per_second_bucket", le="2.048e+09") == 1


def test_observe_batch_speed_is_per_batch_not_mixed_across_batches() -> None:
    m = Metrics()
    m.observe_batch(1_000_000, 1.0, 1)  # 1 MB/s
    m.observe_batch(1_000_000_000, 0.5, 1)  # 2 GB/s
    text = m.render()
    assert sample(text, "kvd_transfer_speed_bytes_per_second_count") == 2
    # The sum of per-batch speeds, not total bytes over total time (~0.67 GB/s).
    assert sample(text, "kvd_transfer_speed_bytes_per_second_sum") == pytest.approx(1e6 + 2e9)
    assert sample(text, "kvd_bytes_total", direction="sent") == 1_001_000_000


def test_observe_batch_without_time_counts_bytes_but_no_speed() -> None:
    m = Metrics()
    m.observe_batch(1024, 0.0, 2)
    text = m.render()
    assert sample(text, "kvd_bytes_total", direction="sent") == 1024
    assert sample(text, "kvd_write_ops_total") == 2
    assert sample(text, "kvd_transfer_speed_bytes_per_second_count") == 0
    assert sample(text, "kvd_batch_seconds_count") == 0


def test_observe_batch_refuses_negative_values() -> None:
    m = Metrics()
    with pytest.raises(ValueError):
        m.observe_batch(-1, 0.1, 1)
    with pytest.raises(ValueError):
        m.observe_batch(1, 0.1, -1)
    with pytest.raises(ValueError):
        m.add_received(-5)
    assert m.snapshot()["bytes_sent"] == 0


def test_received_bytes_and_room_latency() -> None:
    m = Metrics()
    m.add_received(300)
    m.add_received(200)
    m.observe_room(0.2)
    m.observe_room(-1.0)  # clamped to 0, never a negative sample
    text = m.render()
    assert sample(text, "kvd_bytes_total", direction="received") == 500
    assert sample(text, "kvd_transfer_latency_seconds_count") == 2
    assert sample(text, "kvd_transfer_latency_seconds_sum") == pytest.approx(0.2)


def test_error_counters_by_kind() -> None:
    m = Metrics()
    m.error("timeout")
    m.error("timeout")
    m.error("protocol")
    m.error("")  # an empty kind still counts, as "unknown"
    text = m.render()
    assert sample(text, "kvd_errors_total", kind="timeout") == 2
    assert sample(text, "kvd_errors_total", kind="protocol") == 1
    assert sample(text, "kvd_errors_total", kind="unknown") == 1
    assert m.snapshot()["errors"] == {"timeout": 2, "protocol": 1, "unknown": 1}


def test_set_rooms_gauge_and_dropping_to_zero() -> None:
    m = Metrics()
    m.set_rooms({("decode", "transferring"): 3, ("prefill", "waiting_for_input"): 1})
    text = m.render()
    assert sample(text, "kvd_rooms", role="decode", state="transferring") == 3
    assert sample(text, "kvd_rooms", role="prefill", state="waiting_for_input") == 1
    # A pair no longer present drops to 0 (it does not keep its stale value).
    m.set_rooms({("decode", "success"): 2})
    text = m.render()
    assert sample(text, "kvd_rooms", role="decode", state="transferring") == 0
    assert sample(text, "kvd_rooms", role="prefill", state="waiting_for_input") == 0
    assert sample(text, "kvd_rooms", role="decode", state="success") == 2
    m.set_rooms({})
    assert sample(m.render(), "kvd_rooms", role="decode", state="success") == 0


def test_render_names_every_metric() -> None:
    text = Metrics().render().decode()
    for name in ("kvd_rooms", "kvd_bytes_total", "kvd_write_ops_total", "kvd_errors_total",
                 "kvd_batches_total", "kvd_transfer_latency_seconds", "kvd_transfer_speed_bytes_per_second",
                 "kvd_batch_seconds"):
        assert name in text, name
    # Both directions are exported from the start, at zero, so rate() has a baseline.
    for direction in DIRECTIONS:
        assert sample(text, "kvd_bytes_total", direction=direction) == 0


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.error("timeout")
    a.observe_batch(10, 0.1, 1)
    assert b.snapshot()["errors"] == {}
    assert b.snapshot()["bytes_sent"] == 0


def test_snapshot_shape() -> None:
    m = Metrics()
    assert m.snapshot() == {"errors": {}, "bytes_sent": 0, "bytes_received": 0, "write_ops": 0, "batches": 0,
                            "inline_writes": 0}
    m.observe_batch(100, 0.01, 3)
    m.observe_batch(50, 0.01, 2)
    m.add_received(7)
    m.observe_inline(256)  # bytes sent inside a status: counted as sent, no op, no batch
    m.error("peer_dead")
    snap = m.snapshot()
    assert snap == {"errors": {"peer_dead": 1}, "bytes_sent": 406, "bytes_received": 7, "write_ops": 5,
                    "batches": 2, "inline_writes": 1}
    assert all(isinstance(v, int) for k, v in snap.items() if k != "errors")


def test_start_http_serves_metrics_and_stop_http_stops_it() -> None:
    m = Metrics()
    m.error("protocol")
    port = m.start_http("127.0.0.1:0")
    try:
        assert port > 0
        url = f"http://127.0.0.1:{port}/metrics"
        text = fetch(url)
        assert "kvd_rooms" in text or "kvd_bytes_total" in text
        assert sample(text, "kvd_errors_total", kind="protocol") == 1
        m.error("protocol")  # a later scrape sees the new value
        assert sample(fetch(url), "kvd_errors_total", kind="protocol") == 2
        with pytest.raises(RuntimeError):
            m.start_http("127.0.0.1:0")
    finally:
        m.stop_http()
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        fetch(f"http://127.0.0.1:{port}/metrics", timeout=2)
    m.stop_http()  # idempotent
    # The port is free again, and the instance can serve again.
    port2 = m.start_http(f"127.0.0.1:{port}")
    try:
        assert port2 == port
        assert "kvd_errors_total" in fetch(f"http://127.0.0.1:{port}/metrics")
    finally:
        m.stop_http()


def test_start_http_bad_address_and_taken_port() -> None:
    m = Metrics()
    with pytest.raises(ValueError):
        m.start_http("not an address")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError):
            m.start_http(f"127.0.0.1:{s.getsockname()[1]}")


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_daemon_serves_metrics_and_counts_protocol_errors(daemons: Callable[..., Any]) -> None:
    port = free_port()
    d = daemons("metrics", "--metrics-address", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"
    text = fetch(url)
    assert "kvd_rooms" in text
    assert "kvd_errors_total" in text
    before = sample(text, "kvd_errors_total", kind="protocol") or 0.0

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(d.socket_path)
        payload = b"\xc1junk"
        s.sendall(struct.pack(">I", len(payload)) + payload)
        assert s.recv(65536)  # an error reply comes back; the daemon lives on

    deadline = time.monotonic() + 5
    after = before
    while time.monotonic() < deadline:
        after = sample(fetch(url), "kvd_errors_total", kind="protocol") or 0.0
        if after > before:
            break
        time.sleep(0.1)
    assert after == before + 1
    assert d.alive()
    assert d.status()["daemon"]["errors"].get("protocol") == 1

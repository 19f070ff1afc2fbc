"""Prometheus metrics for one daemon, in a registry of its own.

Not the global registry: tests (and the demo) run several daemons in one process and
each needs its own counters. Every speed figure is bytes and time of the *same* batch
(``observe_batch``), never bytes of one batch over the time of another, the "wrong speed
figures" operators see elsewhere. The methods are thread-safe (prometheus_client locks),
so executor threads may call them; nothing here blocks except ``start_http``'s bind.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)

from kvd.core.config import parse_host_port

__all__ = ["DIRECTIONS", "Metrics"]

DIRECTIONS = ("sent", "received")

# Room latency: from a fast local 1 ms to the 300 s waiting timeout.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# One Mooncake batch: 50 us (a few small RDMA writes) to a minute (a long chunk over TCP).
_BATCH_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    5,
    60,
)
# Bytes/s: 1 MB/s (something is wrong) to 400 GB/s (NVLink-class); ~x2 steps.
_SPEED_BUCKETS = tuple(float(1e6 * 2**i) for i in range(0, 20))


#: /metrics connections served at once (a scrape is one short request): past it a connection is
#: closed at once and counted (``metrics_busy``), so nobody who reaches the port can make the
#: daemon start a thread per connection it holds open.
HTTP_MAX_CONNECTIONS = 8
#: Seconds a /metrics connection may stay silent while its request is read or its reply written,
#: and, in all, that it may take to send its request and take its reply: a client that drips a
#: byte now and then is cut off too (a scrape takes milliseconds).
HTTP_TIMEOUT_S = 5.0


class _QuietHandler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT_S  # a socket timeout on every read and write of the connection

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's threading WSGI server with a bound on the connections it serves at
    once (one thread each) and a timeout on each (see ``HTTP_MAX_CONNECTIONS``)."""

    daemon_threads = True
    on_refused: Callable[[], None] = staticmethod(lambda: None)

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler]) -> None:
        # The family the address resolves to (an IPv6 literal or name included), as prometheus_client does.
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM,
                                                 flags=socket.AI_PASSIVE)[0][0]
        self._slots = threading.BoundedSemaphore(HTTP_MAX_CONNECTIONS)
        self._deadlines: dict[Any, float] = {}  # connection being served -> when it is cut off
        self._deadlines_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.on_refused()
            self.shutdown_request(request)
            return
        with self._deadlines_lock:
            self._deadlines[request] = time.monotonic() + HTTP_TIMEOUT_S
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)
            self._slots.release()

    def _forget(self, request: Any) -> None:
        with self._deadlines_lock:
            self._deadlines.pop(request, None)

    def service_actions(self) -> None:
        """Between accepts (serve_forever's loop, every poll interval): cut off connections past
        their deadline; the read or write their thread waits in then ends at once."""
        now = time.monotonic()
        with self._deadlines_lock:
            late = [r for r, deadline in self._deadlines.items() if deadline < now]
        for request in late:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or went away: nothing to print on the daemon's stderr


class Metrics:
    """The counters, gauges and histograms ``kvd`` exports, and a ``snapshot`` for ``kvctl status``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._rooms = Gauge("kvd_rooms", "Rooms by role and state", ["role", "state"], registry=r)
        self._bytes = Counter("kvd_bytes", "KV bytes moved", ["direction"], registry=r)
        self._ops = Counter("kvd_write_ops", "Remote write operations issued", registry=r)
        self._errors = Counter("kvd_errors", "Errors by kind", ["kind"], registry=r)
        self._batches = Counter("kvd_batches", "Write batches completed", registry=r)
        self._inline = Counter("kvd_inline_writes", "Tiny writes sent inside a status message "
                               "(the receiving daemon copies them; no transport write)", registry=r)
        self._latency = Histogram(
            "kvd_transfer_latency_seconds",
            "Room latency, from the room's start to its final state",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self._speed = Histogram(
            "kvd_transfer_speed_bytes_per_second",
            "Per-batch speed: bytes of a batch over the time of that same batch",
            registry=r,
            buckets=_SPEED_BUCKETS,
        )
        self._batch_seconds = Histogram(
            "kvd_batch_seconds", "Time to complete one write batch", registry=r, buckets=_BATCH_BUCKETS
        )
        self._staging = Gauge("kvd_staging_bytes", "Staging pool bytes: pool, reserved (granted regions), "
                              "in_use (holding data)", ["kind"], registry=r)
        self._staging_waiting = Gauge("kvd_staging_waiting", "Allocations waiting for staging space",
                                      registry=r)
        for direction in DIRECTIONS:  # export zeros from the start, so rate() has a baseline
            self._bytes.labels(direction=direction)
        # The hot counters' children, bound once (labels() costs a lookup under a lock per call).
        self._sent, self._received = self._bytes.labels(direction="sent"), self._bytes.labels(direction="received")
        self._room_labels: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def set_rooms(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Set room counts by ``(role, state)``; a pair seen before and now absent drops to 0."""
        with self._lock:  # two callers must not interleave zeroing and setting
            for role, state in self._room_labels - set(counts):
                self._rooms.labels(role=role, state=state).set(0)
            for (role, state), n in counts.items():
                self._rooms.labels(role=role, state=state).set(n)
            self._room_labels |= set(counts)

    def set_staging(self, pool: int, reserved: int, in_use: int, waiting: int) -> None:
        for kind, value in (("pool", pool), ("reserved", reserved), ("in_use", in_use)):
            self._staging.labels(kind=kind).set(value)
        self._staging_waiting.set(waiting)

    def observe_batch(self, nbytes: int, seconds: float, ops: int) -> None:
        """Record one completed write batch: bytes sent, ops, its time, and its speed.

        The speed is ``nbytes / seconds`` of this batch; a batch with no measurable
        time (``seconds <= 0``) still counts its bytes but adds no speed sample.
        """
        if nbytes < 0 or ops < 0:
            raise ValueError(f"batch bytes and ops must be >= 0, got {nbytes} bytes, {ops} ops")
        self._sent.inc(nbytes)
        self._ops.inc(ops)
        self._batches.inc()
        if seconds > 0:
            self._batch_seconds.observe(seconds)
            self._speed.observe(nbytes / seconds)

    def observe_inline(self, nbytes: int) -> None:
        """Record one inline write: its bytes count as sent, with no transport op or batch."""
        if nbytes < 0:
            raise ValueError(f"inline bytes must be >= 0, got {nbytes}")
        self._sent.inc(nbytes)
        self._inline.inc()

    def add_received(self, nbytes: int) -> None:
        """Count bytes that landed here (writes are one-sided: the receiver learns of them).

        The daemon calls this with a receiver room's bytes when the room completes (through
        ``RoomContext.observe_room``): the counter moves once per successful room, and bytes
        that landed in a room that then failed are not counted.
        """
        if nbytes < 0:
            raise ValueError(f"received bytes must be >= 0, got {nbytes}")
        self._received.inc(nbytes)

    def observe_room(self, seconds: float) -> None:
        """Record one room's latency, start to final state (Success or Failed)."""
        self._latency.observe(max(0.0, seconds))

    def error(self, kind: str) -> None:
        """Count one error of ``kind``: a short fixed word ("timeout", "bad_message", "peer_dead")."""
        self._errors.labels(kind=kind or "unknown").inc()

    def render(self) -> bytes:
        """The exposition text a scrape would get."""
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """Counter values for ``kvctl status``.

        ``{"errors": {kind: n}, "bytes_sent": n, "bytes_received": n, "write_ops": n, "batches": n}``.
        """
        by_direction = self._values(self._bytes, "direction")
        return {
            "errors": {k: int(v) for k, v in self._values(self._errors, "kind").items()},
            "bytes_sent": int(by_direction.get("sent", 0)),
            "bytes_received": int(by_direction.get("received", 0)),
            "write_ops": int(self._values(self._ops, None).get("", 0)),
            "batches": int(self._values(self._batches, None).get("", 0)),
            "inline_writes": int(self._values(self._inline, None).get("", 0)),
        }

    @staticmethod
    def _values(counter: Counter, label: str | None) -> dict[str, float]:
        out: dict[str, float] = {}
        for family in counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels.get(label, "") if label else ""] = sample.value
        return out

    def start_http(self, address: str) -> int:
        """Serve ``/metrics`` on ``"host:port"`` (port 0 = any free one) in a daemon thread.

        Returns the bound port. Raises ``ValueError`` on a bad address, ``OSError`` if
        the port is taken.
        """
        if self._server is not None:
            raise RuntimeError("metrics HTTP server already started")
        host, port = parse_host_port(address)
        server = _BoundedServer((host or "0.0.0.0", port), _QuietHandler)
        server.on_refused = lambda: self.error("metrics_busy")
        server.set_app(make_wsgi_app(self.registry))
        thread = threading.Thread(target=server.serve_forever, name="kvd-metrics", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def stop_http(self) -> None:
        """Stop the ``/metrics`` server, if one runs (daemon shutdown, tests)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

"""Helpers shared by the tests: the cluster runner (tools/cluster.py, shared with the
benchmarks), the report check, and a scripted engine-protocol server for client tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
from typing import Any

from kvd.wire import codec, fdmsg, framing
from tools.cluster import failures, hisparse_plan, make_plan, run_cluster, throughput


class ThreadedEngineServer:
    """Speaks the engine protocol on a Unix socket from its own thread and event loop, so the
    blocking client can be tested too. Subclasses answer each decoded request in ``handle``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fds: dict[str, int] = {}  # descriptors engines handed over, by ticket
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._fd_sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._fd_thread = threading.Thread(target=self._serve_fds, daemon=True)

    def __enter__(self) -> Any:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fdmsg.fd_socket_path(self.path))
        self._fd_sock.bind(fdmsg.fd_socket_path(self.path))
        self._fd_sock.listen(16)
        self._fd_thread.start()
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
        self._fd_sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fdmsg.fd_socket_path(self.path))

    def _serve_fds(self) -> None:
        """The fd hand-over beside the engine socket (kvd.wire.fdmsg): one descriptor, one ticket."""
        while True:
            try:
                conn, _ = self._fd_sock.accept()
            except OSError:
                return
            with conn:
                _, fds, _, _ = socket.recv_fds(conn, len(fdmsg.MAGIC), 1)
                ticket = secrets.token_hex(fdmsg.TICKET_CHARS // 2)
                self.fds[ticket] = fds[0]
                conn.send(fdmsg.ok_reply(ticket))

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_unix_server(self._serve, path=self.path)
        self._ready.set()
        await self._stop.wait()
        server.close()
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = framing.FrameBuffer()
        try:
            while data := await reader.read(65536):
                frames.feed(data)
                while (payload := frames.next_payload()) is not None:
                    if not self.handle(codec.decode(payload), writer):
                        return
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def handle(self, msg: Any, writer: asyncio.StreamWriter) -> bool:
        """Answer one request by writing frames to ``writer``; False closes the connection."""
        raise NotImplementedError


def check_reports(reports) -> None:
    """Every rank ok (byte-exact, every room done) and some bytes actually verified."""
    bad = failures(reports)
    assert not bad, bad
    assert any(r.role == "decode" and r.bytes > 0 for r in reports)


__all__ = ["PAIR_FLAGS", "WRITES", "ThreadedEngineServer", "check_reports", "failures", "hisparse_plan", "make_plan",
           "run_cluster", "throughput", "writes_checked", "writes_pair"]


# How the bytes of an end-to-end room move: Mooncake writes (inline off), or inside the status
# (kvd.core.inline; the e2e rooms are small enough). Tests parametrized over both.
WRITES = {"mooncake": ("--transfer-inline-max-bytes", "0"), "inline": ()}
PAIR_FLAGS = ("--timeouts-waiting-s", "8", "--timeouts-bootstrap-s", "5", "--timeouts-transfer-s", "8",
              "--timeouts-abort-fence-s", "2")


def writes_pair(daemons, writes: str):
    """A prefill and a decode daemon (the ``pair`` fixture's timeouts) writing as ``writes`` says."""
    return daemons("prefill", *PAIR_FLAGS, *WRITES[writes]), daemons("decode", *PAIR_FLAGS, *WRITES[writes])


def writes_checked(prefill, writes: str) -> None:
    """The path the parameter names is the one the bytes took (the prefill daemon's counters)."""
    st = prefill.status()["daemon"]
    inline, ops = st["inline_writes_total"], st["write_ops_total"]
    assert (inline > 0 and ops == 0) if writes == "inline" else (inline == 0 and ops > 0), (writes, inline, ops)

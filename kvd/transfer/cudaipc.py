"""CUDA IPC between the daemons of one machine: export registered GPU regions, open a peer's, copy.

A daemon's GPU regions are either its own allocations (staging pools: ``cuIpcGetMemHandle``
works on them) or engine pools it opened from CUDA IPC handles itself (those cannot be
exported again; their original handle is found in torch's IPC cache, which
``rebuild_cuda_tensor`` filled when the pool was opened). :class:`IpcEndpoint` serves the
list of exportable regions on an abstract Unix socket named after the transport's session
id, to processes of the same user only (``SO_PEERCRED``); an abstract socket exists only in
this machine's network namespace, so reaching it is what "same node" means, and the reply's
boot id confirms it. :class:`IpcPeer` opens a peer's regions (``cuIpcOpenMemHandle``) and
maps its addresses to ours.

The driver calls themselves are in :mod:`kvd.transfer.cudadriver` (re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvd.core.planner import RegionIndex
from kvd.transfer.base import TransportError
from kvd.transfer.cudadriver import Cuda, cuda, open_handle

__all__ = ["Cuda", "ExportedRegion", "IpcEndpoint", "IpcPeer", "boot_id", "cuda", "endpoint_name",
           "endpoint_reachable"]


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def endpoint_name(session_id: str) -> bytes:
    """The abstract socket a transport with this session id serves its regions on."""
    return b"\0kvd-ipc/" + session_id.encode()


def endpoint_reachable(session_id: str) -> bool:
    """Whether a same-node endpoint serves ``session_id`` here: a non-blocking connect to its
    abstract socket (those exist only in this machine's network namespace). Never waits."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(endpoint_name(session_id))
        s.send(b"G")  # the endpoint's cheapest question; the answer is not awaited
        return True
    except OSError:
        return False
    finally:
        s.close()


@dataclass(frozen=True)
class ExportedRegion:
    """A registered region as a peer on this machine can open it: ``addr`` lies ``addr - base``
    bytes into the allocation the ``handle`` names."""

    addr: int
    length: int
    base: int
    handle: bytes
    device: int

    def to_json(self) -> dict[str, Any]:
        return {"addr": self.addr, "length": self.length, "base": self.base, "handle": self.handle.hex(),
                "device": self.device}


def _torch_ipc_origin(addr: int, length: int) -> tuple[bytes, int] | None:
    """(handle, base) of memory this process opened through torch's CUDA IPC (an engine pool)."""
    try:
        import torch
        from torch.multiprocessing.reductions import shared_cache
    except ImportError:
        return None
    for key, ref in list(shared_cache.items()):
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], bytes)):
            continue
        handle, offset = key
        if len(handle) == 66 and handle[1:2] == b"c":
            # torch's shareable handle: version byte, b"c" (a cudaMalloc block), the 64-byte IPC handle
            handle = handle[2:]
        if len(handle) != 64:
            continue  # expandable segments: not a legacy CUDA IPC handle
        with contextlib.suppress(Exception):
            if ref.expired():
                continue
            storage = torch.UntypedStorage._new_with_weak_ptr(ref.cdata)
            ptr, size = storage.data_ptr(), storage.nbytes()
            if ptr <= addr and addr + length <= ptr + size:
                return handle, ptr - int(offset)
    return None


def _address_range(c: Any, addr: int, device: int) -> tuple[int, int]:
    """The allocation around ``addr``, asked in the context that maps it: memory of GPU 1 that
    this process mapped from another process's IPC handle while GPU 0's context was current is
    known to that context only (cuMemGetAddressRange answers NOT_FOUND in GPU 1's; seen on two
    H200s). The memory's own device first, then every other."""
    error: TransportError | None = None
    for ctx_device in (device, *(d for d in range(c.device_count) if d != device)):
        c.use(ctx_device)
        try:
            return c.address_range(addr)
        except TransportError as exc:
            error = error or exc
    assert error is not None
    raise error


def export_region(addr: int, length: int) -> ExportedRegion | str:
    """How a peer can open ``[addr, addr+length)``, or the reason it cannot."""
    try:
        c = cuda()
    except TransportError as exc:
        return str(exc)
    try:
        device = c.device_of(addr)
        if device is None:
            return "host memory (CUDA IPC covers device memory only)"
        base, size = _address_range(c, addr, device)
        if addr + length > base + size:
            return "region spans several allocations"
        try:
            return ExportedRegion(addr, length, base, c.ipc_handle(base), device)
        except TransportError as exc:
            origin = _torch_ipc_origin(addr, length)
            if origin is None:
                return f"{exc} (VMM / expandable-segment memory cannot be shared by legacy CUDA IPC)"
            return ExportedRegion(addr, length, origin[1], origin[0], device)
    except TransportError as exc:
        return str(exc)


class IpcEndpoint:
    """Serves this transport's exportable regions to same-user processes of this machine."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.regions: dict[int, ExportedRegion | str] = {}
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(endpoint_name(session_id))
        self._sock.listen(16)
        self._closed = False
        self.generation = 0
        # The fence word: [alive, generation] in a shared-memory file peers map read-only and check
        # before every batch (a memory read, not a round trip); closing writes alive = 0 first.
        safe = "".join(ch if ch.isalnum() else "_" for ch in session_id)
        self.fence_path = f"/dev/shm/kvd-ipc-{safe}-{os.getpid()}"
        fd = os.open(self.fence_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, 16)
            self._fence = mmap.mmap(fd, 16)
        finally:
            os.close(fd)
        struct.pack_into("<QQ", self._fence, 0, 1, 0)
        self._thread = threading.Thread(target=self._serve, name="kvd-ipc-endpoint", daemon=True)
        self._thread.start()

    def add(self, addr: int, length: int) -> ExportedRegion | str:
        exported = export_region(addr, length)
        with self._lock:
            self.regions[addr] = exported
            self.generation += 1
            struct.pack_into("<Q", self._fence, 8, self.generation)
        return exported

    def remove(self, addr: int) -> None:
        with self._lock:
            if self.regions.pop(addr, None) is not None:
                self.generation += 1
                struct.pack_into("<Q", self._fence, 8, self.generation)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            regions = [r.to_json() for r in self.regions.values() if isinstance(r, ExportedRegion)]
        return {"session": self.session_id, "boot_id": boot_id(), "pid": os.getpid(), "generation": self.generation,
                "fence": self.fence_path, "regions": regions}

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                try:
                    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                    _pid, uid, _gid = struct.unpack("3i", cred)
                    if uid not in (os.getuid(), 0):
                        conn.sendall(json.dumps({"error": f"uid {uid} may not open this daemon's memory"}).encode())
                        continue
                    conn.settimeout(2.0)
                    ask = conn.recv(1)
                    if ask == b"G":  # the cheap per-batch check: alive, and which region generation
                        conn.sendall(str(self.generation).encode())
                    else:
                        conn.sendall(json.dumps(self.describe()).encode())
                except OSError:
                    continue

    def close(self) -> None:
        self._closed = True
        with self._lock:
            struct.pack_into("<Q", self._fence, 0, 0)  # revoked: peers' next check fails
        with contextlib.suppress(OSError):
            os.unlink(self.fence_path)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def _ask(session_id: str, what: bytes, timeout: float) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(endpoint_name(session_id))
        s.sendall(what)
        chunks = []
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            chunks.append(b)
    except OSError as exc:
        raise TransportError(f"no same-node endpoint for {session_id} ({exc.strerror or exc}): "
                             "another machine, another network namespace, or its same-node path is off") from None
    finally:
        s.close()
    return b"".join(chunks)


def generation(session_id: str, timeout: float = 2.0) -> int:
    """The peer endpoint's region generation; TransportError once it is closed (session revoked)."""
    reply = _ask(session_id, b"G", timeout)
    try:
        return int(reply)
    except ValueError:
        raise TransportError(f"{session_id} refused: {reply[:200]!r}") from None


def fetch_regions(session_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The peer's region list; TransportError when it has no endpoint on this machine."""
    reply: dict[str, Any] = json.loads(_ask(session_id, b"R", timeout))
    if "error" in reply:
        raise TransportError(f"{session_id} refused its regions: {reply['error']}")
    return reply


@dataclass
class IpcPeer:
    """A peer daemon's regions opened in this process: peer address -> our address."""

    session_id: str
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # our address - peer address
    skipped: list[str] = field(default_factory=list)
    generation: int = -1
    fence: mmap.mmap | None = None
    copy_device: int | None = None  # our device the copies run on; None: each region's own device

    def refresh(self) -> None:
        """(Re)read the peer's regions and open any allocation not opened yet."""
        reply = fetch_regions(self.session_id)
        if reply.get("boot_id") != boot_id():
            raise TransportError(f"{self.session_id} answered from another boot id: not this machine")
        rows = []
        self.skipped = []
        self.generation = int(reply.get("generation", -1))
        if self.fence is None and reply.get("fence"):
            try:
                fd = os.open(str(reply["fence"]), os.O_RDONLY)
                try:
                    self.fence = mmap.mmap(fd, 16, prot=mmap.PROT_READ)
                finally:
                    os.close(fd)
            except OSError:
                self.fence = None
        for r in reply.get("regions", []):
            try:
                device = int(r["device"]) if self.copy_device is None else self.copy_device
                ours = open_handle(bytes.fromhex(r["handle"]), device)
            except TransportError as exc:
                self.skipped.append(f"region {r['addr']:#x}+{r['length']}: {exc}")
                continue
            rows.append((int(r["addr"]), int(r["length"]), ours - int(r["base"])))
        rows.sort()
        self.starts = [a for a, _, _ in rows]
        self.ends = [a + n for a, n, _ in rows]
        self.offsets = [o for _, _, o in rows]

    def check(self) -> None:
        """Per batch: the peer's endpoint still answers (a revoked receive session does not: the
        write fails instead of landing), and the region list is re-read if it changed."""
        if self.fence is not None:
            alive, gen = struct.unpack_from("<QQ", self.fence, 0)
            if not alive:
                raise TransportError(f"{self.session_id} closed its same-node endpoint (session revoked)")
        else:
            gen = generation(self.session_id)
        if gen != self.generation:
            self.refresh()

    def translate(self, dst: np.ndarray, length: np.ndarray) -> np.ndarray | None:
        """Our addresses for the peer's ``dst`` ops, or None if any op is outside every opened region."""
        if not self.starts:
            return None
        starts = np.asarray(self.starts, dtype=np.int64)
        i = np.searchsorted(starts, dst, side="right") - 1
        if (i < 0).any():
            return None
        ends = np.asarray(self.ends, dtype=np.int64)[i]
        if (dst + length > ends).any():
            return None
        return dst + np.asarray(self.offsets, dtype=np.int64)[i]



def inside(regions: list[tuple[int, int]] | RegionIndex, addrs: np.ndarray, length: np.ndarray) -> bool:
    """Whether every op ``[addr, addr+len)`` lies inside one of the ``(start, length)`` regions
    (pass a :class:`RegionIndex` made once where the same regions are checked per batch)."""
    if not isinstance(regions, RegionIndex):
        regions = RegionIndex(regions)
    return regions.count > 0 and bool(regions.covers(np.asarray(addrs, dtype=np.int64),
                                                     np.asarray(length, dtype=np.int64)).all())

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

The driver API is called through ctypes on ``libcuda.so.1`` (always there beside the driver);
each thread makes the device's primary context (torch's) current before its first call.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvd.transfer.base import TransportError

__all__ = ["Cuda", "ExportedRegion", "IpcEndpoint", "IpcPeer", "boot_id", "cuda", "endpoint_name",
           "endpoint_reachable"]

_MEMORYTYPE_DEVICE = 2
_ATTR_MEMORY_TYPE = 2
_ATTR_DEVICE_ORDINAL = 9
_IPC_LAZY_ENABLE_PEER_ACCESS = 1


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


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


class Cuda:
    """The few driver calls the same-node path needs; ``TransportError`` on any failure."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise TransportError(f"no CUDA driver here ({exc})") from None
        self._check(self.lib.cuInit(0), "cuInit")
        count = ctypes.c_int()
        self._check(self.lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if count.value < 1:
            raise TransportError("no CUDA device visible")
        self.device_count = count.value
        # The handle goes by value (64 bytes on the stack): ctypes must know the signature.
        self.lib.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), _Handle, ctypes.c_uint]
        self._ctx: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.peer_access: dict[tuple[int, int], str] = {}  # (from, to) -> "on" or why not

    def enable_peer_access(self) -> dict[tuple[int, int], str]:
        """Let every device's primary context reach every other device's memory (once).

        A copy runs on the source device: with the destination on another GPU (prefill on GPU 0,
        decode on GPU 1), the source context must have peer access to the destination's, or
        the batched copy kernel faults and ``cuMemcpyAsync`` may bounce through the host.
        Where the link does not allow it the reason is kept (``kvctl status``), never raised.
        """
        for a in range(self.device_count):
            for b in range(self.device_count):
                if a == b or (a, b) in self.peer_access:
                    continue
                can = ctypes.c_int()
                self.lib.cuDeviceCanAccessPeer(ctypes.byref(can), a, b)
                if not can.value:
                    self.peer_access[(a, b)] = "the devices cannot access each other (no P2P link)"
                    continue
                self.use(a)
                self.use_ctx_of(b)
                rc = self.lib.cuCtxEnablePeerAccess(self._ctx[b], 0)
                # 704: CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
                self.peer_access[(a, b)] = "on" if rc in (0, 704) else f"cuCtxEnablePeerAccess failed ({rc})"
        return self.peer_access

    def use_ctx_of(self, device: int) -> None:
        """Retain ``device``'s primary context (without making it current)."""
        with self._lock:
            if device not in self._ctx:
                dev = ctypes.c_int()
                self._check(self.lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
                ctx = ctypes.c_void_p()
                self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
                self._ctx[device] = ctx

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            raise TransportError(f"{what} failed: {name.value.decode() if name.value else rc}")

    def use(self, device: int) -> None:
        """Make ``device``'s primary context (the one torch uses) current on this thread."""
        if getattr(self._local, "device", None) == device:
            return
        self.use_ctx_of(device)
        self._check(self.lib.cuCtxSetCurrent(self._ctx[device]), "cuCtxSetCurrent")
        self._local.device = device

    def device_of(self, addr: int) -> int | None:
        """The device ordinal of a device pointer; None for host or unknown memory."""
        self.use(getattr(self._local, "device", 0) or 0)
        kind = ctypes.c_uint()
        if self.lib.cuPointerGetAttribute(ctypes.byref(kind), _ATTR_MEMORY_TYPE, ctypes.c_uint64(addr)) != 0:
            return None
        if kind.value != _MEMORYTYPE_DEVICE:
            return None
        ordinal = ctypes.c_int()
        self._check(self.lib.cuPointerGetAttribute(ctypes.byref(ordinal), _ATTR_DEVICE_ORDINAL,
                                                   ctypes.c_uint64(addr)), "cuPointerGetAttribute(device)")
        return ordinal.value

    def address_range(self, addr: int) -> tuple[int, int]:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._check(self.lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(addr)),
                    "cuMemGetAddressRange")
        return base.value, size.value

    def ipc_handle(self, base: int) -> bytes:
        h = _Handle()
        self._check(self.lib.cuIpcGetMemHandle(ctypes.byref(h), ctypes.c_uint64(base)), "cuIpcGetMemHandle")
        return ctypes.string_at(ctypes.addressof(h), 64)  # all 64 bytes (h.reserved stops at a NUL)

    def ipc_open(self, handle: bytes) -> int:
        if len(handle) != 64:
            raise TransportError(f"a CUDA IPC handle has 64 bytes, got {len(handle)}")
        h = _Handle()
        ctypes.memmove(ctypes.addressof(h), handle, 64)
        ptr = ctypes.c_uint64()
        self._check(self.lib.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), h, _IPC_LAZY_ENABLE_PEER_ACCESS),
                    "cuIpcOpenMemHandle")
        return ptr.value

    def ipc_close(self, ptr: int) -> None:
        self.lib.cuIpcCloseMemHandle(ctypes.c_uint64(ptr))

    def memcpy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self.lib.cuMemcpyAsync(ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(nbytes),
                                           ctypes.c_void_p(stream)), "cuMemcpyAsync")


_opened: dict[bytes, int] = {}  # handle -> our base; a handle is opened once per process
_opened_lock = threading.Lock()


def open_handle(handle: bytes, device: int) -> int:
    """Our address of a peer's allocation, opened once per process in the context of ``device``:
    the device that will copy into it (the peer memory may sit on another GPU; the lazy flag
    then enables peer access from ``device``'s context, as CUDA IPC documents)."""
    with _opened_lock:
        ptr = _opened.get(handle)
        if ptr is None:
            c = cuda()
            c.use(device if device < c.device_count else 0)
            ptr = _opened[handle] = c.ipc_open(handle)
        return ptr


_cuda: Cuda | None = None
_cuda_error = ""


def cuda() -> Cuda:
    """The process's driver wrapper; TransportError (with the first reason) when there is no CUDA."""
    global _cuda, _cuda_error
    if _cuda is None:
        if _cuda_error:
            raise TransportError(_cuda_error)
        try:
            _cuda = Cuda()
        except TransportError as exc:
            _cuda_error = str(exc)
            raise
    return _cuda


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
        c.use(device)
        base, size = c.address_range(addr)
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



def inside(regions: list[tuple[int, int]], addrs: np.ndarray, length: np.ndarray) -> bool:
    """Whether every op ``[addr, addr+len)`` lies inside one of the sorted ``(start, length)`` regions."""
    if not regions:
        return False
    starts = np.asarray([a for a, _ in regions], dtype=np.int64)
    ends = starts + np.asarray([n for _, n in regions], dtype=np.int64)
    k = np.searchsorted(starts, addrs, side="right") - 1
    if (k < 0).any():
        return False
    return bool((addrs + length <= ends[k]).all())

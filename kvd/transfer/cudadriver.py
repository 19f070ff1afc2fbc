"""The few CUDA driver calls the same-node path needs, through ctypes on ``libcuda.so.1``.

``libcuda.so.1`` is always there beside the driver, so a daemon finds out whether it has CUDA
without importing torch. Each thread makes the device's primary context (torch's) current
before its first call; a peer's IPC handle is opened once per process, in the context of the
GPU that will copy into it.
"""

from __future__ import annotations

import ctypes
import threading

from kvd.transfer.base import TransportError

__all__ = ["Cuda", "cuda", "open_handle"]

_MEMORYTYPE_DEVICE = 2
_ATTR_MEMORY_TYPE = 2
_ATTR_DEVICE_ORDINAL = 9
_IPC_LAZY_ENABLE_PEER_ACCESS = 1


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


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

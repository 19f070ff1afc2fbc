"""kvd's KVManager / KVSender / KVReceiver / BootstrapServer for SGLang (base/conn.py contract).

One :class:`KvdKVManager` per engine rank holds one connection to the node's kvd daemon
(:class:`~kvd.engineclient.background.BackgroundKvdClient`: pushed room events are read in the
background), registers the rank's KV pool by raw pointer, and answers every ``poll()`` from
local state: no socket round trip per room per scheduler loop.

Rendezvous reuses SGLang's own ``CommonKVBootstrapServer``: each prefill rank PUTs its
topology with ``rank_ip:rank_port`` = the kvd *directory* daemon of its engine; a decode rank
GETs it, and hands that address to its own daemon, which does the TP mapping, the transfer and
the completion accounting. KVPoll maps one to one onto kvd's room states.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
import requests
from aiohttp import web
from sglang.srt.disaggregation.base.conn import (
    BaseKVManager,
    BaseKVReceiver,
    BaseKVSender,
    KVArgs,
    KVPoll,
    KVTransferDestination,
    KVTransferMetric,
)
from sglang.srt.disaggregation.common.conn import CommonKVBootstrapServer, KVTransferError, PrefillServerInfo

from kvd.engineclient.background import BackgroundKvdClient
from kvd.engineclient.replies import KvdError
from kvd.sglang import UnsupportedSGLang, bootstrap, check_sglang_version
from kvd.sglang.pool import aux_row, check_aux_index, pool_layout, pool_memory, refusals, write_aux_row

log = logging.getLogger("kvd.sglang")

POLL = {"bootstrapping": KVPoll.Bootstrapping, "waiting_for_input": KVPoll.WaitingForInput,
        "transferring": KVPoll.Transferring, "success": KVPoll.Success, "failed": KVPoll.Failed}
DEFAULT_SOCKET = "/run/kvd/kvd.sock"
#: Longest wait in ``KvdKVReceiver.failure_exception`` for the daemon's release of a failed room
#: (the daemon releases within ``timeouts.abort_fence_s`` plus a second or so of its failure).
RELEASE_WAIT_S = 60.0


def prefill_engine_id(bootstrap_port: int | str, dp_rank: int) -> str:
    """The kvd engine id of one DP group of the prefill engine behind a bootstrap port."""
    return f"sglang-p{bootstrap_port}-dp{dp_rank}"


def _mode_name(mode: Any) -> str:
    return str(getattr(mode, "value", mode)).lower()


class KvdKVManager(BaseKVManager):
    """One per engine rank: the daemon connection, the pool, and every room's local state."""

    enable_deferred_decode_kv_release = False
    supports_host_destination = False

    def __init__(self, args: KVArgs, disaggregation_mode: Any, server_args: Any,
                 is_mla_backend: bool | None = False) -> None:
        check_sglang_version()
        self.kv_args = args
        self.server_args = server_args
        self.mode = _mode_name(disaggregation_mode)
        self.is_mla_backend = bool(is_mla_backend)
        bad = refusals(args, server_args, self.mode)
        if bad:
            raise UnsupportedSGLang("kvd transfer backend refuses this configuration: " + "; ".join(bad))
        tp, dp = int(getattr(server_args, "tp_size", 1)), int(getattr(server_args, "dp_size", 1) or 1)
        self.attn_tp_size = tp // dp if getattr(server_args, "enable_dp_attention", False) else tp
        self.attn_tp_rank = int(args.engine_rank) % self.attn_tp_size
        self.attn_dp_rank = (int(args.engine_rank) // self.attn_tp_size if self.attn_tp_size != tp
                             else int(getattr(args, "system_dp_rank", 0) or 0))
        self.dp_size = dp
        self.bootstrap_port = getattr(server_args, "disaggregation_bootstrap_port", 8998)
        self.kv_cache_dtype_str = getattr(args, "kv_cache_dtype_str", None)
        self.aux_ptrs = list(getattr(args, "aux_data_ptrs", []) or [])
        self.aux_item_lens = list(getattr(args, "aux_item_lens", []) or [])
        self.aux_data_lens: list[int] | None = list(getattr(args, "aux_data_lens", None) or []) or None
        self.socket_path = os.environ.get("KVD_SOCKET", getattr(server_args, "kvd_socket", DEFAULT_SOCKET))
        self.room_timeout_s = float(os.environ.get("KVD_ROOM_TIMEOUT_S", "0"))
        self.client = BackgroundKvdClient(self.socket_path)
        try:
            self._start(args)
        except BaseException:
            # A manager refused here (rank taken, bad pool, bootstrap server down) must not keep
            # its daemon connection: each one counts against socket.max_connections_per_uid.
            self.client.close()
            raise

    def _start(self, args: KVArgs) -> None:
        """Register the pool (and, on prefill, the rank with SGLang's bootstrap server)."""
        server_args = self.server_args
        daemon = self.client.status().get("daemon", {})
        self.daemon_address: str = daemon.get("peer_address", "")
        self.directory = os.environ.get("KVD_DIRECTORY", "") or self.daemon_address
        if self.mode == "prefill":
            engine_id = prefill_engine_id(self.bootstrap_port, self.attn_dp_rank)
        else:
            engine_id = f"sglang-d{getattr(server_args, 'port', 0)}-dp{self.attn_dp_rank}"
        memory = pool_memory(args)
        self.layout = pool_layout(args, role="prefill" if self.mode == "prefill" else "decode",
                                  engine_id=engine_id, tp_size=self.attn_tp_size, tp_rank=self.attn_tp_rank,
                                  is_mla=self.is_mla_backend,
                                  memory_kind="gpu" if memory.get("kind") == "cuda_ipc" else "host")
        bootstrap = self.directory if self.directory != self.daemon_address else ""
        self.pool_id = self.client.register_pool(self.layout, memory, bootstrap=bootstrap)
        self.prefill_info_table: dict[str, PrefillServerInfo] = {}
        self.directory_table: dict[tuple[str, int], str] = {}
        self.failure_records: dict[int, str] = {}
        # The object (sender or receiver) of this rank that holds each bootstrap room id: every
        # object reads its room's state from the client's one view keyed by the id, so a second
        # object for an id still held (a client reusing a live bootstrap_room) is refused. Weak:
        # an object the scheduler dropped without reading its outcome holds nothing (bounded).
        self.holders: MutableMapping[int, _Room] = weakref.WeakValueDictionary()
        self.lock = threading.Lock()
        if self.mode == "prefill":
            self.register_to_bootstrap()

    # --- rendezvous -------------------------------------------------------------------------
    def register_to_bootstrap(self) -> None:
        """PUT this prefill rank into SGLang's bootstrap server, naming its kvd directory."""
        host = getattr(self.server_args, "disaggregation_bootstrap_host", None) or "127.0.0.1"
        ip, _, port = self.directory.removeprefix("tcp://").rpartition(":")
        payload = {"attn_tp_size": self.attn_tp_size, "attn_tp_rank": self.attn_tp_rank, "attn_cp_size": 1,
                   "attn_cp_rank": 0, "attn_dp_size": self.dp_size, "attn_dp_rank": self.attn_dp_rank,
                   "pp_size": 1, "pp_rank": 0, "system_dp_size": 1, "system_dp_rank": 0,
                   "rank_ip": ip, "rank_port": int(port), "page_size": self.kv_args.page_size,
                   "kv_cache_dtype": self.kv_cache_dtype_str, "load_balance_method":
                   getattr(self.server_args, "load_balance_method", "follow_bootstrap_room")}
        url = f"http://{host}:{self.bootstrap_port}/route"
        delay = 0.2
        for attempt in range(8):
            try:
                r = requests.put(url, json=payload, timeout=5)
                if r.status_code == 200:
                    return
                if r.status_code == 400:  # refused as it is (sizes differ from the engine's other ranks)
                    raise RuntimeError(f"kvd: SGLang bootstrap server {url} refused the registration: {r.text[:300]}")
            except requests.RequestException as exc:
                if attempt == 7:
                    raise RuntimeError(f"kvd: cannot register with SGLang bootstrap server {url}: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise RuntimeError(f"kvd: SGLang bootstrap server {url} refused the registration")

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        """Decode: fetch and check the prefill engine's topology once (non-blocking try)."""
        if bootstrap_addr in self.prefill_info_table:
            return True
        try:
            r = requests.get(f"http://{bootstrap_addr}/route?prefill_dp_rank=-1&prefill_cp_rank=-1"
                             "&target_tp_rank=-1&target_pp_rank=-1", timeout=5)
        except requests.RequestException as exc:
            log.debug("kvd: bootstrap server %s unreachable: %s", bootstrap_addr, exc)
            return False
        if r.status_code != 200:
            return False
        try:  # an answer that is not SGLang's (another service on the port, a proxy's page): retried
            info = PrefillServerInfo(**r.json())
        except (TypeError, ValueError) as exc:
            log.error("kvd: bootstrap server %s answered no prefill topology: %s", bootstrap_addr, exc)
            return False
        if info.page_size is not None and info.page_size != self.kv_args.page_size:
            raise RuntimeError(f"Page size mismatch: prefill page_size={info.page_size}, decode "
                               f"page_size={self.kv_args.page_size}")
        if info.kv_cache_dtype is not None and info.kv_cache_dtype != self.kv_cache_dtype_str:
            raise RuntimeError(f"KV cache dtype mismatch: prefill {info.kv_cache_dtype}, decode "
                               f"{self.kv_cache_dtype_str}")
        if info.pp_size != 1 or info.attn_cp_size != 1:
            raise UnsupportedSGLang(f"prefill at {bootstrap_addr} uses PP {info.pp_size} / CP "
                                    f"{info.attn_cp_size}: kvd supports neither")
        self.prefill_info_table[bootstrap_addr] = info
        return True

    def directory_for(self, bootstrap_addr: str, dp_rank: int) -> str:
        """The kvd directory daemon of one DP group of a prefill engine (cached)."""
        key = (bootstrap_addr, dp_rank)
        with self.lock:
            known = self.directory_table.get(key)
        if known is None:
            r = requests.get(f"http://{bootstrap_addr}/route?prefill_dp_rank={dp_rank}&prefill_cp_rank=0"
                             "&target_tp_rank=0&target_pp_rank=0", timeout=5)
            r.raise_for_status()
            info = r.json()
            known = f"tcp://{info['rank_ip']}:{info['rank_port']}"
            with self.lock:
                self.directory_table[key] = known
        return known

    def forget_directory(self, bootstrap_addr: str, dp_rank: int, directory: str) -> None:
        """A room resolved through ``directory`` failed: ask the bootstrap server again next
        time (as SGLang's own receivers drop their cached prefill rank addresses on a failure),
        so a prefill engine that came back elsewhere under the same bootstrap address is found."""
        with self.lock:
            if self.directory_table.get((bootstrap_addr, dp_rank)) == directory:
                del self.directory_table[(bootstrap_addr, dp_rank)]

    def hold(self, room: int, obj: _Room) -> bool:
        """Make ``obj`` the holder of ``room`` on this rank; False while another object holds it."""
        with self.lock:
            return self.holders.setdefault(room, obj) is obj

    def unhold(self, room: int, obj: _Room) -> bool:
        """``obj`` is done with ``room``'s state in the client: True unless another object holds
        the id now (then that state is the other one's, not to be forgotten)."""
        with self.lock:
            holder = self.holders.get(room)
            if holder is obj:
                del self.holders[room]
            return holder is None or holder is obj

    def record_failure(self, room: int, reason: str) -> None:
        with self.lock:
            self.failure_records[room] = reason

    def pop_failure(self, room: int, fallback: str) -> str:
        with self.lock:
            return self.failure_records.pop(room, fallback)

    def state_of(self, room: int) -> tuple[int | None, Any]:
        """(KVPoll from the daemon's pushed events or None, the status)."""
        st = self.client.pushed(room)
        return (POLL.get(st.state) if st is not None else None), st

    def close(self) -> None:
        self.client.close()

    def teardown(self) -> None:
        self.close()


class _Room:
    """What sender and receiver share: local state, failure, release fence."""

    kv_mgr: KvdKVManager
    bootstrap_room: int

    def _setup(self, mgr: KvdKVManager, room: int | None) -> None:
        self.kv_mgr = mgr
        self.bootstrap_room = int(room or 0)
        self.state: int = KVPoll.Bootstrapping
        self.conclude_state: int | None = None
        self.aborted = False
        # Whether this object handed the room to the daemon (a recv, a first chunk): until then
        # what the client holds under this room id belongs to an earlier use of the id (SGLang
        # never clear()s a failed prefill sender, and a client may re-issue a bootstrap_room), so
        # it is dropped here and not read by poll().
        self.started = False
        self.refused_reason = ""
        if not mgr.hold(self.bootstrap_room, self):
            # Another request of this rank still uses the id: what the client holds under it is
            # that request's, so this one touches none of it and fails at once.
            self.refused_reason = (f"kvd: bootstrap room {self.bootstrap_room} is in use by another request "
                                   "on this engine rank")
            self.conclude_state = self.state = KVPoll.Failed
            return
        mgr.client.forget(self.bootstrap_room)
        mgr.pop_failure(self.bootstrap_room, "")

    def _fail(self, reason: str) -> int:
        if self.refused_reason:
            return KVPoll.Failed
        self.kv_mgr.record_failure(self.bootstrap_room, reason)
        self.conclude_state = self.state = KVPoll.Failed
        self._concluded()
        return KVPoll.Failed

    def _concluded(self) -> None:
        """The room's outcome is read: another request may use the id (a receiver whose daemon
        room may still write keeps it until its pages are fenced)."""
        if not getattr(self, "daemon_room", False):
            self.kv_mgr.unhold(self.bootstrap_room, self)

    def _daemon_call(self, what: str, fn: Any, *args: Any) -> bool:
        try:
            fn(*args)
            return True
        except KvdError as exc:
            self._fail(f"kvd {what} refused: {exc}")
            return False

    def poll(self) -> int:
        if self.conclude_state is not None:
            return self.conclude_state
        if not self.started:
            return self.state
        pushed, st = self.kv_mgr.state_of(self.bootstrap_room)
        if pushed == KVPoll.Failed:
            return self._fail(f"kvd: {st.reason or 'room failed'}")
        if pushed == KVPoll.Success:
            return self._succeed(st)
        if pushed is not None and pushed > self.state:
            self.state = pushed
        return self.state

    def _succeed(self, st: Any) -> int:
        self.conclude_state = self.state = KVPoll.Success
        self.kv_mgr.unhold(self.bootstrap_room, self)
        return KVPoll.Success

    def failure_exception(self) -> None:
        self.conclude_state = KVPoll.Failed
        if self.refused_reason:
            raise KVTransferError(self.bootstrap_room, self.refused_reason)
        reason = self.kv_mgr.pop_failure(self.bootstrap_room, "")
        raise KVTransferError(self.bootstrap_room, reason or "Failed due to an unknown reason from another rank",
                              is_from_another_rank=not reason)

    def is_abort_release_safe(self) -> bool:
        """kvd's release fence: True once no write into this room's pages can still land."""
        if not self.started:
            return True  # the daemon was never given this room's pages
        st = self.kv_mgr.client.pushed(self.bootstrap_room)
        return st is not None and (st.released or st.state == "success")

    def clear(self) -> None:
        if self.kv_mgr.unhold(self.bootstrap_room, self):
            self.kv_mgr.client.forget(self.bootstrap_room)

    def abort(self) -> None:
        if self.conclude_state is None:
            self.aborted = True
            self._daemon_call("abort", self.kv_mgr.client.abort, self.kv_mgr.pool_id, self.bootstrap_room)
            self._fail("Aborted by AbortReq.")


class KvdKVSender(_Room, BaseKVSender):
    def __init__(self, mgr: KvdKVManager, bootstrap_addr: str, bootstrap_room: int,
                 req_has_disagg_prefill_dp_rank: bool = False) -> None:
        self._setup(mgr, bootstrap_room)
        self.bootstrap_server_url = bootstrap_addr
        self.num_kv_indices = 0
        self.curr_idx = 0
        self.aux_index: int | None = None
        self.last_sent = False
        self._metric = KVTransferMetric()
        self._t0: float | None = None
        # A send() that never comes must not pin the prefill inflight queue: until the first
        # chunk reaches kvd the daemon does not know the room, so the sender keeps SGLang's own
        # deadline (SGLANG_DISAGGREGATION_WAITING_TIMEOUT, read once, armed at the first poll
        # after init(), as SGLang's FakeKVSender does). After the first chunk kvd's timeouts rule.
        from sglang.srt.environ import envs

        self.waiting_timeout = float(envs.SGLANG_DISAGGREGATION_WAITING_TIMEOUT.get())
        self.inited = False
        self.has_sent = False
        self.waiting_since: float | None = None
        if mgr.dp_size > 1 and not req_has_disagg_prefill_dp_rank:
            try:  # DP rank resolution: the decode asks SGLang's bootstrap server (/query_dp_ranks)
                requests.post(f"http://{bootstrap_addr}/register_dp_rank", timeout=5,
                              json={"bootstrap_room": self.bootstrap_room, "dp_rank": mgr.attn_dp_rank})
            except requests.RequestException as exc:
                log.error("kvd: cannot register dp rank of room %s: %s", bootstrap_room, exc)
        # kvd pairs the room with its decode itself: prefill may start at once.
        self.state = KVPoll.WaitingForInput

    def init(self, num_kv_indices: int, aux_index: int | None = None) -> None:
        self.num_kv_indices = int(num_kv_indices)
        self.aux_index = aux_index
        self.inited = True

    def poll(self) -> int:
        if self.conclude_state is None and self.inited and not self.has_sent:
            now = time.monotonic()
            if self.waiting_since is None:
                self.waiting_since = now
            elif now - self.waiting_since >= self.waiting_timeout:
                self._daemon_call("abort", self.kv_mgr.client.abort, self.kv_mgr.pool_id, self.bootstrap_room)
                return self._fail(f"kvd: no KV chunk was sent within {self.waiting_timeout:g}s after init() "
                                  "(SGLANG_DISAGGREGATION_WAITING_TIMEOUT)")
        return super().poll()

    def should_send_kv_chunk(self, num_pages: int, last_chunk: bool) -> bool:
        return num_pages > 0 or last_chunk

    def send(self, kv_indices: Any, state_indices: Any = None, num_kv_tokens: int | None = None,
             indices_event: Any = None) -> None:
        if self.conclude_state is not None or self.last_sent:
            return  # a zero-page last chunk after the pages already counted as last: nothing to add
        if state_indices:
            self._fail("kvd does not transfer state buffers (state_indices given)")
            return
        pages = np.asarray(kv_indices, dtype=np.int64).reshape(-1)
        self.curr_idx += len(pages)
        is_last = self.curr_idx == self.num_kv_indices  # SGLang's own rule
        aux = b""
        if is_last and self.aux_index is not None and self.kv_mgr.aux_ptrs:
            mgr = self.kv_mgr
            try:
                aux = aux_row(mgr.aux_ptrs, mgr.aux_item_lens, int(self.aux_index), mgr.aux_data_lens)
            except ValueError as exc:  # never read past the engine's aux buffers
                if self.has_sent:  # the daemon holds the room's earlier chunks: end it there too
                    self._daemon_call("abort", mgr.client.abort, mgr.pool_id, self.bootstrap_room)
                self._fail(f"kvd: {exc}")
                return
        if self._t0 is None:
            self._t0 = time.perf_counter()
        self.has_sent = self.started = True
        # Not waiting for the daemon's reply: the scheduler goes on at once, and a refused chunk
        # fails the room at the next poll (the client stashes the refusal as a pushed failure).
        if self._daemon_call("send", functools.partial(self.kv_mgr.client.send, wait=False), self.kv_mgr.pool_id,
                             self.bootstrap_room, pages, is_last, aux):
            self.state = max(self.state, KVPoll.Transferring)
            self.last_sent = is_last

    def _succeed(self, st: Any) -> int:
        if self._t0 is not None:
            self._metric.transfer_latency_s = time.perf_counter() - self._t0
        self._metric.transfer_total_bytes = st.bytes_total or None
        return super()._succeed(st)

    def get_transfer_metric(self) -> KVTransferMetric:
        return self._metric

    def pop_decode_prefix_len(self) -> int:
        return 0


class KvdKVReceiver(_Room, BaseKVReceiver):
    def __init__(self, mgr: KvdKVManager, bootstrap_addr: str, bootstrap_room: int | None = None) -> None:
        self._setup(mgr, bootstrap_room)
        self.bootstrap_addr = bootstrap_addr
        self.require_staging = False
        self.abort_notified = False
        self.bootstrap_infos: list[dict[str, Any]] = []
        self.aux_index: int | None = None
        self.directory = ""
        self.prefill_dp_rank = 0
        self.daemon_room = False  # the daemon took our RecvRoom: it may write into our pages

    def init(self, prefill_dp_rank: int) -> None:
        if self.conclude_state is not None:
            return
        if not self.kv_mgr.try_ensure_parallel_info(self.bootstrap_addr):
            self._fail(f"Prefill server with bootstrap_addr {self.bootstrap_addr} is not reachable")
            return
        self.prefill_dp_rank = int(prefill_dp_rank)
        try:
            self.directory = self.kv_mgr.directory_for(self.bootstrap_addr, self.prefill_dp_rank)
        except (requests.RequestException, KeyError, TypeError, ValueError) as exc:
            self._fail(f"cannot resolve prefill dp rank {prefill_dp_rank} at {self.bootstrap_addr}: {exc}")
            return
        self.bootstrap_infos = [{"directory": self.directory}]
        self.state = KVPoll.WaitingForInput

    def send_metadata(self, kv_indices: Any, aux_index: int | None = None, state_indices: Any = None,
                      decode_prefix_len: int | None = None,
                      destination: KVTransferDestination = KVTransferDestination.DEVICE) -> None:
        if self.conclude_state is not None:
            return
        if state_indices and any(s is not None and len(s) for s in state_indices):
            self._fail("kvd does not transfer state buffers (state_indices given)")
            return
        if decode_prefix_len:
            self._fail(f"kvd does not support a decode radix prefix (decode_prefix_len={decode_prefix_len})")
            return
        if destination != KVTransferDestination.DEVICE:
            self._fail(f"kvd does not support KV destination {destination}")
            return
        if aux_index is not None and self.kv_mgr.aux_ptrs:
            try:  # refused before the daemon writes a page: the row could never land
                check_aux_index(self.kv_mgr.aux_item_lens, int(aux_index), self.kv_mgr.aux_data_lens)
            except ValueError as exc:
                self._fail(f"kvd: {exc}")
                return
        self.aux_index = aux_index
        port = self.bootstrap_addr.rpartition(":")[2]
        engine = prefill_engine_id(port, self.prefill_dp_rank)
        pages = np.asarray(kv_indices, dtype=np.int64).reshape(-1)
        self.started = True
        self.daemon_room = self._daemon_call("recv", self.kv_mgr.client.recv, self.kv_mgr.pool_id,
                                             self.bootstrap_room, self.directory, engine, pages,
                                             self.kv_mgr.room_timeout_s)

    def _fail(self, reason: str) -> int:
        if self.directory and not self.aborted:
            self.kv_mgr.forget_directory(self.bootstrap_addr, self.prefill_dp_rank, self.directory)
        return super()._fail(reason)

    def failure_exception(self) -> None:
        self._fence_pages()
        super().failure_exception()

    def _fence_pages(self) -> None:
        """SGLang frees a failed request's KV pages right after ``failure_exception()`` (kvd asks
        for no deferred release), also when the failure was another rank's (the polls are
        all-reduced): this rank's room must be over first, and released by the daemon, so that
        no write of it lands in pages SGLang hands to another request. A live room is aborted;
        the daemon releases a failed one once its senders answered the abort or were fenced off."""
        if not self.daemon_room:
            return
        self.daemon_room = False
        try:
            self._fence_daemon_room()
        finally:
            self.kv_mgr.unhold(self.bootstrap_room, self)

    def _fence_daemon_room(self) -> None:
        client, room = self.kv_mgr.client, self.bootstrap_room
        st = client.pushed(room)
        if st is not None and (st.released or st.state == "success"):
            return
        with contextlib.suppress(KvdError):  # it ended meanwhile: its release is on its way (or here)
            client.abort(self.kv_mgr.pool_id, room)
        try:
            client.wait_released(room, RELEASE_WAIT_S)
        except KvdError as exc:
            log.error("kvd: room %s not released within %gs of its failure; its pages may still be "
                      "written: %s", room, RELEASE_WAIT_S, exc)

    def _succeed(self, st: Any) -> int:
        mgr = self.kv_mgr
        if self.aux_index is not None and mgr.aux_ptrs:
            try:  # the aux rows land before the room reports success
                write_aux_row(mgr.aux_ptrs, mgr.aux_item_lens, int(self.aux_index), st.aux, mgr.aux_data_lens)
            except ValueError as exc:
                return self._fail(f"kvd: {exc}")
        return super()._succeed(st)

    def abort(self) -> None:
        super().abort()
        self.abort_notified = True

    def ensure_abort_notified(self, *, force_arm: bool = False) -> None:
        if not self.abort_notified:
            self.abort()


class KvdKVBootstrapServer(CommonKVBootstrapServer):
    """SGLang's own rendezvous server: ranks register their kvd directory; DP ranks resolve here.

    Its requests are checked first (:mod:`kvd.sglang.bootstrap`): a malformed one is a 400 that
    changes nothing, and a rank registering again is counted once."""

    @staticmethod
    async def _body(request: web.Request) -> Any:
        try:
            return await request.json()
        except ValueError:  # not JSON, not UTF-8
            return None

    async def _handle_route_put(self, request: web.Request) -> web.Response:
        problem = bootstrap.route_put_problem(await self._body(request), vars(self))
        if problem:
            return web.Response(text=f"bad registration: {problem}", status=400)
        reply: web.Response = await super()._handle_route_put(request)
        async with self.lock:  # a rank registered twice is one rank
            self._registered_count = sum(len(tp) for dp in self.prefill_port_table.values()
                                         for cp in dp.values() for tp in cp.values())
        return reply

    @staticmethod
    async def _checked(problem: str, what: str, handler: Callable[[], Awaitable[web.Response]]) -> web.Response:
        """SGLang's handler, run only for a request whose check found no problem (else a 400)."""
        if problem:
            return web.Response(text=f"{what}: {problem}", status=400)
        return await handler()

    async def _handle_route_get(self, request: web.Request) -> web.Response:
        return await self._checked(bootstrap.route_get_problem(request.query), "bad query",
                                   lambda: super(KvdKVBootstrapServer, self)._handle_route_get(request))

    async def _handle_register_dp_rank(self, request: web.Request) -> web.Response:
        return await self._checked(bootstrap.dp_register_problem(await self._body(request)), "bad request",
                                   lambda: super(KvdKVBootstrapServer, self)._handle_register_dp_rank(request))

    async def _handle_query_dp_ranks(self, request: web.Request) -> web.Response:
        return await self._checked(bootstrap.dp_query_problem(await self._body(request)), "bad request",
                                   lambda: super(KvdKVBootstrapServer, self)._handle_query_dp_ranks(request))


__all__ = ["KvdKVBootstrapServer", "KvdKVManager", "KvdKVReceiver", "KvdKVSender", "POLL", "prefill_engine_id"]

"""Red team round 9: the SGLang backend's contract at its edges, SGLang's real classes over two
real kvd daemons (module-scoped: one pair for the file).

* A bootstrap room id used again after a failed use: SGLang never ``clear()``s a failed prefill
  sender, so the client's view kept the old use's ``failed`` event under the id, and the next
  sender of the same room polled Failed at once (before sending anything), with the old reason.
  A new sender or receiver now drops what the client held under its id and reads the daemon's
  view only once it handed the room over itself.
* A manager refused at start (here: its rank is registered already) kept its daemon connection
  and client thread, each counted against ``socket.max_connections_per_uid``.
* The plug-in counted itself registered when *any* hook was registered on ``get_kv_class``
  (another plug-in's, or an empty entry of SGLang's defaultdict), so kvd's classes never resolved.
* SGLang's bootstrap server (kvd's is SGLang's) stored the first registration's sizes as they
  came: ``attn_tp_size: "1"`` made every later GET a 500, 0 made it ready with no rank, a huge
  one never ready; a rank registering twice counted twice (ready before the others); malformed
  GET / DP-rank requests were 500s. Each is now a 400 that changes nothing.
* An aux (MetadataBuffers) row index outside the engine's aux buffers was read (prefill) or
  written (decode) by raw pointer: a segfault of the engine, or a silent write before the
  buffer for a negative index. Now the room fails, before the daemon is asked to write a page.
* The decode kept the kvd directory it resolved for a bootstrap address forever: a prefill
  engine that came back under the same bootstrap address on another node (daemon) was never
  found again, every room failed until the decode restarted. A failed room now drops it (as
  SGLang's own receivers drop their cached prefill addresses), and the next room asks again.
* A bootstrap answer that was not SGLang's topology (200 with HTML, a JSON list, unknown keys)
  raised out of ``try_ensure_parallel_info`` into the decode scheduler; SGLang's own receivers
  log it and try again later (False), and so does kvd's now.
* A room begun on a manager after its ``close()`` raised RuntimeError ("Event loop is closed")
  into the scheduler, from the constructor's cleanup and from every daemon call; it now fails
  with a KvdConnectionError like a room on a lost connection.
* Held: two decode engines asking for one prefill room (one gets exact bytes, the other fails
  with its pages untouched); polls, aborts and failures of rooms never handed to the daemon.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from tests.sglang.harness import Rank, check_room, fill_room, free_port, kv_classes, server_args
from tools.cluster import DaemonProc, start_daemon

pytestmark = pytest.mark.e2e

GEO = dict(layers=2, total_heads=4, head_dim=16, page_size=4, num_pages=16)
SENTINEL = 0x5A5A


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.support import PAIR_FLAGS

    tmp = tmp_path_factory.mktemp("sglang-edges")
    daemons: list[DaemonProc] = []
    ranks: list[Rank] = []
    server = None
    try:
        with ThreadPoolExecutor(2) as pool:  # both at once: each takes a second or more to start
            started = [pool.submit(start_daemon, tmp, name, *PAIR_FLAGS) for name in ("prefill", "decode")]
            daemons += [fut.result() for fut in started if fut.exception() is None]  # stopped below either way
            for fut in started:
                fut.result()  # a daemon that did not start: its error
        C = kv_classes()
        bport = free_port()
        server = C["bootstrap_server"]("127.0.0.1", bport)

        def make(role: str, sock: str, port: int = 30001) -> Rank:
            from sglang.srt.disaggregation.utils import DisaggregationMode

            rk = Rank(role, 1, 0, **GEO)  # type: ignore[arg-type]
            rk.allocate()
            ranks.append(rk)
            sa = server_args(1, bport, sock)
            sa.port = port
            mode = DisaggregationMode.PREFILL if role == "prefill" else DisaggregationMode.DECODE
            rk.mgr = C["manager"](rk.kv_args(), mode, sa, False)
            return rk

        p = make("prefill", daemons[0].socket_path)
        d1 = make("decode", daemons[1].socket_path, 30001)
        d2 = make("decode", daemons[1].socket_path, 30002)
        yield {"C": C, "addr": f"127.0.0.1:{bport}", "p": p, "d1": d1, "d2": d2, "make": make,
               "daemons": daemons}
    finally:
        for rk in ranks:
            rk.close()
        if server is not None:
            server.close()
        for d in daemons:  # both at once: each takes a second or more to stop
            if d.alive():
                d.proc.terminate()
        for d in daemons:
            d.stop()


def _end(obj: Any, timeout: float = 15.0) -> int:
    from sglang.srt.disaggregation.base.conn import KVPoll

    deadline = time.monotonic() + timeout
    while (st := obj.poll()) not in (KVPoll.Success, KVPoll.Failed) and time.monotonic() < deadline:
        time.sleep(0.01)
    return st


def _fail_reason(obj: Any) -> str:
    from sglang.srt.disaggregation.common.conn import KVTransferError

    with pytest.raises(KVTransferError) as ei:
        obj.failure_exception()
    return str(ei.value)


def _fill_sentinel(rank: Rank) -> None:
    for b in rank.bufs:
        b.view(torch.int16).fill_(SENTINEL)


def _untouched(rank: Rank) -> bool:
    return all(bool((b.view(torch.int16) == SENTINEL).all()) for b in rank.bufs)


def test_a_room_id_used_again_after_a_failed_use(env) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    C, addr, p, d = env["C"], env["addr"], env["p"], env["d1"]
    room = 0x7E57_0001
    # first use: the prefill aborts mid-room; SGLang calls failure_exception() and no clear()
    rv = C["receiver"](d.mgr, addr, room)
    rv.init(0)
    rv.send_metadata([1, 2, 3], 0)
    s = C["sender"](p.mgr, addr, room)
    s.init(3, 0)
    s.send([4])
    time.sleep(0.3)  # the daemons pair the room (an abort before that leaves the decode to its deadline)
    s.abort()
    assert _end(s) == KVPoll.Failed
    assert "Abort" in _fail_reason(s)
    assert _end(rv) == KVPoll.Failed
    _fail_reason(rv)
    rv.clear()
    # second use of the id: a fresh pair of objects must not inherit the old use's outcome
    rv = C["receiver"](d.mgr, addr, room)
    assert rv.poll() == KVPoll.Bootstrapping
    rv.init(0)
    rv.send_metadata([8, 9, 10], 1)
    s = C["sender"](p.mgr, addr, room)
    assert s.poll() == KVPoll.WaitingForInput
    s.init(3, 1)
    assert s.poll() == KVPoll.WaitingForInput
    g = fill_room([p], [5, 6, 7], seed=9)
    s.send([5, 6])
    s.send([7])
    assert (_end(rv), _end(s)) == (KVPoll.Success, KVPoll.Success)
    assert check_room(d, [8, 9, 10], g) > 0
    rv.clear()
    s.clear()


def test_a_refused_manager_keeps_no_daemon_connection(env) -> None:
    from kvd.engineclient.replies import KvdError

    def client_threads() -> int:
        return sum(t.name == "kvd-client-loop" and t.is_alive() for t in threading.enumerate())

    before = client_threads()
    with pytest.raises(KvdError, match="already registered"):
        env["make"]("prefill", env["daemons"][0].socket_path)  # the same prefill rank again
    assert client_threads() == before
    st = env["daemons"][0].status()
    assert st["daemon"].get("errors", {}).get("loop_crash", 0) == 0


def test_two_decode_engines_one_prefill_room(env) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    C, addr, p, d1, d2 = env["C"], env["addr"], env["p"], env["d1"], env["d2"]
    room = 0x7E57_0002
    for d in (d1, d2):
        _fill_sentinel(d)
        d.mgr.room_timeout_s = 1.5  # the receiver left out waits this long, not the daemon's 8 s
    r1 = C["receiver"](d1.mgr, addr, room)
    r2 = C["receiver"](d2.mgr, addr, room)
    for rv, dst in ((r1, [1, 2]), (r2, [5, 6])):
        rv.init(0)
        rv.send_metadata(dst, 0)
    s = C["sender"](p.mgr, addr, room)
    s.init(2, 0)
    g = fill_room([p], [3, 4], seed=10)
    s.send([3, 4])
    ends = {id(r1): _end(r1), id(r2): _end(r2)}
    assert _end(s) in (KVPoll.Success, KVPoll.Failed)
    for rv, d, dst in ((r1, d1, [1, 2]), (r2, d2, [5, 6])):
        if ends[id(rv)] == KVPoll.Success:
            assert check_room(d, dst, g) > 0
        else:
            assert ends[id(rv)] == KVPoll.Failed
            _fail_reason(rv)  # the release fence: no write of it can land after this
            assert _untouched(d)
        rv.clear()
    assert list(ends.values()).count(KVPoll.Success) <= 1
    s.clear()
    for d in (d1, d2):
        d.mgr.room_timeout_s = 0.0


def test_rooms_never_handed_to_the_daemon(env) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    C, addr, p, d = env["C"], env["addr"], env["p"], env["d1"]
    rv = C["receiver"](d.mgr, addr, 0x7E57_0003)
    assert rv.poll() == KVPoll.Bootstrapping
    assert rv.is_abort_release_safe()  # kvd never had its pages
    rv.abort()
    assert rv.poll() == KVPoll.Failed
    assert "Abort" in _fail_reason(rv)
    s = C["sender"](p.mgr, addr, 0x7E57_0004)
    assert s.poll() == KVPoll.WaitingForInput
    s.abort()
    assert s.poll() == KVPoll.Failed
    s.send([1])  # a send after the abort changes nothing
    assert s.poll() == KVPoll.Failed
    assert "Abort" in _fail_reason(s)


def test_plugin_registers_beside_another_plugins_hook_and_only_once() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from kvd.sglang import plugin

    kv_classes()  # registered the way SGLang does it
    saved = list(HookRegistry._hooks.get(plugin._TARGET, []))

    def foreign(original, *args, **kwargs):  # another backend's plug-in, loaded first
        return original(*args, **kwargs)

    try:
        HookRegistry._hooks[plugin._TARGET] = [(HookType.AROUND, foreign, None)]
        plugin.register()
        plugin.register()
        mine = [h for _, h, _ in HookRegistry._hooks[plugin._TARGET] if h is plugin._around_get_kv_class]
        assert len(mine) == 1
        assert [h for _, h, _ in HookRegistry._hooks[plugin._TARGET]][0] is foreign
        HookRegistry._hooks[plugin._TARGET] = []  # an entry the defaultdict made on a read
        plugin.register()
        assert [h for _, h, _ in HookRegistry._hooks[plugin._TARGET]] == [plugin._around_get_kv_class]
    finally:
        HookRegistry._hooks[plugin._TARGET] = saved


def test_bootstrap_server_refuses_malformed_requests_and_counts_a_rank_once() -> None:
    import requests

    C = kv_classes()
    port = free_port()
    server = C["bootstrap_server"]("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    whole = "/route?prefill_dp_rank=-1&prefill_cp_rank=-1&target_tp_rank=-1&target_pp_rank=-1"
    good = {"attn_tp_size": 2, "attn_tp_rank": 0, "attn_cp_size": 1, "attn_cp_rank": 0, "attn_dp_size": 1,
            "attn_dp_rank": 0, "pp_size": 1, "pp_rank": 0, "system_dp_size": 1, "system_dp_rank": 0,
            "rank_ip": "127.0.0.1", "rank_port": 5000, "page_size": 4, "kv_cache_dtype": "bfloat16"}
    try:
        for _ in range(50):  # the server starts on its own thread
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.05)
        for bad in ({**good, "attn_tp_size": "2"}, {**good, "attn_tp_size": 0}, {**good, "attn_tp_size": 10**6},
                    {**good, "attn_tp_rank": 2}, {**good, "rank_port": "x"}, {**good, "rank_ip": "a b/c"},
                    {**good, "attn_dp_rank": [0]}, [1, 2], "x"):
            assert requests.put(url + "/route", json=bad, timeout=3).status_code == 400, bad
        assert requests.put(url + "/route", data=b"\xff\x00", timeout=3).status_code == 400
        for q in ("/route?prefill_dp_rank=x&prefill_cp_rank=0&target_tp_rank=0&target_pp_rank=0",
                  "/route?prefill_dp_rank=0&prefill_cp_rank=0&target_tp_rank=0.5&target_pp_rank=0"):
            assert requests.get(url + q, timeout=3).status_code == 400
        for body in ({"bootstrap_rooms": 5}, {"bootstrap_rooms": ["x"]}, {}, [1]):
            assert requests.post(url + "/query_dp_ranks", json=body, timeout=3).status_code == 400
        for body in ({"bootstrap_room": "x", "dp_rank": 0}, {"bootstrap_room": 1, "dp_rank": -1}, {}):
            assert requests.post(url + "/register_dp_rank", json=body, timeout=3).status_code == 400
        assert requests.get(url + whole, timeout=3).status_code == 503  # nothing registered yet
        # rank 0 of a TP-2 engine registers twice (a retried PUT): still one of two ranks
        for _ in range(2):
            assert requests.put(url + "/route", json=good, timeout=3).status_code == 200
        assert requests.get(url + whole, timeout=3).status_code == 503
        assert requests.put(url + "/route", json={**good, "attn_tp_size": 1}, timeout=3).status_code == 400
        assert requests.put(url + "/route", json={**good, "attn_tp_rank": 1, "rank_port": 5001},
                            timeout=3).status_code == 200
        info = requests.get(url + whole, timeout=3)
        assert info.status_code == 200 and info.json()["attn_tp_size"] == 2
        assert requests.post(url + "/register_dp_rank", json={"bootstrap_room": 7, "dp_rank": 0},
                             timeout=3).status_code == 200
        assert requests.post(url + "/query_dp_ranks", json={"bootstrap_rooms": [7, 8]}, timeout=3).json() == {"7": 0}
    finally:
        server.close()


def test_aux_row_indices_outside_the_buffers_fail_the_room(env) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    C, addr, p, d = env["C"], env["addr"], env["p"], env["d1"]
    rows = p.meta.output_ids.shape[0]
    for room, bad in ((0x7E57_0010, rows), (0x7E57_0011, -1), (0x7E57_0012, 10**9)):
        before = [d.meta.output_ids.clone(), d.meta.bootstrap_room.clone()]
        rv = C["receiver"](d.mgr, addr, room)
        rv.init(0)
        rv.send_metadata([1, 2], bad)
        assert rv.poll() == KVPoll.Failed and "aux" in _fail_reason(rv)
        assert torch.equal(before[0], d.meta.output_ids) and torch.equal(before[1], d.meta.bootstrap_room)
        s = C["sender"](p.mgr, addr, room)
        s.init(2, bad)
        s.send([3])
        s.send([4])  # the last chunk: its aux row would be read here
        assert s.poll() == KVPoll.Failed and "aux" in _fail_reason(s)


def test_a_prefill_engine_back_elsewhere_under_the_same_bootstrap_address(env) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.utils import DisaggregationMode

    C, d = env["C"], env["d1"]
    port = free_port()
    addr = f"127.0.0.1:{port}"

    def prefill_on(daemon: DaemonProc) -> tuple[Any, Rank]:
        server = C["bootstrap_server"]("127.0.0.1", port)
        rk = Rank("prefill", 1, 0, **GEO)  # type: ignore[arg-type]
        rk.allocate()
        rk.mgr = C["manager"](rk.kv_args(), DisaggregationMode.PREFILL,
                              server_args(1, port, daemon.socket_path), False)
        return server, rk

    def room(n: int, p: Rank) -> tuple[int, int]:
        rv = C["receiver"](d.mgr, addr, 0x7E57_0100 + n)
        assert d.mgr.try_ensure_parallel_info(addr)
        rv.init(0)
        rv.send_metadata([1, 2], 0)
        s = C["sender"](p.mgr, addr, 0x7E57_0100 + n)
        s.init(2, 0)
        s.send([3, 4])
        got = _end(rv)
        if got == KVPoll.Failed:
            _fail_reason(rv)
            s.abort()  # nobody asked the prefill for it: it would wait out its own deadline
        ends = (got, _end(s))
        rv.clear()
        return ends

    server, p = prefill_on(env["daemons"][0])
    d.mgr.room_timeout_s = 1.5
    try:
        assert room(0, p) == (KVPoll.Success, KVPoll.Success)
        p.close()
        server.close()
        server, p = prefill_on(env["daemons"][1])  # back on the other node, same bootstrap address
        first = room(1, p)
        assert first[0] in (KVPoll.Success, KVPoll.Failed)  # the stale directory may cost one room
        assert room(2, p) == (KVPoll.Success, KVPoll.Success)
    finally:
        d.mgr.room_timeout_s = 0.0
        p.close()
        server.close()


def test_a_bootstrap_answer_that_is_not_a_topology_is_retried_not_raised(env) -> None:
    import http.server

    bodies = [b"<html>proxy</html>", b"[1, 2]", b'{"attn_tp_size": 1, "surprise": 2}', b"null"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(bodies[0])

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        while bodies:
            assert env["d1"].mgr.try_ensure_parallel_info(f"127.0.0.1:{httpd.server_address[1]}") is False, bodies[0]
            bodies.pop(0)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_rank_the_bootstrap_server_refuses_fails_at_once(env) -> None:
    from sglang.srt.disaggregation.utils import DisaggregationMode

    C = env["C"]
    port = free_port()
    server = C["bootstrap_server"]("127.0.0.1", port)
    ranks = []
    try:
        first = Rank("prefill", 1, 0, **GEO)  # type: ignore[arg-type]
        first.allocate()
        ranks.append(first)
        first.mgr = C["manager"](first.kv_args(), DisaggregationMode.PREFILL,
                                 server_args(1, port, env["daemons"][0].socket_path), False)
        other = Rank("prefill", 2, 1, **GEO)  # type: ignore[arg-type]
        other.allocate()
        ranks.append(other)
        threads = sum(t.name == "kvd-client-loop" for t in threading.enumerate())
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="refused the registration"):  # TP 2 beside a TP-1 rank
            C["manager"](other.kv_args(), DisaggregationMode.PREFILL,  # on the other daemon, which
                         server_args(2, port, env["daemons"][1].socket_path), False)  # has no rank 0 to differ from
        assert time.monotonic() - t0 < 3.0  # not ~16 s of retries of a refusal
        assert sum(t.name == "kvd-client-loop" for t in threading.enumerate()) == threads
    finally:
        for rk in ranks:
            rk.close()
        server.close()


def test_rooms_of_a_closed_manager_neither_raise_nor_hang(env) -> None:
    from sglang.srt.disaggregation.base.conn import KVPoll

    C, addr = env["C"], env["addr"]
    d = env["make"]("decode", env["daemons"][1].socket_path, 30003)
    d.mgr.close()  # teardown, then a late request of the scheduler
    rv = C["receiver"](d.mgr, addr, 0x7E57_0200)
    assert rv.poll() == KVPoll.Bootstrapping
    rv.init(0)
    rv.send_metadata([1], 0)
    assert rv.poll() == KVPoll.Failed and "kvd" in _fail_reason(rv)
    rv.clear()

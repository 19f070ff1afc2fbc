"""SGLang's classes in the scheduler's call order over two real kvd daemons, byte for byte."""

from __future__ import annotations

import time
import types

import pytest
import torch

from tests.sglang.harness import Rank, check_room, fill_room, free_port, kv_classes, server_args

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gloo() -> object:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    return dist.group.WORLD


def _ranks(role: str, tp: int, **kw: int | bool) -> list[Rank]:
    out = []
    for r in range(tp):
        rank = Rank(role, tp, r, **kw)  # type: ignore[arg-type]
        rank.allocate()
        out.append(rank)
    return out


def _poll_all(pollers, gloo, decode_reqs=None, meta=None) -> list[int]:
    from sglang.srt.disaggregation.utils import poll_and_all_reduce

    return poll_and_all_reduce(pollers, gloo, decode_reqs, meta)


def _until(pollers, gloo, done, timeout=30.0, **kw) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        polls = _poll_all(pollers, gloo, **kw)
        if done(polls) or time.monotonic() > deadline:
            return polls
        time.sleep(0.01)


def run_pd(pair, gloo, *, ptp: int, dtp: int, heads: int = 4, mla: bool = False, rooms: int = 2,
           pages_per_room: int = 5, chunk_pages: int = 2, zero_last: bool = False, page_size: int = 4,
           num_pages: int = 32) -> int:
    prefill_d, decode_d = pair
    C = kv_classes()
    from sglang.srt.disaggregation.base.conn import KVPoll
    from sglang.srt.disaggregation.utils import DisaggregationMode

    geo = dict(layers=2, total_heads=1 if mla else heads, head_dim=16, page_size=page_size, num_pages=num_pages,
               mla=mla)
    bport = free_port()
    server = C["bootstrap_server"]("127.0.0.1", bport)
    addr = f"127.0.0.1:{bport}"
    pranks, dranks = _ranks("prefill", ptp, **geo), _ranks("decode", dtp, **geo)
    try:
        for rk in pranks:
            rk.mgr = C["manager"](rk.kv_args(), DisaggregationMode.PREFILL,
                                  server_args(ptp, bport, prefill_d.socket_path), mla)
        for rk in dranks:
            rk.mgr = C["manager"](rk.kv_args(), DisaggregationMode.DECODE,
                                  server_args(dtp, bport, decode_d.socket_path), mla)
        checked = 0
        for n in range(rooms):
            room = 0x1234_5678_9ABC + n
            src = list(range(n * pages_per_room + 1, (n + 1) * pages_per_room + 1))
            dst = [num_pages - 5 - p for p in range(n * pages_per_room, (n + 1) * pages_per_room)]
            g = fill_room(pranks, src, seed=n)
            aux_idx_p, aux_idx_d = n % 8, (n + 3) % 8
            for rk in pranks:  # what set_buf writes on the last chunk
                rk.meta.output_ids[aux_idx_p][0] = 1000 + n
                rk.meta.output_hidden_states[aux_idx_p] = torch.arange(32, dtype=torch.bfloat16) + n
                rk.meta.bootstrap_room[aux_idx_p, 0] = room
            # decode: receiver, parallel info, init, metadata (DecodePreallocQueue order)
            recvs = [C["receiver"](rk.mgr, addr, room) for rk in dranks]
            for rk, rv in zip(dranks, recvs, strict=True):
                assert rk.mgr.try_ensure_parallel_info(addr)
                rv.init(0)
                rk.meta.clear_slot(aux_idx_d)
                rv.send_metadata(torch.tensor(dst, dtype=torch.int32).numpy(), aux_idx_d, None)
            # prefill: sender, init, chunked send (is_last by SGLang's rule)
            senders = [C["sender"](rk.mgr, addr, room) for rk in pranks]
            assert _poll_all(senders, gloo) == [KVPoll.WaitingForInput] * ptp
            for s in senders:
                s.init(len(src), aux_idx_p)
            chunks = [src[i:i + chunk_pages] for i in range(0, len(src), chunk_pages)]
            if zero_last:
                chunks.append([])
            for chunk in chunks:
                for s in senders:
                    if s.should_send_kv_chunk(len(chunk), chunk is chunks[-1]):
                        s.send(torch.tensor(chunk, dtype=torch.int32).numpy())
            dreqs = [types.SimpleNamespace(req=types.SimpleNamespace(bootstrap_host="127.0.0.1"),
                                           metadata_buffer_index=aux_idx_d, kv_receiver=rv) for rv in recvs]
            polls = _until(recvs, gloo, lambda p: all(x in (KVPoll.Success, KVPoll.Failed) for x in p),
                           decode_reqs=dreqs, meta=dranks[0].meta)
            if KVPoll.Failed in polls:
                for rv in recvs:
                    with pytest.raises(Exception) as ei:
                        rv.failure_exception()
                    print(ei.value)
            assert polls == [KVPoll.Success] * dtp, (polls, decode_d.log_tail(), prefill_d.log_tail())
            spolls = _until(senders, gloo, lambda p: all(x in (KVPoll.Success, KVPoll.Failed) for x in p))
            assert spolls == [KVPoll.Success] * ptp
            for rk in dranks:
                checked += check_room(rk, dst, g)
                assert int(rk.meta.output_ids[aux_idx_d][0]) == 1000 + n
                assert torch.equal(rk.meta.output_hidden_states[aux_idx_d],
                                   torch.arange(32, dtype=torch.bfloat16) + n)
                assert int(rk.meta.bootstrap_room[aux_idx_d, 0]) == room
                # aux rows byte for byte
                from kvd.sglang.pool import aux_row
                a = rk.mgr.kv_args
                assert aux_row(a.aux_data_ptrs, a.aux_item_lens, aux_idx_d) == aux_row(
                    pranks[0].mgr.kv_args.aux_data_ptrs, pranks[0].mgr.kv_args.aux_item_lens, aux_idx_p)
            for x in [*recvs, *senders]:
                x.clear()
        return checked
    finally:
        for rk in [*pranks, *dranks]:
            rk.close()
        server.close()


@pytest.mark.parametrize("ptp,dtp,heads", [(1, 1, 4), (2, 1, 4), (1, 2, 4), (4, 2, 2)])
def test_tp(pair, gloo, ptp, dtp, heads):
    assert run_pd(pair, gloo, ptp=ptp, dtp=dtp, heads=heads) > 0


def test_mla(pair, gloo):
    assert run_pd(pair, gloo, ptp=2, dtp=1, mla=True) > 0


def test_chunked_zero_page_last(pair, gloo):
    assert run_pd(pair, gloo, ptp=1, dtp=1, pages_per_room=4, chunk_pages=2, zero_last=True) > 0

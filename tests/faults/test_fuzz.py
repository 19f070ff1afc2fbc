"""At least 20,000 malformed inputs on each socket (tools/fuzz.py): the engine Unix socket of
one daemon and the peer ZMQ ROUTER of the other, at once. Afterwards both daemons are alive,
answer status, hold no rooms, and a legitimate transfer between them is byte-exact."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from tools.faultkit import PATHS, Cluster, attacker_keys, fresh_transfer, log_problems, wait_reclaimed
from tools.fuzz import fuzz_engine_socket, fuzz_peer
from tools.netns import enter

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

N = 20_000


def _engine_fuzz(q, netns, sock, n, seed):
    enter(netns)
    q.put(("engine", fuzz_engine_socket(sock, n, seed, deadline_s=150)))


def _peer_fuzz(q, netns, address, n, seed, srcs, keys):
    enter(netns)
    q.put(("peer", fuzz_peer(address, n, seed, srcs, keys)))


@pytest.mark.defect(2, 5, 6, 9)
def test_fuzz_both_sockets_then_a_clean_transfer(tmp_path):
    cl = Cluster(tmp_path, PATHS["direct"])
    try:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        srcs = [cl.prefill.address, "tcp://10.77.0.250:17500", "", "ünï", "tcp://127.0.0.1"]
        procs = [ctx.Process(target=_engine_fuzz, args=(q, cl.dnodes[0].netns, cl.decodes[0].socket_path, N, 1)),
                 ctx.Process(target=_peer_fuzz, args=(q, cl.dnodes[0].netns, cl.prefill.address, N, 2, srcs,
                                                     attacker_keys(cl)))]  # an authorized insider
        t0 = time.monotonic()
        for p in procs:
            p.start()
        stats = dict(q.get(timeout=200) for _ in procs)
        for p in procs:
            p.join(10)
        took = time.monotonic() - t0
        print(f"fuzz: {stats} in {took:.1f}s")
        assert stats["engine"]["sent"] >= N and stats["peer"]["sent"] >= N, stats
        problems = []
        for d in cl.daemons():
            if not d.alive():
                problems.append(f"daemon {d.name} died: {d.log_tail(10)}")
                continue
            st = d.status()
            print(d.name, "errors", st["daemon"]["errors"])
            left = wait_reclaimed(d, 10)
            if left:
                problems.append(f"daemon {d.name} not reclaimed after fuzzing: {left}")
            problems += log_problems(d)
        problems += fresh_transfer(cl, 7000, 5)
        assert not problems, "\n".join(problems)
    finally:
        cl.close()

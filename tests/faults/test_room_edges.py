"""Restarts around the room lifecycle's edges (red team round 7), against real daemons on
network-namespace nodes: a prefill daemon killed and started again on its port while decode
rooms wait for its engine's first chunk. The waiting rooms end within their deadline, failed
with the reason (the new incarnation is seen) or byte-exact, never hang and take no byte of
the old incarnation; the cluster goes on serving on the same ports and pools."""

from __future__ import annotations

import time

import pytest

from kvd.client import KvdClient, RoomFailed
from kvd.hostpool import HostPool
from tools.faultkit import CANARY, DEADLINE_S, PATHS, SEED, SLACK_S, Cluster, build_layout
from tools.kvpattern import fill_canary, fill_prefill, pages_to_tokens, verify_decode

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def test_prefill_daemon_restarted_while_decode_rooms_wait_for_its_engine(tmp_path):
    cl = Cluster(tmp_path, PATHS["direct"])
    try:
        P, D = cl.prefill, cl.decodes[0]
        pl = build_layout("prefill", "P", 1, 0, 2, 8, 64, "bfloat16", 16, 32)
        dl = build_layout("decode", "D", 1, 0, 2, 8, 64, "bfloat16", 16, 32)
        with HostPool.create(pl) as ph, HostPool.create(dl) as dh, KvdClient(D.socket_path, timeout=10) as dc:
            fill_prefill(ph, pl, SEED)
            fill_canary(dh, CANARY)
            old = KvdClient(P.socket_path, timeout=10)
            old.register_pool(pl, ph, bootstrap=P.address)
            dpid = dc.register_pool(dl, dh)
            rooms = {r: [2 * r, 2 * r + 1] for r in range(1, 4)}
            for r, pages in rooms.items():
                dc.recv(dpid, r, P.address, "P", pages)
            end = time.monotonic() + 10
            while {x["state"] for x in D.status()["rooms"]} != {"waiting_for_input"} and time.monotonic() < end:
                time.sleep(0.05)
            t0 = time.monotonic()
            P.kill()  # kill -9, the prefill engine's pages never sent
            old.close()
            cl.prefill = P = cl.net.restart(cl.tmp, P)
            with KvdClient(P.socket_path, timeout=10) as pc:
                ppid = pc.register_pool(pl, ph, bootstrap=P.address)
                for r, pages in rooms.items():
                    pc.send(ppid, r, pages, True, aux=b"late")  # the new incarnation never had these rooms
                problems: list[str] = []
                done: list[int] = []  # completed against the new incarnation: byte-exact then
                for r in rooms:
                    try:
                        if dc.wait(r, timeout=DEADLINE_S + SLACK_S).aux != b"late":
                            problems.append(f"room {r} succeeded with the wrong aux")
                        done.append(r)
                    except RoomFailed as exc:
                        if not exc.status.reason:
                            problems.append(f"room {r} failed without a reason")
                    st = dc.wait_released(r, timeout=DEADLINE_S + SLACK_S)
                    if not st.released:
                        problems.append(f"room {r} not released")
                took = time.monotonic() - t0
                assert took < DEADLINE_S + SLACK_S, f"rooms ended {took:.1f}s after the restart"
                toks = pages_to_tokens([p for r in done for p in rooms[r]], 16)
                problems += verify_decode(dh, dl, toks, toks, SEED, CANARY)  # the others: canary only
                # The cluster serves a fresh room on the same pools (the restarted daemon, same port).
                dc.recv(dpid, 9, P.address, "P", [20, 21])
                pc.send(ppid, 9, [20, 21], True, aux=b"ok")
                got = dc.wait(9, timeout=10)
                if got.aux != b"ok":
                    problems.append(f"fresh room aux {got.aux!r}")
                toks = pages_to_tokens([*(p for r in done for p in rooms[r]), 20, 21], 16)
                problems += verify_decode(dh, dl, toks, toks, SEED, CANARY)
        assert not problems, "\n".join(problems)
    finally:
        cl.close()

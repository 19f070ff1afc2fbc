"""Daemons as separate "nodes": Linux network namespaces joined by veth pairs to one bridge.

Each node is a network namespace with one interface (``eth0``, an address 10.77.<net>.<n>/24)
whose veth peer sits on a bridge in a private "switch" namespace, so nothing is added to the
host's own namespace. A partition takes a node's switch-side link down (its own interface
stays up, so the daemon's bound address stays valid); heal brings it up again. ``tc netem``
does not work on these machines; links going down is the only network fault.

Processes enter a node either by ``ip netns exec`` (the daemon: the pid Popen sees is the
daemon's own, so SIGSTOP/SIGKILL reach it) or, inside a Python child, by :func:`enter`
(setns(2) through libc: Python 3.11's os has no setns).

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN). :class:`Net` raises :class:`NetnsUnavailable`
when namespaces cannot be made: the fault tests fail loudly instead of skipping.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.cluster import DaemonProc, trust_flags  # noqa: E402

CLONE_NEWNET = 0x40000000
_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no ip(8), no kernel support)."""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def enter(netns: str) -> None:
    """Move the calling process (all of it: call before starting threads) into ``netns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Node:
    name: str
    netns: str
    addr: str
    link: str  # the switch-side veth end: down = partitioned

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


@dataclass
class NodeDaemon(DaemonProc):
    """A kvd daemon running inside a node's namespace, bound to the node's address."""

    node: Node | None = None
    extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        assert self.node is not None
        return f"tcp://{self.node.addr}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sigstop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.sigcont()  # a stopped daemon never handles SIGTERM
        super().stop()


class Net:
    """A switch namespace with a bridge, and nodes attached to it. Use as a context manager
    (or call close()): every namespace is deleted, whatever happened in between."""

    def __init__(self, net: int | None = None) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (the fault suite runs as root in CI)")
        self.id = f"{os.getpid() % 10000}{next(_counter) % 100}"
        self.net = net if net is not None else 77
        self.switch = f"kvdf{self.id}sw"
        self.nodes: list[Node] = []
        self.daemons: list[NodeDaemon] = []
        try:
            sh("ip", "netns", "add", self.switch)
        except (RuntimeError, FileNotFoundError) as exc:
            raise NetnsUnavailable(f"cannot create a network namespace: {exc}") from exc
        try:
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
            sh("ip", "-n", self.switch, "link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    def add_node(self, name: str) -> Node:
        n = len(self.nodes) + 1
        ns = f"kvdf{self.id}n{n}"
        link = f"kf{self.id}s{n}"  # <= 15 characters
        inner = f"kf{self.id}i{n}"
        sh("ip", "netns", "add", ns)
        node = Node(name, ns, f"10.{self.net}.0.{n}", link)
        self.nodes.append(node)
        sh("ip", "link", "add", link, "netns", self.switch, "type", "veth", "peer", "name", inner,
           "netns", ns)
        sh("ip", "-n", self.switch, "link", "set", link, "master", "br0")
        sh("ip", "-n", self.switch, "link", "set", link, "up")
        sh("ip", "-n", ns, "link", "set", inner, "name", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        return node

    def partition(self, node: Node) -> None:
        sh("ip", "-n", self.switch, "link", "set", node.link, "down")

    def heal(self, node: Node) -> None:
        sh("ip", "-n", self.switch, "link", "set", node.link, "up")

    def start_daemon(self, tmp: Path, node: Node, name: str, *extra: str, port: int = 0,
                     env: dict[str, str] | None = None, ready_timeout: float = 30.0) -> NodeDaemon:
        """``python -m kvd`` inside ``node`` bound to its address; waits until its socket
        answers a status request. ``port`` 0: a fixed per-node port (17500), the same on a
        restart, since every node has its own address space."""
        port = port or 17500
        sock = str(tmp / f"{name}.sock")
        log_path = tmp / f"{name}.log"
        # Secure by default, as in production: CurveZMQ keys per daemon, one authorized-keys
        # directory per cluster; a restart keeps the daemon's key.
        insecure = any(arg.startswith("--peer-insecure") for arg in extra)
        secret = tmp / "trust" / name / "kvd.key_secret"
        if insecure:
            trust: list[str] = []
        elif secret.exists():
            trust = ["--peer-key-file", str(secret), "--peer-authorized-keys", str(tmp / "trust" / "authorized")]
        else:
            trust = trust_flags(tmp, name, f"tcp://{node.addr}:{port}")
        cmd = [*node.exec_prefix(), sys.executable, "-m", "kvd", "--socket-path", sock,
               "--peer-port", str(port), "--node-hostname", node.addr, "--log-format", "json", *trust, *extra]
        with open(log_path, "a") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **(env or {})})
        d = NodeDaemon(name, sock, port, proc, log_path, node=node, extra=tuple(extra), env=dict(env or {}))
        self.daemons.append(d)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"kvd {name} exited with {proc.returncode}:\n{d.log_tail(40)}")
            try:
                d.status()
                return d
            except Exception:
                time.sleep(0.1)
        d.stop()
        raise RuntimeError(f"kvd {name} did not come up:\n{d.log_tail(40)}")

    def restart(self, tmp: Path, d: NodeDaemon) -> NodeDaemon:
        """Start ``d`` again, same node, port, socket and flags (after it was killed)."""
        assert d.node is not None
        if d.alive():
            d.kill()
        return self.start_daemon(tmp, d.node, d.name, *d.extra, port=d.port, env=d.env)

    def close(self) -> None:
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.stop()
        for node in self.nodes:
            sh("ip", "netns", "del", node.netns, check=False)
        sh("ip", "netns", "del", self.switch, check=False)
        self.nodes.clear()

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def leftover_namespaces() -> list[str]:
    """Namespaces this module made that still exist (a crashed run): ``ip netns del`` them."""
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("kvdf")]


__all__ = ["Net", "NetnsUnavailable", "Node", "NodeDaemon", "enter", "leftover_namespaces", "sh"]

"""Helpers for tests with real local users: create them (as root), run code as one of them,
and start a daemon as one of them.

/root is not readable by other users here, so a non-root process cannot start Python from the
root's interpreter: the helpers fork the test process (every module already imported) and drop
to the user with setgroups/setgid/setuid before running the code.
"""

from __future__ import annotations

# Everything the forked children need, imported while the files can still be read.
import concurrent.futures.process  # noqa: F401
import concurrent.futures.thread  # noqa: F401
import encodings.idna  # noqa: F401
import multiprocessing as mp
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mooncake.engine  # noqa: F401
import numpy.ma  # noqa: F401
import pytest
import uvloop  # noqa: F401
import zmq.auth.asyncio  # noqa: F401

import kvd.engineclient.client  # noqa: F401
import kvd.engineclient.fdpass  # noqa: F401
import kvd.ops.cli
import kvd.shell.daemon  # noqa: F401
import kvd.transfer.mooncake  # noqa: F401
import tools.fake_engine  # noqa: F401

GROUP = "kvdtest"


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (creates users)")
    for tool in ("useradd", "groupadd"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            pytest.skip(f"needs {tool}")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def user(name: str, in_group: bool = True) -> User:
    """A system user (created if missing), in the test group if ``in_group``."""
    if subprocess.run(["getent", "group", GROUP], capture_output=True).returncode:
        subprocess.run(["groupadd", "--system", GROUP], check=True)
    if subprocess.run(["getent", "passwd", name], capture_output=True).returncode:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True)
    if in_group:
        subprocess.run(["usermod", "-a", "-G", GROUP, name], check=True)
    pw = pwd.getpwnam(name)
    return User(name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(name, pw.pw_gid)))


def _drop(u: User) -> None:
    # multiprocessing's shared-memory resource tracker would start a new interpreter (which this
    # user cannot read) or write to root's: the test's pools are closed and unlinked explicitly.
    from multiprocessing import resource_tracker

    resource_tracker.register = lambda *args, **kwargs: None  # type: ignore[assignment]
    resource_tracker.unregister = lambda *args, **kwargs: None  # type: ignore[assignment]
    os.setgroups(list(u.groups))
    os.setgid(u.gid)
    os.setuid(u.uid)


def _child(u: User, fn: Callable[..., Any], args: tuple[Any, ...], q: Any) -> None:
    try:
        _drop(u)
        q.put(("ok", fn(*args)))
    except BaseException as exc:  # report everything to the parent
        q.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_as(u: User, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """``fn(*args)`` in a forked child running as ``u``; its result (exceptions re-raised as text)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(u, fn, args, q))
    proc.start()
    try:
        status, value = q.get(timeout=timeout)
    finally:
        proc.join(10)
    if status != "ok":
        raise AssertionError(f"as {u.name}: {value}")
    return value


class Background:
    """``fn(*args)`` running as a user in a forked child; :meth:`result` waits for it."""

    def __init__(self, u: User, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        ctx = mp.get_context("fork")
        self.user = u
        self.q = ctx.Queue()
        self.proc = ctx.Process(target=_child, args=(u, fn, args, self.q))
        self.proc.start()

    def result(self, timeout: float = 60.0) -> Any:
        try:
            status, value = self.q.get(timeout=timeout)
        finally:
            self.proc.join(10)
        if status != "ok":
            raise AssertionError(f"as {self.user.name}: {value}")
        return value


def start_as(u: User, fn: Callable[..., Any], *args: Any) -> Background:
    """``fn(*args)`` in a forked child running as ``u``, in the background."""
    return Background(u, fn, args)


@dataclass
class LocalDaemon:
    socket_path: str
    address: str
    pid: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> Any:
        from kvd.client import KvdClient

        return KvdClient(self.socket_path, timeout=10)

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(100):
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                return
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def wait_file(path: str, timeout: float = 30.0) -> None:
    """Wait until another user's process has written ``path`` (how the processes of a test hand
    each other their turn)."""
    end = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.05)


def workdir() -> Path:
    """A directory every test user can traverse (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="kvdt-", dir="/tmp"))
    os.chmod(base, 0o1777)  # the test users leave their signal files here
    return base


def start_daemon_as(u: User | None, base: Path, *extra: str) -> LocalDaemon:
    """A daemon (as ``u``; None = root) with its socket in ``base/run`` (group kvdtest, 0750)."""
    import grp

    run = base / "run"
    run.mkdir(exist_ok=True)
    gid = grp.getgrnam(GROUP).gr_gid
    os.chown(run, u.uid if u else 0, gid)
    os.chmod(run, 0o750)
    sock = str(run / "kvd.sock")
    from tools.cluster import free_port

    port = free_port()
    log_path = base / f"daemon-{u.name if u else 'root'}.log"
    argv = ["--socket-path", sock, "--socket-group", GROUP, "--peer-port", str(port), "--node-hostname",
            "127.0.0.1", "--log-format", "json", "--transport-same-node", "off", "--peer-insecure", *extra]
    pid = os.fork()
    if pid == 0:  # the daemon: its own log, then the user, then kvd's main
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (pytest's capture is not ours)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            if u is not None:
                _drop(u)
            os.environ["HOME"] = str(base)
            code = kvd.ops.cli.main(argv)
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        os._exit(code)
    d = LocalDaemon(sock, f"tcp://127.0.0.1:{port}", pid, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            raise RuntimeError(f"daemon exited:\n{d.log()}")
        try:
            with d.client() as c:
                c.status()
            return d
        except Exception:
            time.sleep(0.2)
    d.stop()
    raise RuntimeError(f"daemon did not come up:\n{d.log()}")


__all__ = ["GROUP", "Background", "LocalDaemon", "User", "need_root", "run_as", "start_as", "start_daemon_as", "user",
           "wait_file",
           "workdir"]

"""``kvd keygen`` and the secure default: no key, no start (unless peer.insecure)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from kvd.shell.peer_auth import certificate_metadata

ROOT = Path(__file__).resolve().parents[2]


def kvd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvd", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={**os.environ, **(env or {})})


def test_keygen_from_the_config_and_refusing_to_overwrite(tmp_path: Path) -> None:
    env = {"KVD_PEER_KEY_FILE": str(tmp_path / "keys" / "kvd.key_secret"), "KVD_NODE_HOSTNAME": "10.1.2.3",
           "KVD_PEER_PORT": "17555"}
    out = kvd("keygen", env=env)
    assert out.returncode == 0, out.stderr
    public, secret = tmp_path / "keys" / "kvd.key", tmp_path / "keys" / "kvd.key_secret"
    assert certificate_metadata(public)["address"] == "tcp://10.1.2.3:17555"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    again = kvd("keygen", env=env)
    assert again.returncode == 1 and "exists" in again.stderr
    assert kvd("keygen", "--if-missing", env=env).returncode == 0
    assert kvd("keygen", "--address", "nonsense", "--dir", str(tmp_path / "x")).returncode == 2


def test_no_key_no_start_unless_insecure(tmp_path: Path) -> None:
    sock = str(tmp_path / "k.sock")
    out = kvd("--socket-path", sock, "--peer-port", "0", "--peer-key-file", str(tmp_path / "none"),
              "--log-format", "json")
    assert out.returncode == 1
    assert "no peer key" in out.stderr and "kvd keygen" in out.stderr and "peer.insecure" in out.stderr
    assert not os.path.exists(sock)  # refused before anything was bound

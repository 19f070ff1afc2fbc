"""``kvctl``: the operator's view into a running kvd (``kvctl status``: rooms, peers, transport).

It only reads: one status request over the daemon's Unix socket, rendered as tables or
JSON. ``render_status`` is pure (a dict in, text out) and tolerates missing or odd fields,
because kvctl may be older or newer than the daemon it talks to. Exit codes: 0 ok,
2 kvd unreachable or bad configuration (one line on stderr says why).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kvd.core.config import CONFIG_ENV, Config, ConfigError, load_config

__all__ = ["DEFAULT_CONFIG_PATH", "main", "render_status", "resolve_socket_path"]

DEFAULT_CONFIG_PATH = "/etc/kvd/kvd.toml"
_SOCKET_ENV = "KVD_SOCKET_PATH"
_DASH = "-"


# --- formatting helpers: every one accepts anything and falls back to "-" ---


def _finite(value: object) -> float | None:
    """``value`` as a finite float; None for anything else (bools, NaN, infinities, ints too
    large for a float: a daemon's status is read as it is, whatever it holds)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        n = float(value)
    except OverflowError:
        return None
    return n if math.isfinite(n) else None


def human_bytes(value: object) -> str:
    """``1536`` -> ``"1.5 KiB"``; not a number -> ``"-"``."""
    n = _finite(value)
    if n is None:
        return _DASH
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return _DASH  # unreachable; keeps type checkers content


def human_duration(value: object) -> str:
    """Seconds as ``"0.25s"``, ``"42.0s"``, ``"5m03s"``, ``"2h01m"``, ``"3d04h"``."""
    s = _finite(value)
    if s is None or s < 0:
        return _DASH
    if s < 10:
        return f"{s:.2f}s"
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _text(value: object) -> str:
    if value is None or value == "" or isinstance(value, dict | list):
        return _DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = " ".join(str(value).split())  # one cell = one line, whatever the daemon sent
    # Engines name themselves (and peers their sessions): a control character is shown escaped,
    # never handed to the operator's terminal (ESC sequences clear it, retitle it, forge lines).
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: object) -> list[dict[str, Any]]:
    """The maps in a list (anything else: none)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list | tuple) else []


def _ranks(value: object) -> list[Any] | None:
    return list(value) if isinstance(value, list | tuple) else None


def _senders(room: dict[str, Any]) -> str:
    """``"2/4 [0,1]"``: senders reported / required, then the ranks that reported."""
    required = _ranks(room.get("senders_required"))
    reported = _ranks(room.get("senders_reported"))
    if not required and not reported:
        return _DASH  # a sending room, or an old daemon: nothing to count
    done = ",".join(_text(r) for r in reported or [])
    total = str(len(required)) if required is not None else "?"
    return f"{len(reported or [])}/{total} [{done}]"


def _progress(done: object, total: object) -> str:
    if done is None and total is None:
        return _DASH
    return f"{human_bytes(done)}/{human_bytes(total)}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def _header(daemon: dict[str, Any]) -> str:
    transport = _dict(daemon.get("transport"))
    devices = _text(transport.get("devices"))
    transport_text = _text(transport.get("protocol"))
    if devices != _DASH:
        transport_text += f" [{devices}]"
    staging = _dict(daemon.get("staging"))
    enabled = staging.get("enabled")
    if enabled is True:
        staging_text = (
            f"on, {human_bytes(staging.get('in_use_bytes'))} in use / "
            f"{human_bytes(staging.get('reserved_bytes'))} reserved / "
            f"{human_bytes(staging.get('pool_bytes'))} pool, "
            f"{_text(staging.get('waiting_rooms'))} rooms waiting"
        )
        sent = _dict(staging.get("chunks_sent"))
        if sent:  # how this daemon's staged chunks left: through the send ring, or straight from the pool
            staging_text += (f", chunks sent {_text(sent.get('gathered', 0))} gathered / "
                             f"{_text(sent.get('ungathered', 0))} ungathered")
    else:
        staging_text = "off" if enabled is False else _DASH
    return (
        f"kvd {_text(daemon.get('version'))}  pid {_text(daemon.get('pid'))}  "
        f"up {human_duration(daemon.get('uptime_s'))}  "
        f"transport {transport_text} session {_text(transport.get('session_id'))}  "
        f"staging {staging_text}"
    )


def _totals(daemon: dict[str, Any]) -> str:
    bytes_total = daemon.get("bytes_total")
    if isinstance(bytes_total, dict):  # a daemon that reports both directions
        moved = ", ".join(f"{human_bytes(v)} {_text(k)}" for k, v in bytes_total.items())
    else:
        moved = human_bytes(bytes_total)
        moved = moved if moved == _DASH else f"{moved} sent"
    errors = _dict(daemon.get("errors"))
    error_text = " ".join(f"{_text(k)}={_text(v)}" for k, v in sorted(errors.items(), key=str)) or "none"
    return (
        f"host {_text(daemon.get('hostname'))}  peer address {_text(daemon.get('peer_address'))}  "
        f"bytes {moved}  write ops {_text(daemon.get('write_ops_total'))}  "
        f"inline writes {_text(daemon.get('inline_writes_total'))}  errors {error_text}"
    )


def _trust(daemon: dict[str, Any]) -> list[str]:
    """The trust line: how peers authenticate; INSECURE spelled out when they do not."""
    trust = daemon.get("trust")
    if not isinstance(trust, dict):
        return []
    mode = trust.get("peer_auth")
    if mode == "insecure":
        return ["trust: INSECURE (peer.insecure = true): peers are neither authenticated nor encrypted"
                + (", shared token on" if trust.get("token") else "")]
    if mode != "curve":  # never shown as authenticated unless the daemon says so in words kvctl knows
        return [f"trust: UNKNOWN peer authentication ({_text(mode)}): not known to authenticate peers"]
    refused = trust.get("peer_messages_refused", 0)
    return [f"trust: peers curve ({_text(trust.get('authorized_keys'))} authorized keys), "
            f"{_text(refused)} peer messages refused, local allow-list "
            f"{'on' if trust.get('socket_allow_uids') or trust.get('socket_allow_gids') else 'off'}"]


def render_status(st: dict[str, Any]) -> str:
    """Render a status dict (``KvdClient.status()``) as the text ``kvctl status`` prints."""
    daemon = _dict(st.get("daemon"))
    lines = [_header(daemon), _totals(daemon), *_trust(daemon), ""]

    rooms = _dicts(st.get("rooms"))
    room_rows = [
        [
            _text(r.get("room")),
            _text(r.get("role")),
            _text(r.get("engine_id")),
            _text(r.get("rank")),
            _text(r.get("peer")),
            _text(r.get("state")),
            _text(r.get("path")) + (f" {_text(r.get('chunks_done'))}/{_text(r.get('chunks_total'))}"
                                    if r.get("chunks_total") else ""),
            _progress(r.get("bytes_done"), r.get("bytes_total")),
            human_duration(r.get("age_s")),
            _senders(r),
        ]
        for r in rooms
    ]
    room_headers = ["ROOM", "ROLE", "ENGINE", "RANK", "PEER", "STATE", "PATH", "BYTES", "AGE", "SENDERS"]
    lines += _table(room_headers, room_rows) if room_rows else ["no rooms in flight"]
    lines.append("")

    peers = _dicts(st.get("peers"))
    peer_rows = [
        [
            _text(p.get("peer")),
            _text(p.get("state")),
            _text(p.get("rooms")),
            human_bytes(p.get("bytes")),
            human_duration(p.get("last_seen_s")),
        ]
        for p in peers
    ]
    peer_headers = ["PEER", "STATE", "ROOMS", "BYTES", "LAST SEEN"]
    lines += _table(peer_headers, peer_rows) if peer_rows else ["no peers"]
    lines += _paths(daemon)
    return "\n".join(lines) + "\n"


def _paths(daemon: dict[str, Any]) -> list[str]:
    """How the bytes go to each peer session written to (same-node copies or the network), and
    every fallback with its reason: a fallback is never silent."""
    paths = _dict(daemon.get("peer_paths"))
    rows = []
    for session, info in sorted(paths.items(), key=lambda item: str(item[0])):
        if not isinstance(info, dict):
            continue
        fallbacks = _dict(info.get("fallbacks"))
        one_pass = _dict(info.get("batches")).get("one_pass", 0)
        path = _text(info.get("path")) + (f" (one pass x{one_pass})" if isinstance(one_pass, int) and one_pass else "")
        rows.append([_text(session), path, _text(info.get("reason")),
                     human_bytes(sum(v for v in _dict(info.get("bytes")).values() if isinstance(v, int))),
                     "; ".join(f"{_text(k)} x{_text(v)}" for k, v in fallbacks.items()) or "-"])
    if not rows:
        return []
    return ["", *_table(["PEER SESSION", "PATH", "WHY", "BYTES", "FALLBACKS"], rows)]


def resolve_socket_path(
    flag: str | None, config_path: str | None, env: Mapping[str, str] | None = None
) -> str:
    """--socket, else $KVD_SOCKET_PATH, else the config file's socket.path, else the default.

    The config file is --config, else $KVD_CONFIG, else /etc/kvd/kvd.toml if it exists.
    Raises ``ConfigError`` if a config file is named but unusable.
    """
    env = os.environ if env is None else env
    if flag:
        return flag
    if env.get(_SOCKET_ENV):
        return env[_SOCKET_ENV]
    path = config_path or env.get(CONFIG_ENV) or None
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path is None:
        return Config().socket_path
    # Only the file: kvctl must not trip over the daemon's other KVD_* variables.
    return load_config(path, env={}).socket_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvctl", description="Inspect a running kvd daemon.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", help="show the daemon, its in-flight rooms and its peers")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.add_argument(
        "--socket",
        metavar="PATH",
        help=f"kvd's Unix socket (default: ${_SOCKET_ENV}, the config, else {Config().socket_path})",
    )
    status.add_argument(
        "--config",
        metavar="PATH",
        help=f"kvd's config file, read for socket.path "
        f"(default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH} if present)",
    )
    return parser


def _reason(exc: BaseException) -> str:
    """The root cause in one line: ``[Errno 2] No such file or directory``, not the wrappers.

    The client wraps socket errors in its own (which name the path again); the OS error
    at the bottom of the chain is what the operator acts on.
    """
    root: BaseException = exc
    seen = {id(exc)}
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError):
            root = cause
        cause = cause.__cause__ or cause.__context__
    return _one_line(root)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvctl`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        socket_path = resolve_socket_path(args.socket, args.config)
    except ConfigError as exc:
        print(f"kvctl: bad configuration: {_one_line(exc)}", file=sys.stderr)
        return 2

    # Imported here, so that `kvctl --help` works even where the client's heavier
    # dependencies (numpy, msgpack) are broken.
    from kvd.engineclient.client import KvdClient, KvdError

    try:
        with KvdClient(socket_path, timeout=3.0) as client:
            st = client.status()
    except (OSError, KvdError, TimeoutError) as exc:
        print(f"kvctl: cannot reach kvd at {socket_path}: {_reason(exc)}", file=sys.stderr)
        return 2

    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        sys.stdout.write(render_status(st if isinstance(st, dict) else {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

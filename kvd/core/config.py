"""kvd's configuration: one frozen ``Config``, loaded from TOML, ``KVD_*`` env vars and flags.

Precedence is file < environment < command-line flags. Every value is validated where
it is read, and an error names the key *and where it came from* (the file, the env var
or the flag), so an operator knows which of the three to fix. Unknown keys in the file
and unknown ``KVD_*`` env vars are errors: a typo must never silently fall back to a
default. This module does no I/O beyond reading the one config file.

Naming: TOML ``[section] key`` <-> env ``KVD_SECTION_KEY`` <-> flag ``--section-key``
<-> ``Config`` attribute (listed in ``FIELDS``).
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from kvd.core.config_values import (
    AUTO,
    _address,
    _bool,
    _choice,
    _devices,
    _hostname,
    _id_list,
    _log_level,
    _port,
    _positive_float,
    _positive_int,
    _run_count,
    _show,
    _size_or_zero,
    _size_zero_or_auto,
    _socket_mode,
    _socket_path,
    _str,
    parse_host_port,
    parse_size,
)

__all__ = [
    "CONFIG_ENV",
    "FIELDS",
    "Config",
    "ConfigError",
    "Field",
    "add_config_flags",
    "load_config",
    "overrides_from_args",
    "parse_host_port",
    "parse_size",
]

CONFIG_ENV = "KVD_CONFIG"  # path of the config file; the one KVD_* variable that is not a key
_ENV_PREFIX = "KVD_"
_FLAG_DEST_PREFIX = "kvd_cfg_"  # argparse dests, prefixed so they never collide with a CLI's own


class ConfigError(ValueError):
    """A configuration value is invalid; ``errors`` lists every problem found, one per line."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


# --- the field table: the one place a key is declared ---


@dataclass(frozen=True)
class Field:
    """One configuration key: where it lives in each source and how its value is read."""

    section: str
    key: str
    attr: str
    parse: Callable[[object], Any]
    help: str

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def env(self) -> str:
        return f"{_ENV_PREFIX}{self.section}_{self.key}".upper()

    @property
    def flag(self) -> str:
        return f"--{self.section}-{self.key}".replace("_", "-")


FIELDS: tuple[Field, ...] = (
    Field("node", "hostname", "hostname", _hostname,
          "address peers and Mooncake use to reach this node"),
    Field("socket", "path", "socket_path", _socket_path,
          "Unix socket the engines connect to"),
    Field("socket", "mode", "socket_mode", _socket_mode,
          "permissions of the Unix socket (octal); never world-writable"),
    Field("socket", "group", "socket_group", _str,
          "group to chgrp the socket to, so engine users in it may connect (empty = kvd's own group)"),
    Field("socket", "max_frame_bytes", "socket_max_frame_bytes", parse_size,
          "largest request an engine may send; a longer length prefix closes the connection"),
    Field("socket", "offload_bytes", "socket_offload_bytes", parse_size,
          "requests larger than this are decoded off the event loop"),
    Field("socket", "frame_timeout_s", "socket_frame_timeout_s", _positive_float,
          "seconds a started request may take to arrive in full before the connection is closed"),
    Field("socket", "idle_timeout_s", "socket_idle_timeout_s", _positive_float,
          "seconds a connection that holds no pool may stay silent before it is closed"),
    Field("socket", "max_connections", "socket_max_connections", _positive_int,
          "engine connections at once; at the limit the longest-idle one without a pool is closed"),
    Field("socket", "max_connections_per_uid", "socket_max_connections_per_uid", _positive_int,
          "engine connections one uid may hold at once (its longest-idle one without a pool makes room), "
          "so one user cannot take every slot of max_connections"),
    Field("socket", "max_pools_per_uid", "socket_max_pools_per_uid", _positive_int,
          "pools one uid may hold registered at once (each is a mapping of the daemon's, registered with "
          "the transfer engine); past it a registration is refused busy"),
    Field("socket", "engine_name_grace_s", "socket_engine_name_grace_s", _positive_float,
          "seconds an engine name stays its user's after its last rank disconnects (a restarting "
          "engine's name is not another user's to take meanwhile)"),
    Field("socket", "backlog", "socket_backlog", _positive_int,
          "listen backlog of the Unix socket (connects queued before kvd accepts them)"),
    Field("socket", "allow_uids", "socket_allow_uids", _id_list,
          "uids allowed to use the socket, comma-separated (empty = whoever may open it)"),
    Field("socket", "allow_gids", "socket_allow_gids", _id_list,
          "gids (primary or supplementary) allowed to use the socket (empty = whoever may open it)"),
    Field("peer", "port", "peer_port", _port,
          "ZMQ ROUTER port other daemons connect to (0 = pick a free port)"),
    Field("peer", "auth_token", "auth_token", _str,
          "shared secret peers must present (empty = no auth); prefer the file or env over a flag"),
    Field("peer", "insecure", "peer_insecure", _bool,
          "run without peer keys (no CurveZMQ): only on purpose, for demos and tests; shown in kvctl status"),
    Field("peer", "key_file", "peer_key_file", _str,
          "this daemon's CurveZMQ secret certificate (made by `kvd keygen`)"),
    Field("peer", "authorized_keys", "peer_authorized_keys", _str,
          "directory of peers' public certificates (*.key), each bound to the peer address it may speak as"),
    Field("peer", "max_message_bytes", "peer_max_message_bytes", parse_size,
          "largest peer message; ZMQ drops a peer that sends a longer one before buffering it"),
    Field("peer", "max_peers", "peer_max_peers", _positive_int,
          "peer daemons kept at once (one DEALER socket each); the longest-idle is reclaimed"),
    Field("peer", "idle_s", "peer_idle_s", _positive_float,
          "seconds after which a peer with no rooms and no traffic is forgotten (socket closed)"),
    Field("peer", "pool_idle_s", "peer_pool_idle_s", _positive_float,
          "seconds after which a decode pool a peer announced, which no room here uses, is forgotten "
          "(the peer is told, and announces it again before its next room)"),
    Field("peer", "max_pools", "peer_max_pools", _positive_int,
          "decode pools one peer may have announced here at once (past it the longest unused one no "
          "room uses is forgotten; none: the announce is refused)"),
    Field("pools", "gpu", "pools_gpu", _bool,
          "engines register GPU (CUDA IPC) pools: import torch at start-up, never on the loop"),
    Field("transport", "protocol", "protocol", _choice("tcp", "rdma"),
          "Mooncake transport: 'tcp' or 'rdma'"),
    Field("transport", "devices", "devices", _devices,
          "RDMA devices, e.g. 'mlx5_0,mlx5_1' (empty = auto-detect)"),
    Field("transport", "same_node", "same_node", _choice("cuda_ipc", "off"),
          "peers on this machine: 'cuda_ipc' (GPU copies between IPC-opened memory) or 'off' (network)"),
    Field("transport", "one_pass", "one_pass", _bool,
          "same node, GPU pools, different TP: write each head slice straight into the decode pool "
          "(one copy kernel) instead of staging (gather, copy, scatter)"),
    Field("transport", "launch", "copy_launch", _choice("loop", "worker"),
          "same-node copies: 'loop' (launched by the event loop, a thread only waits for the device) "
          "or 'worker' (a copy thread launches and waits)"),
    Field("transfer", "workers", "workers", _positive_int,
          "threads issuing Mooncake writes"),
    Field("transfer", "queues", "queues", _positive_int,
          "dispatch queues, so one slow peer does not block the others"),
    Field("transfer", "max_batch_ops", "max_batch_ops", _positive_int,
          "most write ops in one Mooncake batch"),
    Field("transfer", "inline_max_bytes", "inline_max_bytes", _size_zero_or_auto,
          "host-to-host writes of a room up to this size ride in the peer message, not Mooncake "
          "(0 = off; auto = 1MiB over tcp, 64KiB over rdma)"),
    Field("timeouts", "bootstrap_s", "bootstrap_timeout_s", _positive_float,
          "seconds a room may spend bootstrapping (peer handshake)"),
    Field("timeouts", "waiting_s", "waiting_timeout_s", _positive_float,
          "seconds a room may wait for its input (prefill output or the receiver's pages)"),
    Field("timeouts", "transfer_s", "transfer_timeout_s", _positive_float,
          "seconds a room's transfer may take once started"),
    Field("timeouts", "room_s", "room_timeout_s", _positive_float,
          "seconds a room may live in all, whatever progress it reports"),
    Field("timeouts", "heartbeat_interval_s", "heartbeat_interval_s", _positive_float,
          "seconds between heartbeats to each peer"),
    Field("timeouts", "heartbeat_misses", "heartbeat_misses", _positive_int,
          "missed heartbeats after which a peer is dead and its rooms fail"),
    Field("timeouts", "abort_fence_s", "abort_fence_s", _positive_float,
          "seconds to wait for in-flight writes after an abort before a room's pages are released"),
    Field("staging", "enabled", "staging_enabled", _bool,
          "use the GPU staging buffer (bulk writes) for heterogeneous TP"),
    Field("staging", "pool_bytes", "staging_pool_bytes", parse_size,
          "size of the receive staging pool (int bytes or '4GiB', '64MiB')"),
    Field("staging", "chunk_tokens", "staging_chunk_tokens", _positive_int,
          "most tokens per staged chunk (a room larger than one chunk goes chunk by chunk)"),
    Field("staging", "chunk_bytes", "staging_chunk_bytes", parse_size,
          "most bytes per staged chunk region (all writers of the chunk together)"),
    Field("staging", "prefetch_chunks", "staging_prefetch_chunks", _positive_int,
          "chunk regions a room may hold at once (reserved ahead of the writes)"),
    Field("staging", "ungathered_max_runs", "staging_ungathered_max_runs", _run_count,
          "a host-memory sender whose head slice is its whole row (TP N -> smaller) writes a chunk "
          "whose tokens lie in at most this many runs straight from its pool, one op per run per "
          "buffer, with no gather (0 = always gather; GPU pools always gather)"),
    Field("staging", "kernel_threads", "staging_kernel_threads", _positive_int,
          "threads that run gather/scatter kernels (CPU reference, or CUDA stream waits)"),
    Field("staging", "same_tp_run_bytes", "staging_same_tp_run_bytes", _size_or_zero,
          "stage a same-TP room whose receiver pages fall into 16+ runs averaging under this many "
          "bytes per buffer (one transport op per run otherwise; 0 = never, the default; never over RDMA)"),
    Field("staging", "same_tp_min_bytes", "staging_same_tp_min_bytes", parse_size,
          "... and only a room of at least this many bytes per buffer (short rooms keep their latency)"),
    Field("metrics", "address", "metrics_address", _address,
          "'host:port' to serve Prometheus /metrics on (empty = off)"),
    Field("log", "format", "log_format", _choice("auto", "console", "json"),
          "'auto' (console on a TTY, JSON otherwise), 'console' or 'json'"),
    Field("log", "level", "log_level", _log_level,
          "'debug', 'info', 'warning', 'error' or 'critical'"),
    Field("log", "profile", "log_profile", _str,
          "a file: the event loop's thread runs under cProfile, stats written there at exit ('' = off)"),
)  # fmt: skip

_BY_ATTR = {f.attr: f for f in FIELDS}
_BY_DOTTED = {f.dotted: f for f in FIELDS}
_BY_ENV = {f.env: f for f in FIELDS}
_SECTIONS = {f.section: {g.key for g in FIELDS if g.section == f.section} for f in FIELDS}


@dataclass(frozen=True)
class Config:
    """All of kvd's settings, validated; see ``FIELDS`` (or conf/kvd.toml) for what each one does."""

    hostname: str = "127.0.0.1"
    socket_path: str = "/run/kvd/kvd.sock"
    socket_mode: int = 0o660
    socket_group: str = ""
    socket_max_frame_bytes: int = 64 << 20
    socket_offload_bytes: int = 1 << 20
    socket_frame_timeout_s: float = 10.0
    socket_idle_timeout_s: float = 300.0
    socket_max_connections: int = 1024
    socket_max_connections_per_uid: int = 256
    socket_max_pools_per_uid: int = 1024
    socket_engine_name_grace_s: float = 300.0
    socket_backlog: int = 1024
    socket_allow_uids: str = ""
    socket_allow_gids: str = ""
    peer_port: int = 17500
    auth_token: str = ""
    peer_insecure: bool = False
    peer_key_file: str = "/etc/kvd/keys/kvd.key_secret"
    peer_authorized_keys: str = "/etc/kvd/authorized_keys"
    peer_max_message_bytes: int = 64 << 20
    peer_max_peers: int = 256
    peer_idle_s: float = 300.0
    peer_pool_idle_s: float = 600.0
    peer_max_pools: int = 1024
    pools_gpu: bool = False
    protocol: str = "tcp"
    devices: str = ""
    same_node: str = "cuda_ipc"
    one_pass: bool = True
    copy_launch: str = "loop"
    workers: int = 4
    queues: int = 4
    max_batch_ops: int = 1024
    inline_max_bytes: int = AUTO  # "auto" in files and flags
    bootstrap_timeout_s: float = 30.0
    waiting_timeout_s: float = 300.0
    transfer_timeout_s: float = 120.0
    room_timeout_s: float = 900.0
    heartbeat_interval_s: float = 2.0
    heartbeat_misses: int = 3
    abort_fence_s: float = 10.0
    staging_enabled: bool = False
    staging_pool_bytes: int = 4 << 30
    staging_chunk_tokens: int = 8192
    staging_chunk_bytes: int = 64 << 20
    staging_prefetch_chunks: int = 2
    staging_ungathered_max_runs: int = 4
    staging_kernel_threads: int = 2
    staging_same_tp_run_bytes: int = 0
    staging_same_tp_min_bytes: int = 1 << 20
    metrics_address: str = ""
    log_format: str = "auto"
    log_level: str = "info"
    log_profile: str = ""

    def __post_init__(self) -> None:
        # Validated in the constructor, so a Config built in code is as safe as a loaded one.
        errors = []
        for f in FIELDS:
            try:
                object.__setattr__(self, f.attr, f.parse(getattr(self, f.attr)))
            except ValueError as exc:
                errors.append(f"Config.{f.attr}: {exc}")
        if not errors and self.inline_limit > self.peer_max_message_bytes // 2:
            # Inline bytes ride in a peer message, which must stay under the peer's size cap.
            errors.append(f"Config.inline_max_bytes: {self.inline_limit} is more than half of "
                          f"peer.max_message_bytes ({self.peer_max_message_bytes})")
        if errors:
            raise ConfigError(errors)

    @property
    def heartbeat_timeout_s(self) -> float:
        """Silence after which a peer is declared dead."""
        return self.heartbeat_interval_s * self.heartbeat_misses

    @property
    def inline_limit(self) -> int:
        """Bytes of a room to one receiver that go inline (kvd.core.inline); 0: never.

        auto: 1 MiB over TCP, where one Mooncake op costs ~60 us of CPU and a scattered page is
        one op each (tools/soak_mixed.py: 2-3x the rooms/s of 64 KiB once pages fragment);
        64 KiB over RDMA, where an op is cheap and zero-copy (not measured here: no NIC)."""
        if self.inline_max_bytes == AUTO:  # and well under the peer message cap
            return min((1 << 20) if self.protocol == "tcp" else (64 << 10), self.peer_max_message_bytes // 4)
        return self.inline_max_bytes

    @property
    def device_list(self) -> list[str]:
        """``devices`` split into names; empty = let Mooncake pick."""
        return self.devices.split(",") if self.devices else []

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``kvctl status`` and the start-up log; the auth token is redacted."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["socket_mode"] = f"0{self.socket_mode:o}"
        if self.inline_max_bytes == AUTO:
            out["inline_max_bytes"] = "auto"  # read back as such; the limit is inline_limit
        out["auth_token"] = "<redacted>" if self.auth_token else ""
        return out

    def __repr__(self) -> str:
        # The default repr would put the shared secret into tracebacks and logs.
        shown = {**self.to_dict(), "socket_mode": _OctalRepr(self.socket_mode)}
        body = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"Config({body})"


class _OctalRepr(int):
    """An int that reprs as ``0o660``, for file modes in ``Config.__repr__``."""

    def __repr__(self) -> str:
        return oct(self)


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_file(path: str) -> dict[str, tuple[object, str]]:
    """Raw values from the TOML file, keyed by attribute, each with its source label."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    raw: dict[str, tuple[object, str]] = {}
    errors: list[str] = []
    for section, table in doc.items():
        if section not in _SECTIONS:
            errors.append(f"{path}: unknown section [{section}]{_suggest(section, sorted(_SECTIONS))}")
            continue
        if not isinstance(table, dict):
            errors.append(f"{path}: {section} must be a [{section}] table, got {_show(table)}")
            continue
        for key, value in table.items():
            field = _BY_DOTTED.get(f"{section}.{key}")
            if field is None:
                hint = _suggest(key, sorted(_SECTIONS[section]))
                errors.append(f"{path}: unknown key {section}.{key}{hint}")
                continue
            raw[field.attr] = (value, f"{path}: {field.dotted}")
    if errors:
        raise ConfigError(errors)
    return raw


def _read_env(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    raw: dict[str, tuple[object, str]] = {}
    errors: list[str] = []
    for name, value in env.items():
        if not name.startswith(_ENV_PREFIX) or name == CONFIG_ENV:
            continue
        field = _BY_ENV.get(name)
        if field is None:
            errors.append(f"{name}: unknown kvd environment variable{_suggest(name, sorted(_BY_ENV))}")
            continue
        raw[field.attr] = (value, name)
    if errors:
        raise ConfigError(errors)
    return raw


def _read_overrides(overrides: Mapping[str, object]) -> dict[str, tuple[object, str]]:
    raw: dict[str, tuple[object, str]] = {}
    for name, value in overrides.items():
        field = _BY_ATTR.get(name) or _BY_DOTTED.get(name)
        if field is None:
            raise ConfigError(f"unknown config override {name!r}{_suggest(name, sorted(_BY_ATTR))}")
        raw[field.attr] = (value, field.flag)
    return raw


def load_config(
    path: str | None,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build the ``Config``: defaults < TOML file < ``KVD_*`` env < ``overrides`` (flags).

    ``path`` None falls back to ``$KVD_CONFIG``; neither means no file. ``overrides`` is
    keyed by attribute (``"waiting_timeout_s"``) or ``"section.key"``, as
    ``overrides_from_args`` returns it. Raises ``ConfigError`` listing every bad value.
    """
    if path is None:
        path = env.get(CONFIG_ENV) or None
    raw: dict[str, tuple[object, str]] = {}
    if path is not None:
        raw.update(_read_file(path))
    raw.update(_read_env(env))
    raw.update(_read_overrides(overrides or {}))
    values: dict[str, Any] = {}
    errors: list[str] = []
    for attr, (value, source) in raw.items():
        try:
            values[attr] = _BY_ATTR[attr].parse(value)
        except ValueError as exc:
            errors.append(f"{source}: {exc}")
    if errors:
        raise ConfigError(errors)
    return Config(**values)


def add_config_flags(parser: argparse.ArgumentParser, *, config_flag: bool = True) -> None:
    """Add ``--config PATH`` (unless ``config_flag`` is False) and one ``--section-key`` flag per field.

    The flags default to "not given" so that they override only what the operator typed;
    values stay strings here and are validated by ``load_config``, whose errors name the flag.
    """
    group = parser.add_argument_group("configuration (overrides the file and KVD_* env vars)")
    if config_flag:
        group.add_argument(
            "--config",
            metavar="PATH",
            default=None,
            help=f"TOML config file (default: ${CONFIG_ENV}, else built-in defaults)",
        )
    for f in FIELDS:
        dest = _FLAG_DEST_PREFIX + f.attr
        if f.parse is _bool:
            group.add_argument(
                f.flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{f.help} [{f.dotted}]",
            )
        else:
            group.add_argument(
                f.flag, dest=dest, metavar=f.key.upper(), default=None, help=f"{f.help} [{f.dotted}]"
            )


def overrides_from_args(ns: argparse.Namespace) -> dict[str, object]:
    """The config flags the operator actually gave, keyed by ``Config`` attribute."""
    out: dict[str, object] = {}
    for f in FIELDS:
        value = getattr(ns, _FLAG_DEST_PREFIX + f.attr, None)
        if value is not None:
            out[f.attr] = value
    return out

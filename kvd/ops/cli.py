"""``kvd``: run the daemon (config from --config / $KVD_CONFIG, KVD_* env and flags);
``kvd keygen``: create this daemon's CurveZMQ keypair for the peer channel."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from kvd.core.config import ConfigError, add_config_flags, load_config, overrides_from_args
from kvd.obs.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvd", description="KV-cache transfer daemon: moves KV cache from prefill to decode engines.")
    add_config_flags(parser)
    return parser


def keygen_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvd keygen", description="Create this daemon's CurveZMQ keypair: <dir>/<name>.key (public: copy "
        "it into every peer's peer.authorized_keys directory) and <dir>/<name>.key_secret (peer.key_file, 0600).")
    parser.add_argument("--config", default=None,
                        help="kvd's config file: the defaults of --dir, --name (peer.key_file) and --address "
                             "(tcp://<node.hostname>:<peer.port>) come from it ($KVD_CONFIG and KVD_* apply)")
    parser.add_argument("--dir", default=None, help="where to write the pair (default: peer.key_file's directory)")
    parser.add_argument("--address", default=None,
                        help="this daemon's peer address tcp://<node.hostname>:<peer.port>, written into the "
                             "public key: peers let the key speak only as this address")
    parser.add_argument("--name", default=None, help="file name stem (default: peer.key_file's, i.e. kvd)")
    parser.add_argument("--force", action="store_true", help="replace an existing pair")
    parser.add_argument("--if-missing", action="store_true", help="do nothing (exit 0) when the pair exists")
    parser.add_argument("--owner", default="", help="chown the pair to this user (e.g. kvd)")
    return parser


def keygen_main(argv: list[str]) -> int:
    from kvd.shell.peer_auth import keygen
    from kvd.shell.peer_hub import PeerAddressError, check_peer_address

    args = keygen_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except (ConfigError, OSError) as exc:
        print(f"kvd keygen: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    key_file = config.peer_key_file
    args.dir = args.dir or os.path.dirname(key_file) or "."
    args.name = args.name or os.path.basename(key_file).removesuffix(".key_secret") or "kvd"
    args.address = args.address or f"tcp://{config.hostname}:{config.peer_port}"
    try:
        check_peer_address(args.address)
    except PeerAddressError as exc:
        print(f"kvd keygen: --address: {exc}", file=sys.stderr)
        return 2
    try:
        public, secret = keygen(args.dir, args.address, args.name, force=args.force)
    except FileExistsError as exc:
        if args.if_missing:
            return 0
        print(f"kvd keygen: {exc}", file=sys.stderr)
        return 1
    if args.owner:
        import shutil

        for path in (public, secret):
            shutil.chown(path, args.owner, args.owner)
    print(f"public key (copy into every peer's authorized_keys directory): {public}\n"
          f"secret key (peer.key_file; keep it 0600): {secret}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, overrides=overrides_from_args(args))
    except (ConfigError, OSError) as exc:
        print(f"kvd: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, config.log_level)
    from kvd.shell.daemon import Daemon  # after logging is set up: imports log at import time

    run: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; keep running without it
        run = asyncio.run
    else:
        run = uvloop.run
    from kvd.shell.peer_auth import TrustError

    daemon = Daemon(config)
    # log.profile: the event loop's thread under cProfile, stats written there at exit (where a
    # room's time goes on a machine with no py-spy: tools/gpu_e2e.py --profile).
    profile_path = config.log_profile
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        run(daemon.serve())
    except (OSError, TrustError) as exc:
        print(f"kvd: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

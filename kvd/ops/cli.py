"""``kvd``: run the daemon (config from --config / $KVD_CONFIG, KVD_* env and flags)."""

from __future__ import annotations

import argparse
import asyncio
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


def main(argv: list[str] | None = None) -> int:
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
    daemon = Daemon(config)
    try:
        run(daemon.serve())
    except OSError as exc:
        print(f"kvd: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

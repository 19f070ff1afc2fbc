"""Compatibility path: ``kvd.engine_api`` is ``kvd.shell.engine_server`` (the module itself, private names included)."""

import sys

import kvd.shell.engine_server as _module

sys.modules[__name__] = _module

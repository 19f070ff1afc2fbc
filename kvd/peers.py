"""Compatibility path: ``kvd.peers`` is ``kvd.shell.peer_hub`` (the module itself, private names included)."""

import sys

import kvd.shell.peer_hub as _module

sys.modules[__name__] = _module

"""Compatibility path: ``kvd.memory`` is ``kvd.mem.memory`` (the module itself, private names included)."""

import sys

import kvd.mem.memory as _module

sys.modules[__name__] = _module

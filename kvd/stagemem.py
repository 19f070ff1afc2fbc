"""Compatibility path: ``kvd.stagemem`` is ``kvd.mem.stagemem`` (the module itself, private names included)."""

import sys

import kvd.mem.stagemem as _module

sys.modules[__name__] = _module

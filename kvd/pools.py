"""Compatibility path: ``kvd.pools`` is ``kvd.mem.pools`` (the module itself, private names included)."""

import sys

import kvd.mem.pools as _module

sys.modules[__name__] = _module

"""Compatibility path: ``kvd.rooms`` is ``kvd.core.rooms`` (the module itself, private names included)."""

import sys

import kvd.core.rooms as _module

sys.modules[__name__] = _module

"""Compatibility path: ``kvd.sender`` is ``kvd.sides.sender`` (the module itself, private names included)."""

import sys

import kvd.sides.sender as _module

sys.modules[__name__] = _module

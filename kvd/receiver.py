"""Compatibility path: ``kvd.receiver`` is ``kvd.sides.receiver`` (the module itself, private names included)."""

import sys

import kvd.sides.receiver as _module

sys.modules[__name__] = _module

"""Compatibility path: ``kvd.ring`` is ``kvd.core.ring`` (the module itself, private names included)."""

import sys

import kvd.core.ring as _module

sys.modules[__name__] = _module

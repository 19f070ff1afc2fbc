"""Compatibility path: ``kvd.protocol`` is ``kvd.wire.protocol`` (the module itself, private names included)."""

import sys

import kvd.wire.protocol as _module

sys.modules[__name__] = _module

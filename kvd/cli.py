"""Compatibility path: ``kvd.cli`` is ``kvd.ops.cli`` (the module itself, private names included)."""

import sys

import kvd.ops.cli as _module

sys.modules[__name__] = _module

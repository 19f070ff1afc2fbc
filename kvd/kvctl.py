"""Compatibility path: ``kvd.kvctl`` is ``kvd.ops.kvctl`` (the module itself, private names included)."""

import sys

import kvd.ops.kvctl as _module

sys.modules[__name__] = _module

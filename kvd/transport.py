"""Compatibility path: ``kvd.transport`` is ``kvd.transfer.mooncake`` (the module itself, private names included)."""

import sys

import kvd.transfer.mooncake as _module

sys.modules[__name__] = _module

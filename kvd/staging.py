"""Compatibility path: ``kvd.staging`` is ``kvd.core.staging`` (the module itself, private names included)."""

import sys

import kvd.core.staging as _module

sys.modules[__name__] = _module

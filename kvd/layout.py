"""Compatibility path: ``kvd.layout`` is ``kvd.core.layout`` (the module itself, private names included)."""

import sys

import kvd.core.layout as _module

sys.modules[__name__] = _module

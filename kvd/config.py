"""Compatibility path: ``kvd.config`` is ``kvd.core.config`` (the module itself, private names included)."""

import sys

import kvd.core.config as _module

sys.modules[__name__] = _module

"""Compatibility path: ``kvd.metrics`` is ``kvd.obs.metrics`` (the module itself, private names included)."""

import sys

import kvd.obs.metrics as _module

sys.modules[__name__] = _module

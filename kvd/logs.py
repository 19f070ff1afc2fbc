"""Compatibility path: ``kvd.logs`` is ``kvd.obs.logs`` (the module itself, private names included)."""

import sys

import kvd.obs.logs as _module

sys.modules[__name__] = _module

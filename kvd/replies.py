"""Compatibility path: ``kvd.replies`` is ``kvd.engineclient.replies`` (the module itself, private names included)."""

import sys

import kvd.engineclient.replies as _module

sys.modules[__name__] = _module

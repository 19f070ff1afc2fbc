"""Compatibility path: ``kvd.client`` is ``kvd.engineclient.client`` (the module itself, private names included)."""

import sys

import kvd.engineclient.client as _module

sys.modules[__name__] = _module

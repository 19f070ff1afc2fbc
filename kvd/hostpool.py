"""Compatibility path: ``kvd.hostpool`` is ``kvd.engineclient.hostpool`` (the module itself, private names included)."""

import sys

import kvd.engineclient.hostpool as _module

sys.modules[__name__] = _module

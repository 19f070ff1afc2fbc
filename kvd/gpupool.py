"""Compatibility path: ``kvd.gpupool`` is ``kvd.engineclient.gpupool`` (the module itself, private names included)."""

import sys

import kvd.engineclient.gpupool as _module

sys.modules[__name__] = _module

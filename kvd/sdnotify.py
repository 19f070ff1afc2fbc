"""Compatibility path: ``kvd.sdnotify`` is ``kvd.obs.sdnotify`` (the module itself, private names included)."""

import sys

import kvd.obs.sdnotify as _module

sys.modules[__name__] = _module

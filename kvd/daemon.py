"""Compatibility path: ``kvd.daemon`` is ``kvd.shell.daemon`` (the module itself, private names included)."""

import sys

import kvd.shell.daemon as _module

sys.modules[__name__] = _module

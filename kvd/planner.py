"""Compatibility path: ``kvd.planner`` is ``kvd.core.planner`` (the module itself, private names included)."""

import sys

import kvd.core.planner as _module

sys.modules[__name__] = _module

"""Compatibility path: ``kvd.cli`` is ``kvd.ops.cli`` (the module itself, private names included);
``python -m kvd.cli`` still runs it."""

import sys

import kvd.ops.cli as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module

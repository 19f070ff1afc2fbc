"""Compatibility path: ``kvd.kvctl`` is ``kvd.ops.kvctl`` (the module itself, private names included);
``python -m kvd.kvctl`` still runs it."""

import sys

import kvd.ops.kvctl as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module

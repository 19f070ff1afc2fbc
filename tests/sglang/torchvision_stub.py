"""A stand-in for ``torchvision`` in CPU test processes only.

SGLang's disaggregation modules import ``sglang.srt.configs``, which imports multimodal helpers
that ``import torchvision`` at module level. No torchvision wheel matches the CPU build of torch
2.13.0 that kvd pins (PyPI's 0.28.0 links libtorch_cuda and fails with
"operator torchvision::nms does not exist"). Nothing on the KV-transfer path calls torchvision,
so when the real one cannot be imported, tests install this stub: every ``torchvision.*``
module resolves, and every attribute is an inert placeholder class. A GPU install of SGLang has a
real torchvision and never sees this.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any


class _Inert(type):
    """Metaclass of placeholders: any attribute of a placeholder is another placeholder."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(name, (), {"__module__": cls.__module__})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = _Inert(name, (), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        mod = _StubModule(spec.name)
        mod.__path__ = []
        mod.__version__ = "0.0.0+kvd.stub"
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> bool:
    """Use the real torchvision if it imports; else the stub. Returns True if the stub is in."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:  # ImportError, or RuntimeError from a CUDA-only build
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _Finder())
    return True

"""Make the PyTorch reference stack importable in tests and benchmarks.

PyPI's torchvision wheels do not load against the CPU build of torch 2.13.0 that the dev requirements pin
("operator torchvision::nms does not exist"), yet `open_clip_torch` depends on torchvision and transformers
imports it whenever it is installed, so `transformers.CLIPModel` and `open_clip` would both fail to import.
Neither CLIP forward pass uses torchvision, so when the real package cannot load we serve an inert stub
module tree for `torchvision.*`. The parity references themselves (transformers' CLIPModel, open_clip's
tokenizer and model) are the real libraries.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from unittest import mock


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__spec__ = spec
        module.__path__ = []
        module.__version__ = "0.0+stub"
        return module

    def exec_module(self, module):
        pass


def ensure_torch_reference_stack() -> bool:
    """Returns True if torchvision is the real one, False if a stub had to be installed."""
    if "torchvision" in sys.modules and not isinstance(sys.modules["torchvision"], types.ModuleType):
        return False  # already stubbed (a MagicMock)
    try:
        import torchvision  # noqa: F401

        return True
    except Exception:  # broken wheel: see module docstring
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())
        return False

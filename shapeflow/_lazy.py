"""A module proxy that imports on first attribute access.

Stage modules write ``from shapeflow._lazy import torch`` and use ``torch.where(...)`` as
usual; importing the stage module (as ``shapeflow check`` does, to read declarations) costs
nothing, and the first tensor operation imports torch.
"""

from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__dict__["_lazy_target"])
        self.__dict__.update(module.__dict__)  # later lookups are plain attribute reads
        return getattr(module, attr)


torch = LazyModule("torch")

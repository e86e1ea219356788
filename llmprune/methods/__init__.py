"""Pruning methods by name. A method is one class, in its own file in this folder, with:

- ``name``: what ``--method`` and recipes call it; ``order``: its place in listings and tables;
- ``needs_calibration``: whether it reads calibration statistics;
- ``statistics``: what its accumulators hold, for the memory estimate before loading
  ("none", "norms": a float32 vector per input group, "hessian": a float64 [in, in] matrix);
- ``options``: its own settings as ``llmprune.options.Option`` (e.g. SparseGPT's blocksize);
  the flags, recipe keys, sweep pass-through and checks are derived from them;
- ``new_statistics(in_features, device)``: an accumulator with ``add_batch(inputs)`` fed with
  the inputs of one group of linear layers that read the same tensor (or None);
- ``prune_group(weights, statistics, sparsity, pattern, name=...)``: float32 [out_i, in]
  matrices in, pruned matrices out (pure tensor math).

Adding a method is adding one file: every module here is imported and each class with a
``prune_group`` and a ``name`` is registered. The modules import torch inside their functions,
so that the command line can list and check the methods' options before torch is loaded.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from ..errors import UsageError
from .masks import NMPattern, parse_pattern


def _discover() -> dict:
    found = []
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and hasattr(cls, "prune_group") and isinstance(
                    getattr(cls, "name", None), str):
                found.append(cls)
    return {cls.name: cls for cls in sorted(found, key=lambda cls: (getattr(cls, "order", 100), cls.name))}


METHODS = _discover()


def method_options(name: str) -> tuple:
    """The declared options of method ``name`` (empty when it has none)."""
    return tuple(getattr(METHODS[name], "options", ()))


def make_method(name: str, **options):
    """Instantiate a method by name with its own options (e.g. blocksize for sparsegpt)."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name](**options)


__all__ = ["METHODS", "NMPattern", "make_method", "method_options", "parse_pattern"]

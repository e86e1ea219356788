"""Pruning methods by name. A method is one class with three things:

- ``needs_calibration``: whether it reads calibration statistics;
- ``new_statistics(in_features, device)``: an accumulator with ``add_batch(inputs)`` fed with
  the inputs of one group of linear layers that read the same tensor (or None);
- ``prune_group(weights, statistics, sparsity, pattern, name=...)``: float32 [out_i, in]
  matrices in, pruned matrices out (pure tensor math).

Adding a method is one file plus one line in METHODS.
"""

from __future__ import annotations

from ..errors import UsageError
from .magnitude import Magnitude
from .masks import NMPattern, parse_pattern
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}


def make_method(name: str, **options):
    """Instantiate a method by name with its own options (e.g. blocksize for sparsegpt)."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name](**options)


__all__ = ["METHODS", "NMPattern", "make_method", "parse_pattern"]

"""llmprune: post-training pruning of Hugging Face causal language models, with measurements.

The entry points are imported on first use (``llmprune.prune`` loads torch then), so that the
command line can check its arguments before any heavy module is loaded.
"""

from .errors import NumericalError, UsageError
from .models.registration import register_on_first_use as _register_uneven_models

# llmprune's uneven-layer model types join transformers' Auto classes when those are first imported.
_register_uneven_models()

__version__ = "0.1.0"
__all__ = ["NumericalError", "PruneReport", "StructuredReport", "UsageError", "load_sparse", "prune",
           "prune_structured", "__version__"]

_LAZY = {"PruneReport": "api", "prune": "api", "StructuredReport": "structured", "prune_structured": "structured",
         "load_sparse": "sparse_format"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

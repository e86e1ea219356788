"""llmprune: post-training pruning of Hugging Face causal language models, with measurements."""

from .api import PruneReport, prune
from .errors import NumericalError, UsageError
from .models.registration import register_on_first_use as _register_uneven_models
from .structured import StructuredReport, prune_structured

_register_uneven_models()

__version__ = "0.1.0"
__all__ = ["NumericalError", "PruneReport", "StructuredReport", "UsageError", "prune", "prune_structured",
           "__version__"]

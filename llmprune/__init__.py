"""llmprune: post-training pruning of Hugging Face causal language models, with measurements."""

from .api import PruneReport, prune
from .errors import NumericalError, UsageError

__version__ = "0.1.0"
__all__ = ["NumericalError", "PruneReport", "UsageError", "prune", "__version__"]

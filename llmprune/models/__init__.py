"""Model loading and architecture adapters.

Importing this package registers llmprune's own model types (per-layer-uneven structured results)
with the transformers Auto classes, so that ``from_pretrained`` loads such folders.
"""

from .modeling_llmprune import register as _register_uneven_models

_register_uneven_models()

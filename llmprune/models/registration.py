"""Registering llmprune's uneven-layer classes with transformers' Auto classes, without importing
any family's modelling code at ``import llmprune``.

Registration needs the families' classes, which import their modelling code (seconds). It is put
off until transformers' Auto model mapping is imported: then nothing can be loaded through the
Auto classes yet, and the classes are registered right after that module has run.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

AUTO_MODULE = "transformers.models.auto.modeling_auto"


def register_all() -> None:
    from .adapters import ADAPTERS
    from .modeling_llmprune import register

    register(sorted(ADAPTERS))


class _AfterAutoImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of the Auto mapping module to register after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != AUTO_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register_all()

        spec.loader.exec_module = exec_module
        return spec


def register_on_first_use() -> None:
    """Register now if the Auto mapping is already imported, else right after it is."""
    if AUTO_MODULE in sys.modules:
        register_all()
    elif not any(isinstance(finder, _AfterAutoImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterAutoImport())

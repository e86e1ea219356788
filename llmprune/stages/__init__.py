"""Stages: what a run does to the loaded model, in order. One class per kind, one file each here.

A stage declares its options (``llmprune.options.Option``), the method names that select it, where
it can run (``placements``: memory, offload, stream; ``processes``: whether several processes can
share its calibration; ``resumes``: whether ``--checkpoint-dir`` applies), and implements:

- ``check()``: everything that can be refused without the model (called for every stage first);
- ``check_model(model)``: what needs the model's config, still before any work;
- ``apply(run, checkpoint)`` -> ``StageResult``: the work, on ``run.model`` (a ``job.Loaded``);
- ``summary_rows(result)``: its lines of the summary.

A new stage (e.g. recovery by distillation, a sparse export) is one new file here: every module
in this folder is imported and each ``Stage`` subclass with a ``kind`` is registered.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..errors import UsageError
from ..options import check_values


@dataclass
class StageResult:
    """What one stage did: its report (JSON-able), and what the run does with the result."""

    report: dict
    seconds: float
    model: object = None              # a model to measure instead of the loaded one (a wrapper)
    extra_files: Callable | None = None  # writes more files into the output folder: f(folder)
    storage: str = ""                 # how its result is stored, for llmprune.json


class Stage:
    kind: ClassVar[str] = ""
    order: ClassVar[int] = 100        # recipes run stages in increasing order
    options: ClassVar[tuple] = ()
    placements: ClassVar[tuple] = ("memory", "offload")
    processes: ClassVar[bool] = True
    resumes: ClassVar[bool] = True
    measures_speed: ClassVar[bool] = False  # speed before/after by default (--no-speed turns it off)
    speed_new_tokens: ClassVar[int] = 64

    def __init__(self, method: str, values: dict, given: frozenset = frozenset()):
        self.method = method
        self.values = values      # every option of the stage, checked (defaults filled in)
        self.given = given        # the options given explicitly (recipe keys, flags)

    @classmethod
    def methods(cls) -> tuple:
        return (cls.kind,)

    @classmethod
    def all_options(cls) -> tuple:
        """The options any of this stage's methods can take (for flags and recipe keys)."""
        return cls.options

    @classmethod
    def build(cls, method: str, values: dict) -> Stage:
        """A checked stage from given values (missing ones take their defaults)."""
        stage = cls(method, check_values(cls.all_options(), values), frozenset(values))
        stage.check()
        return stage

    def check(self) -> None:
        pass

    def check_model(self, model) -> None:
        pass

    def needs_data(self) -> bool:
        return True

    def leaves_zeros(self) -> bool:
        """Whether the model this stage hands on has zeros worth a sparse checkpoint."""
        return False

    def estimate_memory(self, spec, prepared: dict, estimate):
        """A stage with a peak of its own (training) estimates it before loading, refuses what does
        not fit (unless --force) and returns the larger estimate; others return ``estimate``."""
        return estimate

    def memory_method(self) -> str:
        """The statistics this stage keeps, as llmprune.memory.estimate_peak names them."""
        return self.method

    def tag(self) -> str:
        """Its part of the default output folder's name."""
        return self.method

    def recipe_options(self) -> dict:
        """Its options as a recipe stage lists them (those given)."""
        return {k: v for k, v in self.values.items() if k in self.given}

    def open_checkpoint(self, folder, run, identity: dict):
        raise UsageError(f"--checkpoint-dir is not supported by --method {self.method}")

    def apply(self, run, checkpoint=None) -> StageResult:
        raise NotImplementedError

    def before_measure(self, model) -> None:
        """Called before the pruned model is measured (e.g. to reset run-time counters)."""

    def after_measure(self, model, perplexity: dict | None, speed: dict | None) -> None:
        """Called after the pruned model is measured, to add what only this stage knows."""

    def summary_rows(self, result: StageResult) -> list[tuple[str, str]]:
        return [("method", self.method)]


def _discover() -> dict:
    for module_info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module_info.name}")
    found = [cls for cls in _subclasses(Stage) if cls.kind]
    return {cls.kind: cls for cls in sorted(found, key=lambda cls: cls.order)}


def _subclasses(cls) -> list:
    return [sub for direct in cls.__subclasses__() for sub in [direct, *_subclasses(direct)]]


STAGES = _discover()


def stage_class(method) -> type[Stage] | None:
    """The stage kind that method name selects, or None."""
    return next((cls for cls in STAGES.values() if method in cls.methods()), None)


def all_methods() -> list[str]:
    return [m for cls in STAGES.values() for m in cls.methods()]


def stage_for(method: str, values: dict) -> Stage:
    cls = stage_class(method)
    if cls is None:
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(all_methods())}")
    return cls.build(method, values)

"""YAML recipes: a complete, rerunnable experiment in one file.

    python -m llmprune --recipe recipes/wanda-50.yaml [flags that override recipe fields]

A recipe's top-level keys are the pruning command's flags under their argparse names (``model``,
``calib_data``, ``nsamples``, ``eval_data``, ``output``, ``device``, ...; any flag that a newer
version adds is a field too), plus ``name``, ``description`` and ``stages``: an ordered list of
stages, each a mapping with ``method`` and that method's options:

    stages:
      - {method: structured, ffn: 0.25, score: wanda}            # structured: heads/ffn/layers...
      - {method: wanda, sparsity: 0.5, schedule: owl}            # unstructured: magnitude/wanda/sparsegpt
      - {method: dynamic, early_exit: true}                      # dynamic (llmprune.dynamic)

Stages run in the order structured -> unstructured -> dynamic, at most one of each. The schema is
checked before any work; the first problem is one error line naming the file and the key. A flag
given on the command line replaces the recipe field of the same name (``--sparsity 0.6`` the
unstructured stage's sparsity, ``--method sparsegpt`` the unstructured stage's method).

What a recipe may not hold: ``overwrite`` and ``trust_remote_code`` (replacing a folder, running a
model's own Python: decisions of the person at the command line, who passes ``--overwrite`` or
``--trust-remote-code`` there, with or without ``--recipe``); YAML aliases (``*name``: a recipe has
no use for them, and nested ones expand a few hundred bytes into billions of values); more than
``MAX_RECIPE_BYTES``. Values quoted in error messages are shortened.
"""

from __future__ import annotations

import argparse
import copy
import numbers
import reprlib
from pathlib import Path

from .errors import UsageError

KINDS = ("structured", "unstructured", "dynamic")
UNSTRUCTURED_METHODS = ("magnitude", "wanda", "sparsegpt")
STAGE_OPTIONS = {
    "unstructured": ("sparsity", "pattern", "schedule", "owl_m", "owl_lambda", "blocksize", "percdamp"),
    "structured": ("heads", "ffn", "layers", "score", "allocation", "gqa", "round_to", "round_heads_to"),
    "dynamic": ("early_exit", "token_skip", "max_ppl_increase", "min_agreement", "exit_layers", "lossless"),
}
# Options of the dynamic stage (issue 4's flags) and their types, for when its flags are not in this build.
DYNAMIC_TYPES = {"early_exit": bool, "token_skip": bool, "max_ppl_increase": float, "min_agreement": float,
                 "exit_layers": "int_list", "lossless": bool}
NOT_IN_RECIPES = ("recipe", "method", "checkpoint_dir")  # method lives in stages; resuming is per command
METADATA = ("name", "description")
# Flags that only the person at the command line can give: a recipe that says them is refused.
CONSENT_FLAGS = ("overwrite", "trust_remote_code")
MAX_RECIPE_BYTES = 1 << 20

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, 60, 60


def _show(value) -> str:
    """A short repr for error messages: nested and long values are elided, never expanded whole."""
    text = _SHORT.repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def stage_kind(method) -> str | None:
    if method == "structured":
        return "structured"
    if method == "dynamic":
        return "dynamic"
    if method in UNSTRUCTURED_METHODS:
        return "unstructured"
    return None


def _field_types(parser: argparse.ArgumentParser) -> dict:
    """dest -> expected kind: bool, int, float, str, "str_list", "number" (sparsity), "schedule"."""
    kinds = {}
    for action in parser._actions:
        if action.dest in ("help",):
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            kinds[action.dest] = bool
        elif action.nargs in ("+", "*"):
            kinds[action.dest] = "str_list"
        elif action.type in (int, float):
            kinds[action.dest] = action.type
        else:
            kinds[action.dest] = str
    kinds.update(sparsity="number", schedule="schedule", heads=float, ffn=float, exit_layers="int_list")
    for name, kind in DYNAMIC_TYPES.items():
        kinds.setdefault(name, kind)
    return kinds


def _check_type(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (float, "number"):
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str) or (value is None)
    if kind == "str_list":
        return (isinstance(value, list) and value and all(isinstance(v, str) for v in value)) or isinstance(value, str)
    if kind == "schedule":
        return isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value))
    if kind == "int_list":
        return isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value))
    return True


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", "number": "a number",
               str: "a string", "str_list": "a list of strings", "schedule": "uniform, owl or a list of numbers",
               "int_list": "a list of integers"}


class RecipeError(UsageError):
    pass


def _read_recipe_text(path: str | Path) -> str:
    """The recipe file's text: a regular file (a FIFO would block), at most MAX_RECIPE_BYTES."""
    from .data import open_regular_file, read_at_most

    where = str(path)

    def too_big():
        return RecipeError(f"recipe {where}: larger than {MAX_RECIPE_BYTES} bytes; a recipe is a short text file")

    try:
        with open_regular_file(where, what="recipe") as handle:
            raw = read_at_most(handle, MAX_RECIPE_BYTES, too_big)
        return raw.decode("utf-8")
    except RecipeError:
        raise
    except UsageError as error:  # missing, unreadable, or not a regular file: the message names it
        raise RecipeError(str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"recipe {where}: cannot read it: {getattr(error, 'strerror', None) or error}") from None


def parse_recipe_yaml(text: str, where: str):
    """The YAML document of a recipe, safely: PyYAML's safe constructors, and no aliases at all
    (a recipe has no use for them; nested ones are a "billion laughs" that expands a few hundred
    bytes into more values than memory holds). Every problem is one RecipeError."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise RecipeError(f"recipe {where}: YAML aliases (*name, line {mark.line + 1}) are not allowed in "
                                  f"recipes; write the value out")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())[:200]
        raise RecipeError(f"recipe {where}: not valid YAML{line}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"recipe {where}: nested too deeply") from None


def load_recipe(path: str | Path, parser: argparse.ArgumentParser) -> tuple[dict, list[dict], str]:
    """Read and check a recipe: (top-level fields, stages, the file's text). Types and names only;
    ``check_values`` checks ranges once flags are merged."""
    where = str(path)
    text = _read_recipe_text(path)
    document = parse_recipe_yaml(text, where)
    if not isinstance(document, dict):
        raise RecipeError(f"recipe {where}: expected a mapping of fields at the top, got {type(document).__name__}")
    kinds = _field_types(parser)
    stage_keys = {key for keys in STAGE_OPTIONS.values() for key in keys}
    top_keys = set(kinds) - stage_keys - set(NOT_IN_RECIPES)
    fields = {}
    for key, value in document.items():
        if key == "stages" or key in METADATA:
            continue
        if key in CONSENT_FLAGS:
            raise RecipeError(f"recipe {where}: {key}: a recipe may not grant this; pass "
                              f"--{key.replace('_', '-')} on the command line")
        if not isinstance(key, str) or key not in top_keys:
            hint = (" (it belongs in a stage)" if key in stage_keys or key == "method"
                    else " (not allowed in recipes)" if key in NOT_IN_RECIPES else "")
            raise RecipeError(f"recipe {where}: unknown key {_show(key)}{hint}; known: "
                              f"{', '.join(sorted(top_keys | {'stages', *METADATA}))}")
        if not _check_type(value, kinds[key]):
            raise RecipeError(f"recipe {where}: {key}: expected {_KIND_WORDS[kinds[key]]}, got {_show(value)}")
        fields[key] = [value] if kinds[key] == "str_list" and isinstance(value, str) else value
    for key in METADATA:
        if key in document and not isinstance(document[key], str):
            raise RecipeError(f"recipe {where}: {key}: expected a string, got {_show(document[key])}")
    stages = document.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"recipe {where}: stages: expected a non-empty list of stages, got {_show(stages)}")
    checked, seen = [], []
    for i, stage in enumerate(stages):
        label = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise RecipeError(f"recipe {where}: {label}: expected a mapping with 'method', got {_show(stage)}")
        kind = stage_kind(stage.get("method"))
        if kind is None:
            raise RecipeError(f"recipe {where}: {label}.method: expected one of "
                              f"{', '.join([*UNSTRUCTURED_METHODS, 'structured', 'dynamic'])}, got {_show(stage.get('method'))}")
        for key, value in stage.items():
            if key == "method":
                continue
            if key not in STAGE_OPTIONS[kind]:
                raise RecipeError(f"recipe {where}: {label}.{key}: unknown key for a {kind} stage; known: "
                                  f"{', '.join(STAGE_OPTIONS[kind])}")
            if not _check_type(value, kinds.get(key)):
                raise RecipeError(f"recipe {where}: {label}.{key}: expected {_KIND_WORDS[kinds[key]]}, got {_show(value)}")
        if kind in seen:
            raise RecipeError(f"recipe {where}: {label}: a second {kind} stage (at most one of each)")
        if seen and KINDS.index(kind) < KINDS.index(seen[-1]):
            raise RecipeError(f"recipe {where}: {label}: a {kind} stage after a {seen[-1]} stage; the order is "
                              f"structured -> unstructured -> dynamic")
        seen.append(kind)
        checked.append(dict(stage))
    return fields, checked, text


def explicit_flags(argv: list[str], parser: argparse.ArgumentParser) -> dict:
    """Only the flags given on the command line, by dest name (nothing filled in from defaults)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            action.required = False
    return vars(quiet.parse_args(argv))


def merge(fields: dict, stages: list[dict], flags: dict, where: str) -> tuple[dict, list[dict], dict]:
    """Command-line flags over recipe fields. Returns (fields, stages, the overrides applied)."""
    fields, stages = dict(fields), [dict(s) for s in stages]
    overrides = {}
    stage_keys = {key: kind for kind, keys in STAGE_OPTIONS.items() for key in keys}
    for key, value in flags.items():
        if key in ("recipe",):
            continue
        if key == "checkpoint_dir":
            raise RecipeError("--checkpoint-dir cannot be used with --recipe (resume a single-method command instead)")
        if key == "method":
            kind = stage_kind(value)
            targets = [s for s in stages if stage_kind(s["method"]) == kind]
            if kind is None or len(targets) != 1:
                raise RecipeError(f"--method {value}: the recipe {where} has no {kind or 'matching'} stage to change")
            targets[0]["method"] = value
        elif key in stage_keys:
            if key == "sparsity":  # the flag is text (it may be omitted with a pattern)
                try:
                    value = float(value)
                except ValueError:
                    raise RecipeError(f"--sparsity must be a number in [0, 1), got {_show(value)}") from None
            targets = [s for s in stages if stage_kind(s["method"]) == stage_keys[key]]
            if not targets:
                raise RecipeError(f"--{key.replace('_', '-')}: the recipe {where} has no {stage_keys[key]} stage")
            for stage in targets:
                stage[key] = value
        else:
            fields[key] = value
        overrides[key] = value
    return fields, stages, overrides


def check_values(fields: dict, stages: list[dict], where: str) -> None:
    """Range and name checks of every value, before any work; errors name the file and the key."""
    from .api import check_device, check_sparsity
    from .methods import parse_pattern
    from .schedules import check_owl_options, parse_schedule
    from .structured import check_structured_options

    def guard(key, check):
        try:
            check()
        except UsageError as error:
            message = " ".join(str(error).split())
            raise RecipeError(f"recipe {where}: {key}: {message if len(message) <= 300 else message[:297] + '...'}") from None

    if "model" not in fields:
        raise RecipeError(f"recipe {where}: model: missing (give it in the recipe or with --model)")
    for key in ("nsamples", "seqlen", "eval_seqlen", "batch_size"):
        if key in fields and fields[key] < (2 if "seqlen" in key else 1):
            raise RecipeError(f"recipe {where}: {key}: too small: {_show(fields[key])}")
    if fields.get("eval_tokens", 0) < 0:
        raise RecipeError(f"recipe {where}: eval_tokens: must be >= 0, got {_show(fields['eval_tokens'])}")
    if "device" in fields:
        guard("device", lambda: check_device(fields["device"]))
    if fields.get("dtype", "auto") not in ("auto", "float32", "bfloat16", "float16"):
        raise RecipeError(f"recipe {where}: dtype: expected auto, float32, bfloat16 or float16, got {_show(fields['dtype'])}")
    for i, stage in enumerate(stages):
        label = f"stages[{i}]"
        kind = stage_kind(stage["method"])
        if kind == "unstructured":
            nm = None
            guard(f"{label}.pattern", lambda: parse_pattern(stage.get("pattern", "unstructured")))
            nm = parse_pattern(stage.get("pattern", "unstructured"))
            if "sparsity" in stage or nm is None:
                guard(f"{label}.sparsity", lambda: check_sparsity(stage.get("sparsity", 0.5), nm))
            guard(f"{label}.schedule", lambda: parse_schedule(stage.get("schedule", "uniform")))
            if nm is not None and parse_schedule(stage.get("schedule", "uniform")) != "uniform":
                raise RecipeError(f"recipe {where}: {label}.schedule: applies to unstructured sparsity, not to "
                                  f"pattern {nm}")
            guard(f"{label}.owl_m", lambda: check_owl_options(stage.get("owl_m", 5.0), stage.get("owl_lambda", 0.08)))
            if stage["method"] != "sparsegpt" and ({"blocksize", "percdamp"} & set(stage)):
                raise RecipeError(f"recipe {where}: {label}: blocksize/percdamp are sparsegpt options")
            if stage.get("blocksize", 128) < 1 or not 0 < stage.get("percdamp", 0.01) < 10:
                raise RecipeError(f"recipe {where}: {label}: blocksize must be >= 1 and percdamp in (0, 10)")
        elif kind == "structured":
            options = {k: v for k, v in stage.items() if k != "method"}
            guard(label, lambda: check_structured_options(**options))
        else:
            for key in ("max_ppl_increase", "min_agreement"):
                if stage.get(key) is not None and not stage[key] >= 0:
                    raise RecipeError(f"recipe {where}: {label}.{key}: must be >= 0, got {_show(stage[key])}")


def recipe_yaml(fields: dict, stages: list[dict], name: str | None, description: str | None) -> str:
    """The recipe actually used (after command-line overrides), as YAML."""
    import yaml

    document = {}
    if name:
        document["name"] = name
    if description:
        document["description"] = description
    document.update({k: v for k, v in fields.items() if k not in CONSENT_FLAGS})  # the command line's alone
    document["stages"] = stages
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)

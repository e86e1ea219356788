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
"""

from __future__ import annotations

import argparse
import copy
import numbers
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


def load_recipe(path: str | Path, parser: argparse.ArgumentParser) -> tuple[dict, list[dict], str]:
    """Read and check a recipe: (top-level fields, stages, the file's text). Types and names only;
    ``check_values`` checks ranges once flags are merged."""
    import yaml

    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"recipe {where}: cannot read it: {getattr(error, 'strerror', None) or error}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise RecipeError(f"recipe {where}: not valid YAML{line}: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(document, dict):
        raise RecipeError(f"recipe {where}: expected a mapping of fields at the top, got {type(document).__name__}")
    kinds = _field_types(parser)
    stage_keys = {key for keys in STAGE_OPTIONS.values() for key in keys}
    top_keys = set(kinds) - stage_keys - set(NOT_IN_RECIPES)
    fields = {}
    for key, value in document.items():
        if key == "stages" or key in METADATA:
            continue
        if not isinstance(key, str) or key not in top_keys:
            hint = (" (it belongs in a stage)" if key in stage_keys or key == "method"
                    else " (not allowed in recipes)" if key in NOT_IN_RECIPES else "")
            raise RecipeError(f"recipe {where}: unknown key {key!r}{hint}; known: "
                              f"{', '.join(sorted(top_keys | {'stages', *METADATA}))}")
        if not _check_type(value, kinds[key]):
            raise RecipeError(f"recipe {where}: {key}: expected {_KIND_WORDS[kinds[key]]}, got {value!r}")
        fields[key] = [value] if kinds[key] == "str_list" and isinstance(value, str) else value
    for key in METADATA:
        if key in document and not isinstance(document[key], str):
            raise RecipeError(f"recipe {where}: {key}: expected a string, got {document[key]!r}")
    stages = document.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"recipe {where}: stages: expected a non-empty list of stages, got {stages!r}")
    checked, seen = [], []
    for i, stage in enumerate(stages):
        label = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise RecipeError(f"recipe {where}: {label}: expected a mapping with 'method', got {stage!r}")
        kind = stage_kind(stage.get("method"))
        if kind is None:
            raise RecipeError(f"recipe {where}: {label}.method: expected one of "
                              f"{', '.join([*UNSTRUCTURED_METHODS, 'structured', 'dynamic'])}, got {stage.get('method')!r}")
        for key, value in stage.items():
            if key == "method":
                continue
            if key not in STAGE_OPTIONS[kind]:
                raise RecipeError(f"recipe {where}: {label}.{key}: unknown key for a {kind} stage; known: "
                                  f"{', '.join(STAGE_OPTIONS[kind])}")
            if not _check_type(value, kinds.get(key)):
                raise RecipeError(f"recipe {where}: {label}.{key}: expected {_KIND_WORDS[kinds[key]]}, got {value!r}")
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
                    raise RecipeError(f"--sparsity must be a number in [0, 1), got {value!r}") from None
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
            raise RecipeError(f"recipe {where}: {key}: {error}") from None

    if "model" not in fields:
        raise RecipeError(f"recipe {where}: model: missing (give it in the recipe or with --model)")
    for key in ("nsamples", "seqlen", "eval_seqlen", "batch_size"):
        if key in fields and fields[key] < (2 if "seqlen" in key else 1):
            raise RecipeError(f"recipe {where}: {key}: too small: {fields[key]}")
    if fields.get("eval_tokens", 0) < 0:
        raise RecipeError(f"recipe {where}: eval_tokens: must be >= 0, got {fields['eval_tokens']}")
    if "device" in fields:
        guard("device", lambda: check_device(fields["device"]))
    if fields.get("dtype", "auto") not in ("auto", "float32", "bfloat16", "float16"):
        raise RecipeError(f"recipe {where}: dtype: expected auto, float32, bfloat16 or float16, got {fields['dtype']!r}")
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
                    raise RecipeError(f"recipe {where}: {label}.{key}: must be >= 0, got {stage[key]!r}")


def recipe_yaml(fields: dict, stages: list[dict], name: str | None, description: str | None) -> str:
    """The recipe actually used (after command-line overrides), as YAML."""
    import yaml

    document = {}
    if name:
        document["name"] = name
    if description:
        document["description"] = description
    document.update(fields)
    document["stages"] = stages
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)

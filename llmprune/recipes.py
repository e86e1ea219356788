"""YAML recipes: a complete, rerunnable experiment in one file.

    python -m llmprune --recipe recipes/wanda-50.yaml [flags that override recipe fields]

A recipe's top-level keys are the run's options under their keyword names (``model``,
``calib_data``, ``nsamples``, ``eval_data``, ``output``, ``device``, ``device_map``,
``checkpoint_dir``, ...: ``llmprune.job.RUN_OPTIONS``), plus ``name``, ``description`` and
``stages``: an ordered list of stages, each a mapping with ``method`` and that stage's options
(declared by the stage and its method, llmprune.stages):

    stages:
      - {method: structured, ffn: 0.25, score: wanda}            # structured: heads/ffn/layers...
      - {method: wanda, sparsity: 0.5, schedule: owl}            # unstructured: magnitude/wanda/sparsegpt/...
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

import reprlib
from pathlib import Path

from .errors import UsageError
from .options import _KIND_WORDS

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


def _read(path) -> dict:
    document = parse_recipe_yaml(_read_recipe_text(path), str(path))
    if not isinstance(document, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of fields at the top, got {type(document).__name__}")
    return document


def _top_fields(document: dict, where: str) -> dict:
    from .cli import stage_options
    from .job import RUN_OPTIONS

    known = {o.name: o for o in RUN_OPTIONS if o.in_recipes}
    stage_keys = {o.name for options in stage_options().values() for o in options}
    fields = {}
    for key, value in document.items():
        if key == "stages" or key in METADATA:
            continue
        if key in CONSENT_FLAGS:
            raise RecipeError(f"recipe {where}: {key}: a recipe may not grant this; pass "
                              f"--{key.replace('_', '-')} on the command line")
        if not isinstance(key, str) or key not in known:
            hint = " (it belongs in a stage)" if key in stage_keys or key == "method" else ""
            raise RecipeError(f"recipe {where}: unknown key {_show(key)}{hint}; known: "
                              f"{', '.join(sorted({*known, 'stages', *METADATA}))}")
        if not known[key].has_type(value):
            raise RecipeError(f"recipe {where}: {key}: expected {_KIND_WORDS[known[key].type]}, got {_show(value)}")
        fields[key] = value
    for key in METADATA:
        if key in document and not isinstance(document[key], str):
            raise RecipeError(f"recipe {where}: {key}: expected a string, got {_show(document[key])}")
    return fields


def _stage_entries(document: dict, where: str) -> list[dict]:
    """The stages as written: names and types checked, kinds in order."""
    from .methods import method_options
    from .stages import STAGES, all_methods, stage_class

    stages = document.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"recipe {where}: stages: expected a non-empty list of stages, got {_show(stages)}")
    seen = []
    for i, stage in enumerate(stages):
        label = f"stages[{i}]"
        if not isinstance(stage, dict):
            raise RecipeError(f"recipe {where}: {label}: expected a mapping with 'method', got {_show(stage)}")
        cls = stage_class(stage.get("method"))
        if cls is None:
            raise RecipeError(f"recipe {where}: {label}.method: expected one of {', '.join(all_methods())}, "
                              f"got {_show(stage.get('method'))}")
        options = {o.name: o for o in cls.all_options()}
        own = {o.name for o in cls.options} | ({o.name for o in method_options(stage["method"])}
                                               if cls.kind == "unstructured" else set())
        for key, value in stage.items():
            if key == "method":
                continue
            if key not in options:
                raise RecipeError(f"recipe {where}: {label}.{key}: unknown key for a {cls.kind} stage; known: "
                                  f"{', '.join(options)}")
            if key not in own:
                owners = [m for m in cls.methods() if key in {o.name for o in method_options(m)}]
                raise RecipeError(f"recipe {where}: {label}: {key} is an option of {', '.join(owners)}")
            if not options[key].has_type(value):
                raise RecipeError(f"recipe {where}: {label}.{key}: expected "
                                  f"{_KIND_WORDS[options[key].type]}, got {_show(value)}")
        kinds = list(STAGES)
        if cls.kind in seen:
            raise RecipeError(f"recipe {where}: {label}: a second {cls.kind} stage (at most one of each)")
        if seen and kinds.index(cls.kind) < kinds.index(seen[-1]):
            raise RecipeError(f"recipe {where}: {label}: a {cls.kind} stage after a {seen[-1]} stage; the order is "
                              + " -> ".join(kinds))
        seen.append(cls.kind)
    return [dict(stage) for stage in stages]


def merge(fields: dict, stages: list[dict], flags: dict, where: str) -> tuple[dict, list[dict], dict]:
    """Command-line flags over recipe fields. Returns (fields, stages, the overrides applied)."""
    from .cli import stage_options
    from .stages import stage_class

    fields, stages = dict(fields), [dict(s) for s in stages]
    stage_keys = {o.name: kind for kind, options in stage_options().items() for o in options}
    kind_of = lambda method: getattr(stage_class(method), "kind", None)  # noqa: E731
    overrides = {}
    for key, value in flags.items():
        if key == "recipe":
            continue
        if key == "method":
            kind = kind_of(value)
            targets = [s for s in stages if kind_of(s["method"]) == kind]
            if kind is None or len(targets) != 1:
                raise RecipeError(f"--method {value}: the recipe {where} has no {kind or 'matching'} stage to change")
            targets[0]["method"] = value
        elif key in stage_keys:
            if key == "sparsity":  # the flag is text (it may be omitted with a pattern)
                try:
                    value = float(value)
                except ValueError:
                    raise RecipeError(f"--sparsity must be a number in [0, 1), got {_show(value)}") from None
            targets = [s for s in stages if kind_of(s["method"]) == stage_keys[key]]
            if not targets:
                raise RecipeError(f"--{key.replace('_', '-')}: the recipe {where} has no {stage_keys[key]} stage")
            for stage in targets:
                stage[key] = value
        else:
            fields[key] = value
        overrides[key] = value
    return fields, stages, overrides


def _guard(where: str, key: str, check):
    """check(), its UsageError named by the file and the key (a stage's key when the message
    starts with that option's flag, e.g. stages[0].sparsity)."""
    try:
        return check()
    except UsageError as error:
        text = " ".join(str(error).split())
        text = text if len(text) <= 300 else text[:297] + "..."
        if key.startswith("stages[") and text.startswith("--"):
            key += "." + text[2:].split()[0].replace("-", "_")
        raise RecipeError(f"recipe {where}: {key}: {text}") from None


def spec_from_recipe(flags: dict, command: str):
    """``--recipe FILE [flags]`` -> a checked RunSpec with one stage per recipe stage."""
    from . import __version__
    from .job import RUN_OPTIONS, RunSpec
    from .options import check_values
    from .stages import stage_for

    where = str(flags["recipe"])
    document = _read(where)
    fields = _top_fields(document, where)
    stages = _stage_entries(document, where)
    fields, stages, overrides = merge(fields, stages, flags, where)
    if "model" not in fields:
        raise RecipeError(f"recipe {where}: model: missing (give it in the recipe or with --model)")
    for option in RUN_OPTIONS:
        if option.name in fields:
            _guard(where, option.name, lambda option=option: option.check(fields[option.name]))
    if "device" in fields:
        from .api import check_device

        _guard(where, "device", lambda: check_device(fields["device"]))
    built = [_guard(where, f"stages[{i}]", lambda s=s: stage_for(s["method"], {k: v for k, v in s.items()
                                                                              if k != "method"}))
             for i, s in enumerate(stages)]
    header = f"# recipe used by llmprune {__version__}: {where}"
    if overrides:
        header += "\n# overridden on the command line: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    recipe = {"path": where, "name": document.get("name") or Path(where).stem, "overrides": overrides,
              "yaml": header + "\n" + recipe_yaml(fields, stages, document.get("name"), document.get("description"))}
    return RunSpec(check_values(RUN_OPTIONS, fields), built, command=command, recipe=recipe)


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

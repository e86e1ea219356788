"""The command line -> a ``job.RunSpec``. Flags are derived from the options declared by the run
(``job.RUN_OPTIONS``), the stages and the methods; nothing below this module sees argparse, and
nothing here imports torch: arguments are checked before any heavy module is loaded."""

from __future__ import annotations

import argparse
import shlex

from .errors import UsageError
from .options import check_values

EPILOG = """\
Subcommands: python -m llmprune sweep ... (prune many ways, plot perplexity against sparsity) and
python -m llmprune eval MODEL_OR_FOLDER ... (measure a model or an output folder), python -m llmprune
convert FOLDER --to dense|sparse --output DIR (store the weights dense or sparse) and
python -m llmprune recover FOLDER --teacher MODEL --data SOURCE --tokens N (distil a pruned folder from
its dense model, keeping its zeros and shape); each has --help.

N:M patterns follow the SparseGPT/Wanda papers: in every group of M consecutive weights along the
input dimension of each row, N are set to zero (2:4 and 4:8 both remove 50%). With --pattern N:M,
--sparsity may be omitted (it is N/M); if given it must equal N/M, otherwise the run is refused.

Data SOURCEs: a .txt, .txt.gz, .jsonl (field "text") or .parquet file, or a folder of them; the
presets wikitext2, c4, ptb (Hugging Face datasets, need the Hub or its cache); or "default", the
docstrings of this Python's standard library (offline; calibration and evaluation parts share no
file). Unstructured results are saved dense, with zeros, unless --save-format sparse.

Several processes: accelerate launch --num_processes N -m llmprune ... splits the calibration
samples (on a CPU-only machine add --multi_gpu, which selects accelerate's torchrun launcher; gloo
is used on CPU, NCCL on GPUs). Only the main process writes the output.

Exit codes: 0 success, 2 bad input (nothing written), 1 numerical failure or output that cannot be
written (disk full: no folder, no temporary left), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM); an interrupted run leaves no partial output folder.
"""

GROUPS = {"structured": "structured pruning (--method structured)",
          "dynamic": "dynamic inference (--method dynamic)",
          "recover": "recovery after pruning: any --recover-* flag distils the pruned model from the input model"}
BIG = ("checkpoint_dir", "device_map", "max_memory", "offload_folder", "stream", "activations_on_disk", "force")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2 (argparse quotes some values raw)
        raise UsageError(message.replace("\r", "\\r").replace("\n", "\\n"))


def stage_options() -> dict:
    """kind -> the options of that stage kind (with its methods' options)."""
    from .stages import STAGES

    return {kind: cls.all_options() for kind, cls in STAGES.items()}


def build_parser() -> argparse.ArgumentParser:
    from .job import RUN_OPTIONS
    from .options import add_arguments
    from .stages import all_methods

    p = Parser(prog="python -m llmprune", usage="python -m llmprune [--recipe FILE] --model MODEL [options]\n"
               "       python -m llmprune {sweep,eval,convert,recover} ...",
               description="Prune a Hugging Face causal LM and measure it.", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=argparse.SUPPRESS, metavar="FILE",
                   help="a YAML recipe (model, data, stages); flags given here override its fields")
    p.add_argument("--method", default=argparse.SUPPRESS,
                   help=" | ".join(all_methods()) + " (default wanda)")
    run = [o for o in RUN_OPTIONS if o.name not in BIG]
    add_arguments(p, run)
    seen = {o.name for o in RUN_OPTIONS}
    for kind, options in stage_options().items():
        add_arguments(p.add_argument_group(GROUPS[kind]) if kind in GROUPS else p, options, seen)
    add_arguments(p.add_argument_group("big models, several processes, resuming"),
                  [o for o in RUN_OPTIONS if o.name in BIG])
    return p


def _given_by_kind(given: dict) -> dict:
    """The given stage options, by the stage kind that declares them."""
    by_kind = {}
    for kind, options in stage_options().items():
        names = {o.name for o in options}
        by_kind[kind] = {k: v for k, v in given.items() if k in names}
    return by_kind


def _check_foreign(method_kind: str, by_kind: dict) -> None:
    """Options of a stage kind the run does not use: dynamic ones are refused; unstructured ones
    are still checked (a bad --sparsity is an error with any method); structured ones are ignored."""
    from .stages import stage_for

    if method_kind != "dynamic" and by_kind.get("dynamic"):
        raise UsageError(", ".join(f"--{k.replace('_', '-')}" for k in by_kind["dynamic"])
                         + " belong to --method dynamic")
    if method_kind == "structured" and by_kind.get("unstructured"):
        if by_kind["unstructured"].get("schedule", "uniform") != "uniform":
            raise UsageError("--schedule applies to unstructured sparsity (not to --method structured or N:M patterns)")
        stage_for("wanda", by_kind["unstructured"])


def spec_from_argv(argv: list[str]):
    """``python -m llmprune [flags]`` or ``--recipe FILE [flags]`` -> a checked RunSpec."""
    from .job import RUN_OPTIONS, RunSpec
    from .stages import stage_class, stage_for

    given = vars(build_parser().parse_args(argv))
    command = "python -m llmprune " + shlex.join(argv)
    if "recipe" in given:
        from .recipes import spec_from_recipe

        return spec_from_recipe(given, command)
    if "model" not in given:
        raise UsageError("the following arguments are required: --model")
    method = given.get("method", "wanda")
    cls = stage_class(method)
    if cls is None:
        from .stages import all_methods

        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join(all_methods())}")
    if cls.kind == "recover":
        raise UsageError("--method recover: use python -m llmprune recover FOLDER "
                         "(or --recover-* flags on a prune run)")
    by_kind = _given_by_kind(given)
    _check_foreign(cls.kind, by_kind)
    values = check_values(RUN_OPTIONS, given)
    stages = [stage_for(method, by_kind[cls.kind])]
    if by_kind.get("recover") and cls.kind != "recover":  # --recover-*: distil after pruning
        stages.append(stage_for("recover", by_kind["recover"]))
    return RunSpec(values, stages, command=command)


def run_argv(argv: list[str]) -> dict:
    from .job import run

    return run(spec_from_argv(argv))

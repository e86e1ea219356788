"""The subcommands ``sweep`` and ``eval``: their flags -> a ``job.RunSpec``.

Both take the run options they share with the main command from ``job.RUN_OPTIONS`` (data,
device, dtype, progress, the data cap, ...), so each is declared once; only what is their own is
declared here. ``python -m llmprune --model ...`` (no subcommand) is the pruning run of ``cli``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from .errors import UsageError
from .options import Option, add_arguments, check_values

# The run options each subcommand takes, by name (declared in job.RUN_OPTIONS).
SWEEP_RUN_OPTIONS = ("model", "calib_data", "nsamples", "seqlen", "seed", "eval_data", "eval_seqlen", "eval_tokens",
                     "max_data_bytes", "batch_size", "no_cache", "output", "overwrite", "device", "dtype",
                     "trust_remote_code", "no_progress")
EVAL_RUN_OPTIONS = ("eval_data", "eval_seqlen", "eval_tokens", "speed", "max_data_bytes", "no_cache", "device",
                    "dtype", "trust_remote_code", "no_progress")
EVAL_ALIASES = {"eval_data": ("--data",), "eval_seqlen": ("--seqlen",), "eval_tokens": ("--tokens",)}
EVAL_HELP = {"speed": "measure prefill and decode tokens/s"}

SWEEP_OPTIONS = (
    Option("methods", str, "magnitude,wanda,sparsegpt", "comma-separated methods"),
    Option("sparsities", str, "0.1,0.2,...,0.8",
           'comma-separated, "a,b,...,z" continues the step (default 0.1,0.2,...,0.8)'),
    Option("patterns", str, "", "comma-separated N:M patterns, e.g. 2:4,4:8 (default none)"),
    Option("schedules", str, "uniform", "uniform, owl or uniform,owl (unstructured runs)"),
)
SWEEP_OUTPUT_HELP = "folder for the table, JSON and plot (default sweeps/<model>)"

EVAL_OPTIONS = (
    Option("tasks", str, None, "comma-separated lm-evaluation-harness tasks (needs lm_eval)"),
    Option("limit", float, None, "lm_eval: examples per task (or fraction if < 1)"),
    Option("num_fewshot", int, None, "lm_eval: few-shot examples"),
    Option("include_path", str, None, "lm_eval: a folder of extra task YAMLs (they can run Python: needs "
           "--trust-remote-code)", metavar="DIR"),
    Option("seed", int, 0, "lm_eval: seed of the few-shot sampling"),
    Option("json", str, None, "also write the results as JSON here", metavar="FILE"),
    Option("execute", str, "dense", "dense (default); sparse: on the CPU, each decoder linear layer keeps whichever "
           "of dense, CSR and 32x32 BSR is fastest at --execute-tokens; 2:4: semi-structured sparse kernels on an "
           "NVIDIA GPU (a 2:4 model in float16/bfloat16). With --speed, dense is measured too",
           choices=("dense", "sparse", "2:4")),
    Option("execute_tokens", int, 64, "with --execute sparse: the token batch the kernels are timed at (default 64)",
           minimum=1, metavar="N"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2
        raise UsageError(message.replace("\r", "\\r").replace("\n", "\\n"))


def _run_options(names: tuple, aliases: dict | None = None, helps: dict | None = None) -> list[Option]:
    """The named RUN_OPTIONS, with a subcommand's extra (hidden) flag names or help text."""
    from .job import RUN_OPTIONS

    by_name = {o.name: o for o in RUN_OPTIONS}
    return [replace(by_name[name], aliases=(aliases or {}).get(name, by_name[name].aliases),
                    help=(helps or {}).get(name, by_name[name].help)) for name in names]


def _owl_options() -> list[Option]:
    """owl_m / owl_lambda, as the unstructured stage declares them."""
    from .stages.unstructured import Unstructured

    return [o for o in Unstructured.options if o.name in ("owl_m", "owl_lambda")]


def _method_options() -> list[Option]:
    """Every method's own options (each once), passed to the runs of that method."""
    from .methods import METHODS, method_options

    options, seen = [], set()
    for name in METHODS:
        options += [o for o in method_options(name) if o.name not in seen and not seen.add(o.name)]
    return options


def sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llmprune sweep",
                description="Prune one model many ways and plot perplexity against sparsity. Writes "
                            "sweep.md, sweep.json and sweep.png; no model folders.")
    add_arguments(p, _run_options(SWEEP_RUN_OPTIONS[:1]))
    add_arguments(p, SWEEP_OPTIONS)
    add_arguments(p, _owl_options())
    add_arguments(p, _run_options(SWEEP_RUN_OPTIONS[1:], helps={"output": SWEEP_OUTPUT_HELP}))
    add_arguments(p, _method_options())
    return p


def run_sweep_command(argv: list[str]) -> int:
    from .methods import METHODS, method_options
    from .sweep import default_output, format_summary, parse_sparsities, plan_runs, run_sweep

    given = vars(sweep_parser().parse_args(argv))
    if "model" not in given:
        raise UsageError("the following arguments are required: --model")
    own = check_values(SWEEP_OPTIONS, given)
    settings = check_values(_run_options(SWEEP_RUN_OPTIONS), given)
    owl = check_values(_owl_options(), given)
    split = lambda text: [item.strip() for item in text.split(",") if item.strip()]  # noqa: E731
    runs = plan_runs(split(own["methods"]), parse_sparsities(own["sparsities"]), split(own["patterns"]),
                     split(own["schedules"]) or ["uniform"])
    options = {name: check_values(method_options(name), given) for name in METHODS}
    model = settings.pop("model")
    output = settings.pop("output") or default_output(model)
    results = run_sweep(model, runs, output=output, method_options=options, **settings, **owl)
    print("\nllmprune sweep\n" + format_summary(results))
    print(f"wrote {output}/sweep.md, sweep.json, sweep.png")
    return 0


def eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llmprune eval",
                description="Measure a model or an llmprune output folder: perplexity with the declared "
                            "protocol, optionally speed and lm-evaluation-harness tasks.")
    p.add_argument("model", metavar="MODEL_OR_FOLDER", help="Hub id, local folder, or built-in alias llama")
    add_arguments(p, _run_options(EVAL_RUN_OPTIONS, EVAL_ALIASES, EVAL_HELP))
    add_arguments(p, EVAL_OPTIONS)
    return p


def eval_spec(argv: list[str]):
    """The eval command as a RunSpec with no stage, and its own options; checks that need no model."""
    from .harness import INSTALL_HINT, check_include_path, lm_eval_available
    from .job import RUN_OPTIONS, RunSpec
    from .jsonreport import check_report_path

    given = vars(eval_parser().parse_args(argv))
    own = check_values(EVAL_OPTIONS, given)
    shared = {name: given[name] for name in ("model", *EVAL_RUN_OPTIONS) if name in given}
    spec = RunSpec(check_values(RUN_OPTIONS, shared), [], command="eval", sample_prompt=None)
    own["tasks"] = [t.strip() for t in (own["tasks"] or "").split(",") if t.strip()]
    if spec.eval_sources is None and not own["tasks"] and not spec.speed:
        raise UsageError("nothing to measure: --eval-data none without --speed or --tasks")
    if own["tasks"] and not lm_eval_available():  # before loading anything
        raise UsageError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    check_include_path(own["include_path"], spec.trust_remote_code)
    if own["execute"] == "sparse" and spec.device not in ("auto", "cpu"):
        raise UsageError("--execute sparse runs on the CPU (torch's sparse matmul): use --device cpu")
    if own["json"]:
        check_report_path(own["json"])
    return spec, own


def run_eval_command(argv: list[str]) -> int:
    from .data import max_data_bytes

    spec, own = eval_spec(argv)
    with max_data_bytes(spec.max_data_bytes):
        results, rows = _evaluate(spec, own)
    if own["json"]:
        from .jsonreport import write_json_report

        write_json_report(own["json"], results)
    from .report import format_rows

    print("\nllmprune eval\n" + format_rows(rows), flush=True)
    return 0


def _execute(spec, own: dict, loaded, results: dict, rows: list) -> None:
    """--execute sparse|2:4: put the sparse kernels in place (measuring dense speed first with
    --speed), and add what was chosen to the results."""
    from .evaluate import measure_speed

    model = loaded.model.to(loaded.compute)
    if spec.speed:
        results["speed_dense"] = measure_speed(model, loaded.compute, progress=spec.progress)
    if own["execute"] == "sparse":
        from .sparse_execute import compare_prefill, execute_sparse

        execution = execute_sparse(model, tokens=own["execute_tokens"])
        results["execution"] = {"kind": "sparse", **execution.report()}
        if execution.switched:
            results["execution"]["prefill"] = compare_prefill(execution)
    else:
        from .sparse_execute import execute_semi_structured

        results["execution"] = {"kind": "2:4", **execute_semi_structured(model)}
    rows.append(("execution", results["execution"]["summary"]))
    prefill = results["execution"].get("prefill")
    if prefill:
        rows.append(("prefill", f"{prefill['tokens']} tokens: {prefill['speedup_with_head']:.2f}x dense with the LM "
                                f"head, {prefill['speedup_without_head']:.2f}x without"))


def _evaluate(spec, own: dict) -> tuple[dict, list]:
    """prepare -> (the tasks, before measuring) -> load -> refuse NaN weights -> measure -> tasks."""
    import time

    from . import job
    from .evaluate import check_finite_weights, count_parameters, weight_bytes
    from .harness import prepare_tasks, run_tasks

    prepared = job.prepare(spec)
    task_plan = prepare_tasks(own["tasks"], own["include_path"]) if own["tasks"] else None
    loaded = job.load(spec, prepared)
    model = loaded.model
    check_finite_weights(model)
    if own["execute"] == "2:4":  # refused before any measurement
        from .sparse_execute import check_semi_structured

        check_semi_structured(model.to(loaded.compute))
    results = {"model": spec.model, "device": str(loaded.compute), "dtype": loaded.dtype,
               "parameters": count_parameters(model), "weight_bytes": weight_bytes(model)}
    rows = [("model", spec.model), ("parameters", f"{results['parameters']['nonzero']:,} nonzero of "
                                                   f"{results['parameters']['parameters']:,}")]
    if own["execute"] != "dense":
        _execute(spec, own, loaded, results, rows)
    measured = job.measure(loaded, model, dense=True, speed=spec.speed)
    if "perplexity" in measured:
        results["perplexity"] = {**measured["perplexity"], "data": list(spec.eval_sources)}
        rows.append(("perplexity", f"{measured['perplexity']['perplexity']:.3f}  "
                                   f"[{measured['perplexity']['protocol']}]"))
    if "speed" in measured:
        results["speed"] = measured["speed"]
        rows.append(("speed", f"prefill {results['speed']['prefill_tokens_per_s']:.0f} tokens/s, decode "
                              f"{results['speed']['decode_tokens_per_s']:.1f} tokens/s"))
        if "speed_dense" in results:
            dense, fast = results["speed_dense"], results["speed"]
            rows.append(("vs dense", f"prefill {fast['prefill_tokens_per_s'] / dense['prefill_tokens_per_s']:.2f}x, "
                                     f"decode {fast['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f}x"))
    if task_plan is not None:
        started, limit = time.perf_counter(), own["limit"]
        model.to(loaded.compute)
        results["tasks"] = run_tasks(model, loaded.tokenizer, task_plan, device=loaded.compute,
                                     limit=None if limit is None else (int(limit) if limit >= 1 else limit),
                                     num_fewshot=own["num_fewshot"], seed=own["seed"])
        results["tasks_seconds"] = time.perf_counter() - started
        for task, metrics in results["tasks"].items():
            rows.append((task, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())))
    return results, rows



def convert_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llmprune convert",
                description="Copy a model folder with its weights stored dense or sparse (each pruned linear "
                            "weight as its non-zero values plus a bitmask); every other file is copied unchanged.")
    p.add_argument("folder", metavar="FOLDER", help="a local model folder (dense, or llmprune's sparse format)")
    p.add_argument("--to", required=True, choices=("dense", "sparse"), help="the storage of the copy")
    p.add_argument("--output", required=True, metavar="DIR", help="the folder to write (written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an empty output folder or one an earlier llmprune run wrote (it holds llmprune.json)")
    return p


def run_convert_command(argv: list[str]) -> int:
    args = convert_parser().parse_args(argv)
    from .sparse_format import convert, folder_bytes

    target = convert(args.folder, args.to, args.output, overwrite=args.overwrite)
    before, after = folder_bytes(args.folder), folder_bytes(target)
    print(f"wrote {target} ({args.to}): {after / 2**20:.1f} MiB, {after / before:.3f}x the {before / 2**20:.1f} MiB "
          f"of {args.folder}", flush=True)
    return 0


def run_recover_command(argv: list[str]) -> int:
    from .stages.recover import run_recover_command as run

    return run(argv)


SUBCOMMANDS = {"sweep": run_sweep_command, "eval": run_eval_command, "convert": run_convert_command,
               "recover": run_recover_command}

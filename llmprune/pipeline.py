"""A recipe run: load, measure, run the stages in order (structured -> unstructured -> dynamic),
measure, save (with the recipe), optionally publish. Plain arguments only; see llmprune.recipes."""

from __future__ import annotations

import platform
import re
import shlex
import time
from pathlib import Path

import torch

from . import __version__, data, scale
from .api import check_device, check_pattern_fits, prune
from .cli import _default_output, _summary, speed_row

from .errors import UsageError
from .evaluate import count_parameters, measure_speed, perplexity, tokenizer_adds_bos, weight_bytes
from .memory import PeakRSS
from .methods import METHODS, parse_pattern
from .models.adapters import adapter_for
from .models.loading import base_model_id, load_model
from .recipes import (STAGE_OPTIONS, check_values, explicit_flags, load_recipe, merge, parse_recipe_yaml, recipe_yaml,
                      stage_kind)
from .save import check_output_folder, model_card, save_folder
from .structured import check_structured, prune_structured

RECIPE_FILE = "recipe.yaml"


def _stage_needs_data(stage: dict) -> bool:
    kind = stage_kind(stage["method"])
    if kind == "structured":
        return stage.get("score", "wanda") != "magnitude" or stage.get("layers", 0) > 0
    if kind == "unstructured":
        return METHODS[stage["method"]].needs_calibration or stage.get("schedule") == "owl"
    return True  # dynamic: exit heads / skip decisions are calibrated


def _recipe_output(model: str, name: str) -> Path:
    """pruned/<model>-recipe-<recipe name>, numbered like a single-method run's default."""
    return _default_output(model, "recipe", re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run")


def run_recipe_command(argv: list[str], parser) -> dict:
    """``python -m llmprune --recipe FILE [flags]``: check everything, then run."""
    flags = explicit_flags(argv, parser)
    path = flags["recipe"]
    fields, stages, text = load_recipe(path, parser)
    document = parse_recipe_yaml(text, path)  # the text already checked, not the file read again
    fields, stages, overrides = merge(fields, stages, flags, path)
    check_values(fields, stages, path)
    defaults = {a.dest: a.default for a in parser._actions if a.dest not in ("help", "recipe")}
    settings = {k: v for k, v in defaults.items()
                if k not in {key for keys in STAGE_OPTIONS.values() for key in keys} | {"method", "checkpoint_dir"}}
    settings.update(fields)
    used = recipe_yaml(fields, stages, document.get("name"), document.get("description"))
    header = f"# recipe used by llmprune {__version__}: {path}"
    if overrides:
        header += "\n# overridden on the command line: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    with data.max_data_bytes(settings.get("max_data_bytes")):
        return run_stages(settings, stages, recipe={"path": str(path), "name": document.get("name") or Path(path).stem,
                                                    "overrides": overrides, "yaml": header + "\n" + used},
                          argv=argv)


def run_stages(settings: dict, stages: list[dict], *, recipe: dict, argv: list[str]) -> dict:
    started = time.perf_counter()
    progress = not settings.get("no_progress", False)
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    model = settings["model"]
    compute = check_device(settings.get("device", "auto"))
    dtype = settings.get("dtype", "auto")
    if dtype == "auto":
        dtype = "bfloat16" if compute.type == "cuda" else "float32"
    dynamic = next((s for s in stages if stage_kind(s["method"]) == "dynamic"), None)
    if dynamic is not None:
        try:
            from .dynamic import make_dynamic, save_dynamic
        except ImportError:
            raise UsageError("the dynamic stage needs llmprune.dynamic, which this build does not have") from None
    eval_data = settings.get("eval_data") or ["default"]
    evaluate_sources = None if [s.lower() for s in eval_data] == ["none"] else eval_data
    calib_data = settings.get("calib_data") or ["default"]
    output = settings.get("output")
    overwrite = bool(settings.get("overwrite"))
    target_folder = check_output_folder(output, overwrite) if output else _recipe_output(model, recipe["name"])
    data.check_sources(calib_data)
    if evaluate_sources is not None:
        data.check_sources(evaluate_sources)
    placement = [f"--{k.replace('_', '-')}" for k in ("device_map", "max_memory", "offload_folder", "stream",
                                                      "activations_on_disk") if settings.get(k)]
    if placement:  # recipes load the whole model; these belong to single-method runs for now
        raise UsageError(f"{', '.join(placement)} not supported with --recipe (use a single-method command)")
    push = settings.get("push_to_hub")
    if settings.get("private") and not push:
        raise UsageError("--private applies to --push-to-hub, which was not given")
    if push:
        from .publish import check_repo_id

        check_repo_id(push)

    nsamples, seqlen, seed = settings["nsamples"], settings["seqlen"], settings["seed"]
    batch_size = settings.get("batch_size", 1)
    needs_data = any(_stage_needs_data(s) for s in stages)
    methods = [s["method"] for s in stages]  # the heaviest statistics of any stage size the estimate
    heaviest = next((m for m in ("sparsegpt", "structured", "wanda") if m in methods), methods[0])
    scale.check_memory(model, dtype=dtype, mode="memory", nsamples=nsamples, seqlen=seqlen, batch_size=batch_size,
                       method=heaviest, needs_data=needs_data, max_memory=None, activations_on_disk=False,
                       compute=compute, force=bool(settings.get("force")),
                       trust_remote_code=bool(settings.get("trust_remote_code")))

    timings = {}
    t = time.perf_counter()
    lm, tokenizer = load_model(model, dtype=dtype, trust_remote_code=bool(settings.get("trust_remote_code")))
    adapter_for(lm)
    for stage in stages:
        options = {k: v for k, v in stage.items() if k != "method"}
        if stage["method"] == "structured":
            check_structured(lm.config, **options)
        elif stage_kind(stage["method"]) == "unstructured":
            check_pattern_fits(lm, parse_pattern(stage.get("pattern", "unstructured")))
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    calibration = data.calibration_ids(tokenizer, calib_data, nsamples, seqlen, seed) if needs_data else None
    evaluation = None
    eval_seqlen = settings["eval_seqlen"]
    if evaluate_sources is not None:
        evaluation = data.evaluation_ids(tokenizer, evaluate_sources, settings["eval_tokens"] or None, eval_seqlen)
    timings["data_s"] = time.perf_counter() - t
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    measure_speed_too = bool(settings.get("speed")) or any(s["method"] == "structured" for s in stages)

    def evaluate(model_to_run) -> tuple[dict | None, dict | None]:
        model_to_run.to(compute)
        try:
            ppl = (perplexity(model_to_run, evaluation, eval_seqlen, bos, compute, progress).as_dict()
                   if evaluation is not None else None)
            return ppl, (measure_speed(model_to_run, compute) if measure_speed_too else None)
        finally:
            model_to_run.to("cpu")

    perplexities, speeds = {}, {}
    perplexities["dense"], speeds["dense"] = evaluate(lm)
    params_before, bytes_before = count_parameters(lm), weight_bytes(lm)
    stage_reports, final, dynamic_model = [], lm, None
    with PeakRSS() as memory:
        for stage in stages:
            kind = stage_kind(stage["method"])
            options = {k: v for k, v in stage.items() if k != "method"}
            t = time.perf_counter()
            if kind == "structured":
                report = prune_structured(lm, calibration, **options, device=compute, batch_size=batch_size,
                                          progress=progress).as_dict()
            elif kind == "unstructured":
                pattern = options.pop("pattern", "unstructured")
                sparsity = options.pop("sparsity", None)
                report = prune(lm, calibration if _stage_needs_data(stage) else None, method=stage["method"],
                               sparsity=sparsity, pattern=pattern, device=compute, batch_size=batch_size,
                               progress=progress, **options).as_dict()
            else:
                dynamic_model, dynamic_report = make_dynamic(lm, calibration, **options, device=compute,
                                                             batch_size=batch_size, progress=progress)
                report = dynamic_report.as_dict() if hasattr(dynamic_report, "as_dict") else dict(dynamic_report)
                # The wrapper is measured like any model when it is a torch module (issue 4's
                # make_dynamic contract); otherwise the static model underneath is.
                final = dynamic_model if isinstance(dynamic_model, torch.nn.Module) else lm
            stage_reports.append({"kind": kind, "method": stage["method"], "options": options,
                                  "seconds": time.perf_counter() - t, "report": report})
    timings["prune_s"] = sum(s["seconds"] for s in stage_reports)
    perplexities["pruned"], speeds["pruned"] = evaluate(final)
    perplexities = {k: v for k, v in perplexities.items() if v is not None}
    speeds = {k: v for k, v in speeds.items() if v is not None}
    params_after, bytes_after = count_parameters(lm), weight_bytes(lm)

    unstructured = next((s for s in stage_reports if s["kind"] == "unstructured"), None)
    structured = next((s for s in stage_reports if s["kind"] == "structured"), None)
    methods = "+".join(s["method"] for s in stage_reports)
    run_report = {
        "llmprune_version": __version__,
        "command": "python -m llmprune " + shlex.join(argv),
        "model": model, "seed": seed, "device": str(compute), "dtype": dtype,
        "calib_data": list(calib_data) if needs_data else None,
        "eval_data": list(evaluate_sources) if evaluate_sources else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "recipe": {k: v for k, v in recipe.items()},
        "stages": stage_reports,
        "parameters": {"before": params_before, "after": params_after},
        "weight_bytes": {"before": bytes_before, "after": bytes_after},
        "perplexity": perplexities, "speed": speeds, "timings": timings,
        "peak_memory": {"rss_growth_prune_bytes": memory.growth},
        "storage": "dense safetensors" + (" with zeros (no sparse format)" if unstructured else ""),
    }
    # What the model card reads: the unstructured stage's report (or the structured one's).
    if unstructured is not None:
        run_report["prune"] = {**unstructured["report"], "method": methods}
    else:
        run_report["prune"] = {"method": methods, "nsamples": nsamples if needs_data else 0,
                               "seqlen": seqlen if needs_data else 0}
    if structured is not None and unstructured is None:
        run_report["structured"] = structured["report"]
    if unstructured is None and structured is None:  # dynamic only: nothing was removed
        card = _dynamic_card(base_model_id(model), run_report) + recipe_card_section(run_report)
    else:
        card = model_card(base_model_id(model), run_report) + recipe_card_section(run_report)

    def extra_files(folder: Path) -> None:
        (folder / RECIPE_FILE).write_text(recipe["yaml"], encoding="utf-8")
        if dynamic_model is not None:
            save_dynamic(dynamic_model, folder)

    timings["total_before_save_s"] = time.perf_counter() - started
    folder = save_folder(lm, tokenizer, target_folder, run_report, card, overwrite, extra_files=extra_files)

    ppl = (f"{perplexities['dense']['perplexity']:.2f} -> {perplexities['pruned']['perplexity']:.2f}"
           f"  [{perplexities['dense']['protocol']}]" if perplexities else "not evaluated")
    rows = [("recipe", f"{recipe['path']}" + (f" (overridden: {', '.join(recipe['overrides'])})"
                                              if recipe["overrides"] else "")),
            ("stages", " -> ".join(s["method"] for s in stage_reports))]
    if unstructured is not None:
        rows.append(("realised sparsity", f"{unstructured['report']['overall_sparsity']:.4f} of decoder linear weights"))
    rows += [("parameters", f"{params_before['nonzero']:,} -> {params_after['nonzero']:,} nonzero "
                            f"({params_after['parameters']:,} stored)"),
             ("perplexity", ppl)]
    if speeds:
        rows.append(speed_row(speeds))
    rows += [("time", f"stages {timings['prune_s']:.1f} s, total {time.perf_counter() - started:.1f} s"),
             ("output", str(folder))]
    print("\nllmprune summary", flush=True)
    print(_summary(rows), flush=True)
    if push:
        from .publish import push_folder

        url = push_folder(folder, push, private=bool(settings.get("private")))
        print(f"  published  {url}", flush=True)
    return run_report


def _dynamic_card(base_model: str, report: dict) -> str:
    """Model card of a run whose only stage is dynamic: no weight was removed."""
    import yaml

    ppl = report.get("perplexity", {})
    front = {"base_model": base_model, "library_name": "transformers", "tags": ["llmprune", "dynamic"],
             "llmprune": {"method": report["prune"]["method"],
                          **({"perplexity": {k: round(v["perplexity"], 4) for k, v in ppl.items()}} if ppl else {})}}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(base_model).name} with a dynamic stage", "",
             f"Made by [llmprune](https://pypi.org/project/llmprune/) from `{base_model}`. No weight was removed; "
             "the dynamic files in this folder decide per token how much of the network runs.", ""]
    if ppl:
        lines += [f"Perplexity {ppl['dense']['perplexity']:.3f} -> {ppl['pruned']['perplexity']:.3f} on "
                  f"{report.get('eval_data')}. Protocol: {ppl['dense']['protocol']}.", ""]
    lines += [f"Command: `{report.get('command', '')}`", "", "Details are in `llmprune.json`.", ""]
    return "\n".join(lines)


def recipe_card_section(report: dict) -> str:
    """The model card's account of the stages and the recipe used, verbatim."""
    lines = ["## Stages", ""]
    for i, stage in enumerate(report["stages"], 1):
        options = ", ".join(f"{k}={v}" for k, v in stage["options"].items()) or "defaults"
        extra = ""
        if stage["kind"] == "unstructured":
            extra = f"; realised sparsity {stage['report']['overall_sparsity']:.4f}"
            schedule = stage["report"].get("schedule") or {}
            if schedule.get("name", "uniform") != "uniform":
                extra += (f"; {schedule['name']} schedule, realised per layer "
                          + ", ".join(f"{x:.3f}" for x in stage["report"]["per_layer_sparsity"]))
        lines.append(f"{i}. {stage['kind']}: `{stage['method']}` ({options}){extra}")
    lines += ["", "## Recipe", "", f"Stored as `{RECIPE_FILE}` in this folder:", "", "```yaml",
              report["recipe"]["yaml"].rstrip(), "```", ""]
    return "\n".join(lines)

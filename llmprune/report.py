"""The one report builder (llmprune.json), the model card writer and the summary printer of a run.
Every run gets the same fields: version, command, versions, parameters, timings, placement, ..."""

from __future__ import annotations

import platform
import time
from pathlib import Path

RECIPE_FILE = "recipe.yaml"


def build(spec, loaded, results: list, measured: dict, memory: dict, estimate) -> dict:
    """llmprune.json of a run: shared fields, one section per stage, and (for the model card and
    older readers) ``prune`` / ``structured`` / ``dynamic`` sections as single-stage runs had."""
    import torch
    import transformers

    from . import __version__
    from .evaluate import count_parameters, weight_bytes

    # A run whose only stage is dynamic calls the after measurement "dynamic" (as it always has).
    after_key = "dynamic" if spec.recipe is None and all(s.kind == "dynamic" for s in spec.stages) else "pruned"
    perplexity = {k: measured[w]["perplexity"] for k, w in (("dense", "dense"), (after_key, "after"))
                  if measured[w].get("perplexity") is not None}
    speed = {k: measured[w]["speed"] for k, w in (("dense", "dense"), (after_key, "after"))
             if measured[w].get("speed") is not None}
    stages = [{"kind": s.kind, "method": s.method, "options": s.recipe_options(), "seconds": r.seconds,
               "report": r.report} for s, r in zip(spec.stages, results)]
    timings = dict(loaded.timings)
    timings["prune_s"] = sum(r.seconds for r in results)
    report = {
        "llmprune_version": __version__, "command": spec.command, "model": spec.model, "seed": spec.seed,
        "device": str(loaded.compute), "dtype": loaded.dtype,
        "calib_data": list(spec.calib_data) if spec.needs_data() else None,
        "eval_data": spec.eval_sources if loaded.model is not None else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "stages": stages, "perplexity": perplexity, "speed": speed, "timings": timings, "peak_memory": memory,
        "storage": "; ".join(dict.fromkeys(r.storage for r in results if r.storage)),
        "placement": {"mode": spec.mode, "device_map": spec.device_map if loaded.dispatched else None,
                      "hf_device_map": getattr(loaded.model, "hf_device_map", None) if loaded.dispatched else None,
                      "processes": loaded.group.world if loaded.group else 1},
        "memory_estimate": estimate.as_dict() if estimate else None,
    }
    if spec.stream:
        report["placement"]["activations_on_disk"] = bool(spec.activations_on_disk)
    if loaded.model is not None:
        report["parameters"] = {"before": loaded.parameters_before,
                                "after": count_parameters(loaded.model)}
        report["weight_bytes"] = {"before": loaded.bytes_before, "after": weight_bytes(loaded.model)}
    samples = {k: measured[w]["sample"] for k, w in (("dense", "dense"), (after_key, "after"))
               if measured[w].get("sample") is not None}
    if samples:
        report["sample"] = {"prompt": spec.sample_prompt, **samples}
    if spec.recipe is not None:
        report["recipe"] = dict(spec.recipe)
    _legacy_sections(spec, report, stages)
    return report


def _legacy_sections(spec, report: dict, stages: list) -> None:
    """``prune`` (what the card reads: the unstructured stage's report, or the method and sizes),
    ``structured`` and ``dynamic``."""
    unstructured = next((s for s in stages if s["kind"] == "unstructured"), None)
    structured = next((s for s in stages if s["kind"] == "structured"), None)
    dynamic = next((s for s in stages if s["kind"] == "dynamic"), None)
    methods = "+".join(s["method"] for s in stages)
    needs = spec.needs_data()
    if unstructured is not None:
        report["prune"] = {**unstructured["report"], "method": methods}
    else:
        report["prune"] = {"method": methods, "nsamples": spec.nsamples if needs else 0,
                           "seqlen": spec.seqlen if needs else 0}
    if structured is not None and unstructured is None:
        report["structured"] = structured["report"]
    if dynamic is not None:
        report["dynamic"] = dynamic["report"]


def card(spec, report: dict) -> str:
    """The model card (README.md): what was removed, the numbers, the recipe when there is one."""
    from .models.loading import base_model_id
    from .save import model_card, redact
    from .stages.dynamic import dynamic_card

    base = base_model_id(spec.model)
    if all(s.kind == "dynamic" for s in spec.stages):
        text = dynamic_card(base, report)
    elif all(s.kind == "recover" for s in spec.stages):
        from .stages.recover import recovery_card

        text = recovery_card(base, report)
    else:
        from .stages.recover import recovery_card_section

        text = model_card(base, report) + recovery_card_section(report)
    if spec.recipe is not None:
        text += recipe_card_section(report)
    return redact(text)


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


def summary_rows(spec, report: dict, results: list, folder, started: float, streamed: bool = False) -> list:
    """The summary: the recipe and stages, each stage's own lines, then the measurements."""
    rows = []
    if spec.recipe is not None:
        overrides = spec.recipe["overrides"]
        rows += [("recipe", f"{spec.recipe['path']}" + (f" (overridden: {', '.join(overrides)})" if overrides else "")),
                 ("stages", " -> ".join(s.method for s in spec.stages))]
    for stage, result in zip(spec.stages, results):
        rows += stage.summary_rows(result)
    if streamed:
        return rows + [("perplexity", "not evaluated (--stream); evaluate the output folder separately"),
                       ("time", f"prune {report['timings']['prune_s']:.1f} s, total "
                                f"{time.perf_counter() - started:.1f} s"),
                       ("peak memory", f"{report['peak_memory']['rss_peak_prune_bytes'] / 2**20:.0f} MiB RSS "
                                       "while pruning"), ("output", str(folder))]
    return rows + measurement_rows(report, folder) + [
        ("time", f"prune {report['timings']['prune_s']:.1f} s, total {time.perf_counter() - started:.1f} s"),
        ("peak memory", f"+{report['peak_memory']['rss_growth_prune_bytes'] / 2**20:.0f} MiB RSS while pruning"),
        ("output", str(folder))]


def measurement_rows(report: dict, folder) -> list:
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    file_bytes = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
    weights = report["weight_bytes"]
    rows = [("parameters", f"{before['nonzero']:,} -> {after['nonzero']:,} nonzero ({after['parameters']:,} stored)"),
            ("weights", f"{weights['before'] / 2**20:.1f} MiB -> {weights['after'] / 2**20:.1f} MiB in memory, "
                        f"{file_bytes / 2**20:.1f} MiB on disk")]
    ppl = report["perplexity"]
    after_key = next((k for k in ppl if k != "dense"), None)
    rows.append(("perplexity", f"{ppl['dense']['perplexity']:.2f} -> {ppl[after_key]['perplexity']:.2f}  "
                               f"[{ppl['dense']['protocol']}]" if after_key else "not evaluated"))
    speed = report["speed"]
    if speed:
        rows.append(speed_row(speed))
    sample = report.get("sample")
    if sample:
        rows += [("sample", f"{sample['prompt']!r} ->")] + [(f"  {k}", repr(v)) for k, v in sample.items()
                                                            if k != "prompt"]
    return rows


def speed_row(speeds: dict) -> tuple[str, str]:
    """The summary line comparing dense and pruned prefill/decode tokens/s."""
    dense = speeds["dense"]
    after = next(v for k, v in speeds.items() if k != "dense")
    text = (f"prefill {dense['prefill_tokens_per_s']:.0f} -> {after['prefill_tokens_per_s']:.0f} tokens/s, "
            f"decode {dense['decode_tokens_per_s']:.1f} -> {after['decode_tokens_per_s']:.1f} tokens/s")
    if after.get("draft_acceptance") is not None:
        text += f" (draft acceptance {after['draft_acceptance']:.2f})"
    return ("speed", text)


def format_rows(rows: list) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def print_summary(rows: list, title: str = "llmprune summary") -> None:
    print(f"\n{title}", flush=True)
    print(format_rows(rows), flush=True)

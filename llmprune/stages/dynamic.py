"""The dynamic stage: make the model decide per token how much of the network runs (early exit,
MLP skipping, or lossless self-speculative decoding; llmprune.dynamic). No weight is removed; the
fitted state is saved next to the weights. It needs the whole model in memory, in one process."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import UsageError
from ..options import Option
from . import Stage, StageResult

STORAGE = ("base weights unchanged (plain from_pretrained loads the static model); dynamic state in "
           "llmprune_dynamic.json/.safetensors")


class Dynamic(Stage):
    kind = "dynamic"
    order = 30
    placements = ("memory",)
    processes = False
    resumes = False
    speed_new_tokens = 128
    options = (
        Option("early_exit", bool, False,
               "tokens may stop at an exit layer (the default when no dynamic mode is named)"),
        Option("token_skip", bool, False, "tokens may skip a layer's MLP (fitted routers)"),
        Option("max_ppl_increase", float, None, "calibrate to at most this relative perplexity increase "
               "(default 0.05 = 5%)", minimum=0),
        Option("min_agreement", float, None, "calibrate to at least this top-1 agreement with the full model, "
               "e.g. 0.95", minimum=0, maximum=1),
        Option("exit_layers", "int_list", None, "layer counts after which tokens may exit, e.g. 8,12,16 (default "
               "every 2nd from L/4)", metavar="LIST"),
        Option("lossless", bool, False, "self-speculative decoding: the full model's greedy tokens, exactly"),
    )

    def check(self) -> None:
        from ..dynamic import _check_targets, parse_exit_layers

        v = self.values
        if not (v["early_exit"] or v["token_skip"] or v["lossless"]):
            v["early_exit"] = True
        if v["lossless"] and (v["early_exit"] or v["token_skip"]):
            raise UsageError("--lossless drafts with its own exit and keeps the full model's tokens; it does not "
                             "combine with --early-exit or --token-skip")
        if v["lossless"] and (v["max_ppl_increase"] is not None or v["min_agreement"] is not None):
            raise UsageError("--lossless is exact: --max-ppl-increase and --min-agreement do not apply")
        _check_targets(v["max_ppl_increase"], v["min_agreement"])
        if isinstance(v["exit_layers"], str):
            parse_exit_layers(v["exit_layers"], 10**9)  # the syntax now; the range once the model is known

    def check_model(self, model) -> None:
        from ..dynamic import parse_exit_layers

        parse_exit_layers(self.values["exit_layers"], len(model.get_decoder().layers))

    def tag(self) -> str:
        v = self.values
        if v["lossless"]:
            return "lossless"
        kinds = "-".join(k for k, on in (("exit", v["early_exit"]), ("skip", v["token_skip"])) if on)
        if v["min_agreement"] is not None and v["max_ppl_increase"] is None:
            return f"{kinds}-a{round(v['min_agreement'] * 100)}"
        return f"{kinds}-p{round((v['max_ppl_increase'] if v['max_ppl_increase'] is not None else 0.05) * 100)}"

    def memory_method(self) -> str:
        return "norms"

    def apply(self, run, checkpoint=None) -> StageResult:
        from ..dynamic import make_dynamic, save_dynamic

        started = time.perf_counter()
        model, report = make_dynamic(run.model, run.calibration, **self.values, device=run.compute,
                                     batch_size=run.batch_size, progress=run.progress)
        self.report = report
        return StageResult(report.as_dict(), time.perf_counter() - started, model=model,
                           extra_files=lambda folder: save_dynamic(model, folder), storage=STORAGE)

    def before_measure(self, model) -> None:
        state = getattr(model, "llmprune_dynamic", None)
        if state is not None:
            state.reset_stats()

    def after_measure(self, model, perplexity: dict | None, speed: dict | None) -> None:
        state = getattr(model, "llmprune_dynamic", None)
        if state is None:
            return
        if perplexity is not None:
            perplexity["avg_layers"] = state.summary()["avg_layers"]
            perplexity["mlp_skip_fraction"] = state.summary()["mlp_skip_fraction"]
        if speed is not None and state.stats["drafted"]:  # lossless with drafting
            speed["draft_acceptance"] = state.stats["accepted"] / state.stats["drafted"]

    def summary_rows(self, result: StageResult) -> list[tuple[str, str]]:
        report, v = self.report, self.values
        cal = report.calibration
        if v["lossless"]:
            draft = report.draft
            what = (f"lossless self-speculative decoding (draft exit {draft['draft_exit_layer']}, "
                    f"{draft['draft_tokens']} tokens, "
                    f"drafting {'on' if draft['drafting'] else 'off: predicted slower'})")
        else:
            modes = " + ".join(m for m, on in (("early exit", v["early_exit"]), ("MLP skipping", v["token_skip"]))
                               if on)
            targets = " and ".join(t for t in (
                None if report.max_ppl_increase is None else "ppl +" + format(report.max_ppl_increase, ".1%"),
                None if report.min_agreement is None else "agreement >= " + format(report.min_agreement, ".1%")) if t)
            what = f"{modes}; target {targets} ({'met' if report.target_met else 'NOT met'} on calibration)"
        return [("method", what),
                ("calibration", f"ppl x{cal['ppl_ratio']:.4f}, agreement {cal['agreement']:.3f}, "
                                f"{cal['avg_layers']:.2f} layers/token, MLP skipped {cal['mlp_skip_fraction']:.1%}")]


def dynamic_card(base_model: str, report: dict) -> str:
    """The model card of a run whose only stage is dynamic: no weight was removed."""
    import yaml

    dynamic = report["dynamic"]
    front = {"base_model": base_model, "library_name": "transformers", "tags": ["llmprune", "dynamic"],
             "llmprune": {"method": "dynamic", "exit_layers": dynamic["exit_layers"],
                          "exit_threshold": dynamic["exit_threshold"], "skip_threshold": dynamic["skip_threshold"],
                          "lossless": dynamic["lossless"]}}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(base_model).name} with dynamic inference (llmprune)", "",
             "The weights are the base model's, unchanged: `AutoModelForCausalLM.from_pretrained(folder)` loads the "
             "static model. `from_pretrained(folder, trust_remote_code=True)`, or "
             "`llmprune.dynamic.load_dynamic(folder)` (no code from the folder), loads the dynamic model: "
             "early exit with fitted exit maps and probes, MLP skipping with fitted routers, or lossless "
             "self-speculative decoding, as configured in `llmprune_dynamic.json`.", ""]
    ppl = report.get("perplexity") or {}
    if ppl:
        after = ppl.get("dynamic") or ppl.get("pruned")
        lines += [f"Perplexity {ppl['dense']['perplexity']:.3f} (full) -> {after['perplexity']:.3f} (dynamic); "
                  f"protocol: {ppl['dense']['protocol']}.", ""]
    lines += [f"Command: `{report['command']}`", "", "Details are in `llmprune.json`.", ""]
    return "\n".join(lines)

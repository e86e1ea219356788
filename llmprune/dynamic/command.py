"""``python -m llmprune --method dynamic``: load, calibrate, measure, make dynamic, measure, save."""

from __future__ import annotations

import platform
import shlex
import time
from pathlib import Path

import torch

from .. import data
from ..errors import UsageError
from ..evaluate import measure_speed, perplexity, tokenizer_adds_bos
from ..models.adapters import adapter_for
from ..models.loading import base_model_id, load_model
from ..save import check_output_folder, claim_output, redact, save_folder
from . import _check_targets, make_dynamic, parse_exit_layers, save_dynamic


def _tag(early_exit, token_skip, lossless, max_ppl_increase, min_agreement) -> str:
    if lossless:
        return "lossless"
    kinds = "-".join(k for k, on in (("exit", early_exit), ("skip", token_skip)) if on)
    target = f"a{round(min_agreement * 100)}" if min_agreement is not None and max_ppl_increase is None \
        else f"p{round((max_ppl_increase if max_ppl_increase is not None else 0.05) * 100)}"
    return f"{kinds}-{target}"


def run_dynamic(*, model: str, calib_data, nsamples: int, seqlen: int, seed: int, eval_data, eval_seqlen: int,
                eval_tokens: int, output, overwrite: bool, compute: torch.device, dtype: str, batch_size: int,
                trust_remote_code: bool, progress: bool, argv: list[str], early_exit: bool, token_skip: bool,
                max_ppl_increase, min_agreement, exit_layers, lossless: bool, speed: bool, default_output) -> dict:
    """The CLI's dynamic run; the generic options were checked by llmprune.cli.run."""
    started = time.perf_counter()
    if not (early_exit or token_skip or lossless):
        early_exit = True
    if lossless and (early_exit or token_skip):
        raise UsageError("--lossless drafts with its own exit and keeps the full model's tokens; it does not "
                         "combine with --early-exit or --token-skip")
    if lossless and (max_ppl_increase is not None or min_agreement is not None):
        raise UsageError("--lossless is exact: --max-ppl-increase and --min-agreement do not apply")
    _check_targets(max_ppl_increase, min_agreement)
    if isinstance(exit_layers, str):
        parse_exit_layers(exit_layers, 10**9)  # the syntax now; the range once the model is known
    evaluate_sources = None if [s.lower() for s in eval_data] == ["none"] else eval_data
    target_folder = check_output_folder(output if output is not None else default_output(
        model, "dynamic", _tag(early_exit, token_skip, lossless, max_ppl_increase, min_agreement)), overwrite, model=model)
    data.check_sources(calib_data)
    if evaluate_sources is not None:
        data.check_sources(evaluate_sources)
    claim_output(target_folder, overwrite)  # every check passed: lock the output for the whole run

    lm, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    adapter_for(lm)
    parse_exit_layers(exit_layers, len(lm.get_decoder().layers))
    calibration = data.calibration_ids(tokenizer, calib_data, nsamples, seqlen, seed)
    evaluation = None
    if evaluate_sources is not None:
        evaluation = data.evaluation_ids(tokenizer, evaluate_sources, eval_tokens or None, eval_seqlen)
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    lm.to(compute)

    def evaluate():
        state = getattr(lm, "llmprune_dynamic", None)
        if state is not None:
            state.reset_stats()
        ppl = perplexity(lm, evaluation, eval_seqlen, bos, compute, progress).as_dict() if evaluation is not None else None
        if ppl is not None and state is not None:
            ppl["avg_layers"] = state.summary()["avg_layers"]
            ppl["mlp_skip_fraction"] = state.summary()["mlp_skip_fraction"]
        speeds = measure_speed(lm, compute, new_tokens=128) if speed else None
        if speeds is not None and state is not None and state.stats["drafted"]:  # lossless with drafting
            speeds["draft_acceptance"] = state.stats["accepted"] / state.stats["drafted"]
        return ppl, speeds

    perplexities, speeds = {}, {}
    perplexities["dense"], speeds["dense"] = evaluate()
    _, report = make_dynamic(lm, calibration, early_exit=early_exit, token_skip=token_skip,
                             max_ppl_increase=max_ppl_increase, min_agreement=min_agreement, exit_layers=exit_layers,
                             lossless=lossless, device=compute, batch_size=batch_size, progress=progress)
    perplexities["dynamic"], speeds["dynamic"] = evaluate()
    perplexities = {k: v for k, v in perplexities.items() if v is not None}
    speeds = {k: v for k, v in speeds.items() if v is not None}
    lm.to("cpu")

    import transformers

    run_report = {
        "command": "python -m llmprune " + shlex.join(argv), "model": model, "seed": seed, "device": str(compute),
        "dtype": dtype, "calib_data": list(calib_data), "eval_data": list(evaluate_sources) if evaluate_sources else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "prune": {"method": "dynamic", "nsamples": nsamples, "seqlen": seqlen},
        "dynamic": report.as_dict(), "perplexity": perplexities, "speed": speeds,
        "storage": "base weights unchanged (plain from_pretrained loads the static model); dynamic state in "
                   "llmprune_dynamic.json/.safetensors",
    }
    card = _card(base_model_id(model), run_report)
    folder = save_folder(lm, tokenizer, target_folder, run_report, card, overwrite,
                         extra_files=lambda tmp: save_dynamic(lm, tmp))

    cal = report.calibration
    if lossless:
        what = (f"lossless self-speculative decoding (draft exit {report.draft['draft_exit_layer']}, "
                f"{report.draft['draft_tokens']} tokens, drafting {'on' if report.draft['drafting'] else 'off: predicted slower'})")
    else:
        what = (f"{'early exit' if early_exit else ''}{' + ' if early_exit and token_skip else ''}"
                f"{'MLP skipping' if token_skip else ''}; target "
                f"{'ppl +' + format(report.max_ppl_increase, '.1%') if report.max_ppl_increase is not None else ''}"
                f"{' and ' if report.max_ppl_increase is not None and report.min_agreement is not None else ''}"
                f"{'agreement >= ' + format(report.min_agreement, '.1%') if report.min_agreement is not None else ''}"
                f" ({'met' if report.target_met else 'NOT met'} on calibration)")
    rows = [("method", what),
            ("calibration", f"ppl x{cal['ppl_ratio']:.4f}, agreement {cal['agreement']:.3f}, "
                            f"{cal['avg_layers']:.2f} layers/token, MLP skipped {cal['mlp_skip_fraction']:.1%}")]
    if perplexities:
        rows.append(("perplexity", f"{perplexities['dense']['perplexity']:.2f} -> "
                                   f"{perplexities['dynamic']['perplexity']:.2f}  [{perplexities['dense']['protocol']}]"))
    if speeds:
        accepted = speeds["dynamic"].get("draft_acceptance")
        rows.append(("decode", f"{speeds['dense']['decode_tokens_per_s']:.1f} -> "
                               f"{speeds['dynamic']['decode_tokens_per_s']:.1f} tokens/s"
                               + (f" (draft acceptance {accepted:.2f})" if accepted is not None else "")))
    rows += [("time", f"total {time.perf_counter() - started:.1f} s"), ("output", str(folder))]
    width = max(len(k) for k, _ in rows)
    print("\nllmprune summary", flush=True)
    print("\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows), flush=True)
    return run_report


def _card(base_model: str, report: dict) -> str:
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
        lines += [f"Perplexity {ppl['dense']['perplexity']:.3f} (full) -> {ppl['dynamic']['perplexity']:.3f} (dynamic); "
                  f"protocol: {ppl['dense']['protocol']}.", ""]
    lines += [f"Command: `{report['command']}`", "", "Details are in `llmprune.json`.", ""]
    return redact("\n".join(lines))

"""The main job: load, calibrate, measure, prune, measure, save, summarise. Plain arguments only."""

from __future__ import annotations

import platform
import re
import shlex
import time
from pathlib import Path

import torch

from . import __version__, data, distributed, scale
from .api import check_device, check_pattern_fits, check_sparsity, prune, prune_checkpoint
from .checkpoint import remove_checkpoint
from .errors import UsageError
from .evaluate import count_parameters, measure_speed, perplexity, tokenizer_adds_bos, weight_bytes
from .memory import PeakRSS
from .methods import METHODS, parse_pattern
from .models.adapters import adapter_for
from .models.loading import base_model_id, load_model
from .placement import is_dispatched
from .save import check_output_folder, claim_output, model_card, save_folder
from .schedules import check_owl_options, parse_schedule
from .structured import check_structured, check_structured_options, prune_structured, structured_checkpoint


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise UsageError(f"--{name} must be at least {minimum}, got {value}")
    return value


def _default_output(model: str, method: str, tag: str) -> Path:
    """pruned/<model>-<method>-<tag>, with -2, -3, ... when taken (never replaces anything)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model).strip("-") or "model"
    base = Path("pruned") / f"{slug}-{method}-{tag}"
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def speed_row(speeds: dict) -> tuple[str, str]:
    """The summary line comparing dense and pruned prefill/decode tokens/s."""
    dense, pruned = speeds["dense"], speeds["pruned"]
    return ("speed", f"prefill {dense['prefill_tokens_per_s']:.0f} -> {pruned['prefill_tokens_per_s']:.0f} tokens/s, "
                     f"decode {dense['decode_tokens_per_s']:.1f} -> {pruned['decode_tokens_per_s']:.1f} tokens/s")


def _summary(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def run(*, model: str, method: str, sparsity, pattern: str, calib_data: list[str], nsamples: int,
        seqlen: int, seed: int, eval_data: list[str], eval_seqlen: int, eval_tokens: int,
        output: str | None, overwrite: bool, device: str, dtype: str, batch_size: int, blocksize: int,
        percdamp: float, trust_remote_code: bool, no_progress: bool, argv: list[str], heads: float = 0.0,
        ffn: float = 0.0, layers: int = 0, score: str = "wanda", allocation: str = "uniform",
        gqa: str = "groups", round_to: int = 1, round_heads_to: int = 1, speed: bool = False,
        checkpoint_dir: str | None = None, device_map: str | None = None, max_memory: str | None = None,
        offload_folder: str | None = None, stream: bool = False, activations_on_disk: str | None = None,
        force: bool = False, schedule: str = "uniform", owl_m: float = 5.0,
        owl_lambda: float = 0.08, push_to_hub: str | None = None, private: bool = False,
        early_exit: bool = False, token_skip: bool = False, max_ppl_increase: float | None = None,
        min_agreement: float | None = None, exit_layers: str | None = None, lossless: bool = False) -> dict:
    started = time.perf_counter()
    progress = not no_progress
    if no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    # Everything that can be checked without the model is checked first.
    structured = method == "structured"
    if method not in METHODS and not structured and method != "dynamic":
        raise UsageError(f"unknown method {method!r}; choose one of: {', '.join([*METHODS, 'structured', 'dynamic'])}")
    if method != "dynamic" and (early_exit or token_skip or lossless or exit_layers is not None
                                or max_ppl_increase is not None or min_agreement is not None):
        raise UsageError("--early-exit, --token-skip, --lossless, --exit-layers, --max-ppl-increase and "
                         "--min-agreement belong to --method dynamic")
    if method == "dynamic":
        from .dynamic.command import run_dynamic

        if checkpoint_dir is not None:
            raise UsageError("--checkpoint-dir is not supported by --method dynamic (its calibration is two passes)")
        placement = [f"--{k}" for k, v in (("device-map", device_map), ("max-memory", max_memory),
                     ("offload-folder", offload_folder), ("stream", stream), ("activations-on-disk", activations_on_disk)) if v]
        if placement:
            raise UsageError(f"{', '.join(placement)} not supported by --method dynamic (it loads the whole model)")
        for name, value, minimum in (("nsamples", nsamples, 1), ("seqlen", seqlen, 2), ("eval-seqlen", eval_seqlen, 2),
                                     ("eval-tokens", eval_tokens, 0), ("batch-size", batch_size, 1)):
            _positive(name, value, minimum)
        compute = check_device(device)
        dtype = ("bfloat16" if compute.type == "cuda" else "float32") if dtype == "auto" else dtype
        return run_dynamic(model=model, calib_data=calib_data, nsamples=nsamples, seqlen=seqlen, seed=seed,
                           eval_data=eval_data, eval_seqlen=eval_seqlen, eval_tokens=eval_tokens, output=output,
                           overwrite=overwrite, compute=compute, dtype=dtype, batch_size=batch_size,
                           trust_remote_code=trust_remote_code, progress=progress, argv=argv, early_exit=early_exit,
                           token_skip=token_skip, max_ppl_increase=max_ppl_increase, min_agreement=min_agreement,
                           exit_layers=exit_layers, lossless=lossless, speed=speed, default_output=_default_output)
    nm = parse_pattern(pattern)
    explicit = sparsity is not None
    if sparsity is None:
        sparsity = nm.sparsity if nm else 0.5
    target = check_sparsity(sparsity, nm, explicit=explicit)
    _positive("nsamples", nsamples)
    _positive("seqlen", seqlen, 2)
    _positive("eval-seqlen", eval_seqlen, 2)
    _positive("eval-tokens", eval_tokens, 0)
    _positive("batch-size", batch_size)
    _positive("blocksize", blocksize)
    if not 0 < percdamp < 10:
        raise UsageError(f"--percdamp must be in (0, 10), got {percdamp}")
    schedule = parse_schedule(schedule)
    if schedule != "uniform":
        if structured or nm is not None:
            raise UsageError("--schedule applies to unstructured sparsity (not to --method structured or N:M patterns)")
        if schedule == "owl":
            check_owl_options(owl_m, owl_lambda)
        if isinstance(schedule, list) and not explicit:
            target = sum(schedule) / len(schedule)
    if structured:  # before the output name below uses them
        check_structured_options(heads, ffn, layers, score, allocation, gqa, round_to, round_heads_to)
    compute = check_device(device)
    group = distributed.init_from_environment(compute)  # under accelerate launch: one of N processes
    if group is not None and compute.type == "cuda":
        compute = distributed.local_device()
    placement = scale.check_options(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                                    stream=stream, activations_on_disk=activations_on_disk, structured=structured,
                                    checkpoint_dir=checkpoint_dir, group=group, schedule=schedule)
    if dtype == "auto":
        dtype = "bfloat16" if compute.type == "cuda" else "float32"
    evaluate_sources = None if [s.lower() for s in eval_data] == ["none"] else eval_data
    if structured:
        tag = f"h{round(float(heads) * 100)}-f{round(float(ffn) * 100)}-l{layers}-{score}"
    else:
        tag = str(nm).replace(":", "of") if nm else f"{round(target * 100):d}"
        tag += "-owl" if schedule == "owl" else "-schedule" if isinstance(schedule, list) else ""
    target_folder = check_output_folder(output if output is not None else _default_output(model, method, tag),
                                        overwrite, model=model, checkpoint_dir=checkpoint_dir,
                                        offload_folder=offload_folder, activations_on_disk=activations_on_disk)
    data.check_sources(calib_data)
    if evaluate_sources is not None:
        data.check_sources(evaluate_sources)
    if private and not push_to_hub:
        raise UsageError("--private applies to --push-to-hub, which was not given")
    if push_to_hub:
        from .publish import check_repo_id

        check_repo_id(push_to_hub)

    needs_data = ((score != "magnitude" or layers > 0) if structured
                  else METHODS[method].needs_calibration or schedule == "owl")
    mode = scale.mode_of(placement["device_map"], stream)
    estimate = scale.check_memory(model, dtype=dtype, mode=mode, nsamples=nsamples, seqlen=seqlen,
                                  batch_size=batch_size, method="structured" if structured else method,
                                  needs_data=needs_data, max_memory=placement["max_memory"],
                                  activations_on_disk=bool(activations_on_disk), compute=compute, force=force,
                                  trust_remote_code=trust_remote_code, group=group)
    options = {"blocksize": blocksize, "percdamp": percdamp} if method == "sparsegpt" else {}
    if group is None or group.main:  # every check passed: lock the output for the whole run
        claim_output(target_folder, overwrite)
    if stream:
        return scale.run_streaming(model=model, method=method, target=target, nm=nm, calib_data=calib_data,
                                   nsamples=nsamples, seqlen=seqlen, seed=seed, target_folder=target_folder,
                                   overwrite=overwrite, compute=compute, dtype=dtype, batch_size=batch_size,
                                   options=options, progress=progress, activations_on_disk=activations_on_disk,
                                   trust_remote_code=trust_remote_code, argv=argv, estimate=estimate,
                                   started=started, group=group, schedule=schedule)

    timings = {}
    t = time.perf_counter()
    lm, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code,
                               offload_folder=offload_folder, **placement)
    dispatched = is_dispatched(lm)
    adapter_for(lm)
    structured_options = dict(heads=heads, ffn=ffn, layers=layers, score=score, allocation=allocation, gqa=gqa,
                              round_to=round_to, round_heads_to=round_heads_to)
    if structured:
        check_structured(lm.config, **structured_options)
    else:
        check_pattern_fits(lm, nm)
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    calibration = data.calibration_ids(tokenizer, calib_data, nsamples, seqlen, seed) if needs_data else None
    evaluation = None
    if evaluate_sources is not None:
        evaluation = data.evaluation_ids(tokenizer, evaluate_sources, eval_tokens or None, eval_seqlen)
    timings["data_s"] = time.perf_counter() - t

    checkpoint = None
    if checkpoint_dir is not None:  # opened now, so that a different run there is refused before any work
        # The calibration digest covers data, seed and sizes; they are named too so a refusal says what changed.
        identity = {"model": model, "calib_data": list(calib_data), "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
        if structured:
            checkpoint = structured_checkpoint(checkpoint_dir, lm, calibration, structured_options, batch_size, identity)
        else:
            if schedule != "uniform":
                identity["schedule"] = {"schedule": schedule, "owl_m": owl_m, "owl_lambda": owl_lambda}
            checkpoint = prune_checkpoint(checkpoint_dir, lm, calibration, method, target, nm, batch_size,
                                          identity, **options)

    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    measure = speed or structured

    def evaluate() -> tuple[dict | None, dict | None]:
        """Perplexity and speed; the whole model visits the compute device for these only, while
        pruning onloads one decoder layer at a time. A model placed by a device map runs where it
        is; with several processes only the main one evaluates."""
        if group is not None and not group.main:
            return None, None
        if not dispatched:
            lm.to(compute)
        try:
            ppl = perplexity(lm, evaluation, eval_seqlen, bos, compute, progress).as_dict() if evaluation is not None else None
            return ppl, (measure_speed(lm, compute) if measure else None)
        finally:
            if not dispatched:
                lm.to("cpu")

    perplexities, speeds = {}, {}
    perplexities["dense"], speeds["dense"] = evaluate()
    params_before, bytes_before = count_parameters(lm), weight_bytes(lm)
    if compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(compute)
    with PeakRSS() as memory:
        if structured:
            report = prune_structured(lm, calibration, **structured_options, device=compute,
                                      batch_size=batch_size, progress=progress, checkpoint=checkpoint)
        else:
            report = prune(lm, calibration, method=method, sparsity=target, pattern=nm, device=compute,
                           batch_size=batch_size, progress=progress, checkpoint=checkpoint, schedule=schedule,
                           owl_m=owl_m, owl_lambda=owl_lambda, **options)
    timings["prune_s"] = report.seconds
    peak = {"rss_before_prune_bytes": memory.start, "rss_peak_prune_bytes": memory.peak,
            "rss_growth_prune_bytes": memory.growth}
    if compute.type == "cuda":
        peak["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(compute)
    perplexities["pruned"], speeds["pruned"] = evaluate()
    perplexities = {k: v for k, v in perplexities.items() if v is not None}
    speeds = {k: v for k, v in speeds.items() if v is not None}
    params_after, bytes_after = count_parameters(lm), weight_bytes(lm)

    run_report = {
        "llmprune_version": __version__,
        "command": "python -m llmprune " + shlex.join(argv),
        "model": model,
        "seed": seed,
        "device": str(compute),
        "dtype": dtype,
        "calib_data": list(calib_data) if needs_data else None,
        "eval_data": list(evaluate_sources) if evaluate_sources else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        ("structured" if structured else "prune"): report.as_dict(),
        "parameters": {"before": params_before, "after": params_after},
        "weight_bytes": {"before": bytes_before, "after": bytes_after},
        "perplexity": perplexities,
        "speed": speeds,
        "timings": timings,
        "peak_memory": peak,
        "storage": "dense safetensors" + ("" if structured else " with zeros (no sparse format)"),
        "placement": {"mode": mode, "device_map": placement["device_map"] if dispatched else None,
                      "hf_device_map": getattr(lm, "hf_device_map", None) if dispatched else None,
                      "processes": group.world if group else 1},
        "memory_estimate": estimate.as_dict() if estimate else None,
    }
    if structured:
        run_report["prune"] = {"method": "structured", "nsamples": nsamples if needs_data else 0,
                               "seqlen": seqlen if needs_data else 0}
    timings["total_before_save_s"] = time.perf_counter() - started
    if group is not None and not group.main:  # only the main process writes
        distributed.barrier()
        return run_report
    folder = save_folder(lm, tokenizer, target_folder, run_report, model_card(base_model_id(model), run_report), overwrite)
    if checkpoint_dir is not None:  # the output is complete: the checkpoint has served
        remove_checkpoint(checkpoint_dir)
    file_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    ppl = (f"{perplexities['dense']['perplexity']:.2f} -> {perplexities['pruned']['perplexity']:.2f}"
           f"  [{perplexities['dense']['protocol']}]" if perplexities else "not evaluated")
    if structured:
        what = (f"structured (heads {heads:g}, ffn {ffn:g}, layers {layers}, score {score}, {allocation}, "
                f"gqa {gqa})")
        removed = (f"layers {report.removed_layers or 'none'}; layer sizes "
                   f"{'uniform ' + str(report.layer_sizes[0]) if report.uniform else 'per layer (see llmprune.json)'}")
    else:
        what = f"{method} ({report.pattern}, target {target:g}, schedule {report.schedule['name']})"
        removed = f"{report.overall_sparsity:.4f} of decoder linear weights"
        if report.schedule["name"] != "uniform":
            removed += " (per layer " + ", ".join(f"{x:.3f}" for x in report.per_layer_sparsity) + ")"
    rows = [("method", what), ("removed" if structured else "realised sparsity", removed),
            ("parameters", f"{params_before['nonzero']:,} -> {params_after['nonzero']:,} nonzero "
                           f"({params_after['parameters']:,} stored)"),
            ("weights", f"{bytes_before / 2**20:.1f} MiB -> {bytes_after / 2**20:.1f} MiB in memory, "
                        f"{file_bytes / 2**20:.1f} MiB on disk"),
            ("perplexity", ppl)]
    if speeds:
        rows.append(speed_row(speeds))
    rows += [("time", f"prune {timings['prune_s']:.1f} s, total {time.perf_counter() - started:.1f} s"),
             ("peak memory", f"+{memory.growth / 2**20:.0f} MiB RSS while pruning"),
             ("output", str(folder))]
    print("\nllmprune summary", flush=True)
    print(_summary(rows), flush=True)
    if push_to_hub:  # after the local folder is complete; a failure leaves it as it is
        from .publish import push_folder

        print(f"  published  {push_folder(folder, push_to_hub, private=private)}", flush=True)
    distributed.barrier()
    return run_report

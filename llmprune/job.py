"""One job: a run is a ``RunSpec`` (model, data, placement, output, stages) executed by ``run``:

    check every stage and the run (before any work) -> load once -> measure the dense model ->
    for each stage: apply (resuming from --checkpoint-dir) -> measure -> one report -> one writer

The command line builds a one-stage spec from flags, a recipe several stages, ``sweep`` shares one
``Loaded`` model between many stages, ``eval`` loads and measures with no stage.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import report as reports
from .errors import UsageError
from .limits import MAX_DATA_BYTES
from .options import Option
from .save import WRITER_OPTIONS

RUN_OPTIONS = (
    Option("model", str, None, "Hub id, local HF folder, or built-in alias: llama / smollm2 (SmolLM2-135M, offline)"),
    Option("calib_data", "str_list", ["default"], "calibration sources (default: the offline corpus)"),
    Option("nsamples", int, 32, "calibration windows (default 32; papers: 128)", minimum=1),
    Option("seqlen", int, 512, "tokens per calibration window (default 512; papers: 2048)", minimum=2),
    Option("seed", int, 0, "seed of the calibration windows"),
    Option("eval_data", "str_list", ["default"], 'perplexity sources, or "none"'),
    MAX_DATA_BYTES,
    Option("eval_seqlen", int, 1024, "tokens per perplexity window (default 1024)", minimum=2),
    Option("eval_tokens", int, 16384, "evaluate on at most this many tokens (default 16384; 0 = all)", minimum=0),
    Option("output", str, None, "output folder (default: pruned/<model>-<method>-<settings>)"),
    Option("overwrite", bool, False, "replace an empty output folder or one an earlier llmprune run wrote (it holds "
           "llmprune.json); never any other folder", in_recipes=False),
    Option("device", str, "auto", "cpu | cuda | cuda:N | auto (default: cuda if available)"),
    Option("dtype", str, "auto", "auto | float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)",
           choices=("auto", "float32", "bfloat16", "float16")),
    Option("batch_size", int, 1, "calibration sequences per forward call", minimum=1),
    Option("speed", bool, False, "measure prefill/decode tokens/s before and after (always on for structured)"),
    Option("no_speed", bool, False, "do not measure speed (also not for structured)"),
    Option("no_cache", bool, False, "measure the dense perplexity again even when a cached one matches"),
    Option("checkpoint_dir", str, None, "commit every finished layer to DIR; rerunning the same command resumes "
           "there (a different command is refused); DIR is deleted once the output is written", metavar="DIR"),
    Option("device_map", str, None, "load through accelerate: auto | balanced | balanced_low_0 | sequential | "
           "FILE.json ({module: device}); each layer is pruned where it lives (GPUs, CPU, disk)", metavar="MAP"),
    Option("max_memory", str, None, "with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB",
           metavar="SPEC"),
    Option("offload_folder", str, None, "with --device-map: where weights that fit nowhere else are offloaded",
           metavar="DIR"),
    Option("stream", bool, False, "models larger than memory: read, prune and write one decoder layer at a time "
           "(sharded output; no perplexity)"),
    Option("activations_on_disk", str, None, "with --stream: keep calibration activations in memory-mapped files "
           "under DIR", metavar="DIR"),
    Option("force", bool, False, "run even when the memory estimate says it will not fit"),
    Option("push_to_hub", str, None, "upload the output folder to this Hugging Face Hub repository (token: HF_TOKEN "
           "or `hf auth login`); the local folder is written first and kept either way", metavar="REPO_ID"),
    Option("private", bool, False, "with --push-to-hub: create the repository private"),
    Option("trust_remote_code", bool, False, "allow a model folder's own Python code", in_recipes=False),
    Option("no_progress", bool, False, "no progress bars"),
    *WRITER_OPTIONS,
)
PLACEMENT_OPTIONS = ("device_map", "max_memory", "offload_folder", "stream", "activations_on_disk", "force")


@dataclass
class RunSpec:
    """Everything a run needs, checked. ``values`` holds the RUN_OPTIONS (data, placement, output)."""

    values: dict
    stages: list = field(default_factory=list)
    command: str = ""
    recipe: dict | None = None   # path, name, overrides, yaml: a recipe run
    sample_prompt: str | None = "The capital of France is"

    def __getattr__(self, name):  # spec.nsamples, spec.model, ...
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    @property
    def eval_sources(self) -> list | None:
        return None if [s.lower() for s in self.eval_data] == ["none"] else list(self.eval_data)

    @property
    def progress(self) -> bool:
        return not self.no_progress

    @property
    def mode(self) -> str:
        return "stream" if self.stream else "offload" if self.device_map is not None else "memory"

    def needs_data(self) -> bool:
        return any(stage.needs_data() for stage in self.stages)

    def measures_speed(self) -> bool:
        return not self.no_speed and (self.speed or any(s.measures_speed for s in self.stages))


@dataclass
class Loaded:
    """A loaded model and its data, shared by the stages of a run (and the runs of a sweep)."""

    spec: RunSpec
    model: object
    tokenizer: object
    compute: object
    dtype: str
    group: object = None
    calibration: object = None
    evaluation: object = None
    bos: int | None = None
    dispatched: bool = False
    outlier_ratios: list | None = None  # OWL ratios measured once on the dense model (a sweep)
    parameters_before: dict | None = None
    bytes_before: int | None = None
    timings: dict = field(default_factory=dict)

    def __getattr__(self, name):  # batch_size, progress, activations_on_disk, trust_remote_code
        spec = self.__dict__.get("spec")
        if spec is not None and name != "spec":
            return getattr(spec, name)
        raise AttributeError(name)


def resolve_dtype(dtype: str, compute) -> str:
    """"auto": bfloat16 on CUDA, float32 elsewhere."""
    return ("bfloat16" if compute.type == "cuda" else "float32") if dtype == "auto" else dtype


def default_output(model: str, method: str, tag: str, base: str = "pruned") -> Path:
    """pruned/<model>-<method>-<tag>, with -2, -3, ... when taken (never replaces anything)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or model).strip("-") or "model"
    first = Path(base) / (f"{slug}-{method}-{tag}" if method else slug)
    candidate, n = first, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = first.with_name(f"{first.name}-{n}")
    return candidate


def check_placement(spec: RunSpec, group) -> None:
    """Refuse, with one line, only the stage/placement combinations that cannot work."""
    mode = spec.mode
    for stage in spec.stages:
        if mode not in stage.placements:
            flag = {"stream": "--stream", "offload": "--device-map"}[mode]
            whole = mode == "offload" or "memory" in stage.placements
            raise UsageError(f"{flag} is not supported by --method {stage.method} "
                             f"({'it loads the whole model' if whole else ''})"
                             .replace(" ()", ""))
        if group is not None and not stage.processes:
            raise UsageError(f"--method {stage.method} runs in one process (not under accelerate launch)")
    if spec.stream and len(spec.stages) != 1:
        raise UsageError("--stream runs one unstructured stage (it writes each layer as it is pruned)")
    if spec.checkpoint_dir is not None and not any(stage.resumes for stage in spec.stages):
        raise UsageError(f"--checkpoint-dir is not supported by --method {spec.stages[0].method} "
                         "(its calibration is two passes)")


def prepare(spec: RunSpec) -> dict:
    """Every check that needs no model, in one place; returns what loading needs."""
    from . import data, distributed, scale
    from .api import check_device

    if spec.progress is False:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    compute = check_device(spec.device)
    group = distributed.init_from_environment(compute) if spec.stages else None
    if group is not None and compute.type == "cuda":
        compute = distributed.local_device()
    schedule = next((getattr(s, "schedule", "uniform") for s in spec.stages if s.kind == "unstructured"), "uniform")
    placement = scale.check_options(device_map=spec.device_map, max_memory=spec.max_memory,
                                    offload_folder=spec.offload_folder, stream=spec.stream,
                                    activations_on_disk=spec.activations_on_disk,
                                    structured=any(s.kind == "structured" for s in spec.stages),
                                    checkpoint_dir=spec.checkpoint_dir, group=group, schedule=schedule)
    check_placement(spec, group)
    dtype = resolve_dtype(spec.dtype, compute)
    data.check_sources(spec.calib_data)
    if spec.eval_sources is not None:
        data.check_sources(spec.eval_sources)
    if spec.save_format == "sparse" and not any(s.leaves_zeros() for s in spec.stages):
        raise UsageError("--save-format sparse: this run leaves no zeros to gain from (an unstructured or N:M "
                         "stage, or recovery of such a model, does); save it dense")
    if spec.private and not spec.push_to_hub:
        raise UsageError("--private applies to --push-to-hub, which was not given")
    if spec.push_to_hub:
        from .publish import check_repo_id

        check_repo_id(spec.push_to_hub)
    return {"compute": compute, "group": group, "dtype": dtype, "placement": placement}


def target_folder(spec: RunSpec) -> Path:
    """The output folder, checked (read only) against the folders the run reads or works in."""
    from .guard import check_output_folder

    if spec.output is not None:
        target = spec.output
    elif spec.recipe is not None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.recipe["name"]).strip("-") or "run"
        target = default_output(spec.model, "recipe", name)
    else:
        target = default_output(spec.model, spec.stages[0].method, spec.stages[0].tag())
    return check_output_folder(target, spec.overwrite, model=spec.model, checkpoint_dir=spec.checkpoint_dir,
                               offload_folder=spec.offload_folder, activations_on_disk=spec.activations_on_disk)


def estimate_memory(spec: RunSpec, prepared: dict):
    """The memory estimate before loading, sized by the heaviest statistics of any stage."""
    from . import scale

    kinds = [stage.memory_method() for stage in spec.stages] or ["none"]
    heaviest = next((m for m in ("sparsegpt", "hessian", "structured", "wanda", "norms") if m in kinds), kinds[0])
    estimate = scale.check_memory(spec.model, dtype=prepared["dtype"], mode=spec.mode, nsamples=spec.nsamples,
                              seqlen=spec.seqlen, batch_size=spec.batch_size, method=heaviest,
                              needs_data=spec.needs_data(), max_memory=prepared["placement"]["max_memory"],
                              activations_on_disk=bool(spec.activations_on_disk), compute=prepared["compute"],
                              force=spec.force, trust_remote_code=spec.trust_remote_code, group=prepared["group"])
    for stage in spec.stages:
        estimate = stage.estimate_memory(spec, prepared, estimate)
    return estimate


def load(spec: RunSpec, prepared: dict) -> Loaded:
    """Load the model once, check it against every stage, tokenise the data."""
    from . import data
    from .evaluate import tokenizer_adds_bos
    from .models.adapters import adapter_for
    from .models.loading import load_model
    from .placement import is_dispatched

    t = time.perf_counter()
    model, tokenizer = load_model(spec.model, dtype=prepared["dtype"], trust_remote_code=spec.trust_remote_code,
                                  offload_folder=spec.offload_folder, **prepared["placement"])
    if spec.stages:  # a run with no stage (eval) measures any causal LM
        adapter_for(model)
    for stage in spec.stages:
        stage.check_model(model)
    run = Loaded(spec, model, tokenizer, prepared["compute"], prepared["dtype"], group=prepared["group"],
                 dispatched=is_dispatched(model))
    run.timings["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if spec.needs_data():
        run.calibration = data.calibration_ids(tokenizer, spec.calib_data, spec.nsamples, spec.seqlen, spec.seed)
    if spec.eval_sources is not None:
        run.evaluation = data.evaluation_ids(tokenizer, spec.eval_sources, spec.eval_tokens or None, spec.eval_seqlen)
    run.timings["data_s"] = time.perf_counter() - t
    run.bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    return run


def measure(run: Loaded, model, *, dense: bool, speed: bool, new_tokens: int = 64) -> dict:
    """Perplexity, speed and one sample completion of ``model``. The whole model visits the
    compute device for these only; a model placed by a device map runs where it is; with several
    processes only the main one measures. The dense perplexity comes from the cache when the same
    model, data and protocol were measured before."""
    from . import cache
    from .evaluate import measure_speed, perplexity

    if run.group is not None and not run.group.main:
        return {}
    if not run.dispatched:
        model.to(run.compute)
    try:
        result = {}
        if run.evaluation is not None:
            key = cache.dense_key(run) if dense and not run.spec.no_cache else None
            result["perplexity"] = cache.read(key)
            if result["perplexity"] is None:
                result["perplexity"] = perplexity(model, run.evaluation, run.spec.eval_seqlen, run.bos, run.compute,
                                                  run.progress).as_dict()
                cache.write(key, result["perplexity"])
        if speed:
            result["speed"] = measure_speed(model, run.compute, new_tokens=new_tokens, progress=run.progress)
        if run.spec.sample_prompt:
            result["sample"] = sample_completion(model, run.tokenizer, run.spec.sample_prompt, run.compute)
        return result
    finally:
        if not run.dispatched:
            model.to("cpu")


def sample_completion(model, tokenizer, prompt: str, device, new_tokens: int = 12) -> str:
    """The model's greedy continuation of ``prompt`` (``new_tokens`` tokens), as text."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def open_checkpoints(spec: RunSpec, run: Loaded) -> list:
    """One checkpoint per resumable stage: the folder itself for one stage, stage-N-kind inside it
    for several. Opened before any work, so that a different run there is refused at once."""
    if spec.checkpoint_dir is None:
        return [None] * len(spec.stages)
    # The calibration digest covers data, seed and sizes; they are named too so a refusal says what changed.
    identity = {"model": spec.model, "calib_data": list(spec.calib_data), "nsamples": spec.nsamples,
                "seqlen": spec.seqlen, "seed": spec.seed}
    if len(spec.stages) == 1:
        return [spec.stages[0].open_checkpoint(spec.checkpoint_dir, run, identity)]
    # Later stages start from the model the earlier ones leave: they are opened as they come.
    return ["later"] * len(spec.stages)


def checkpoint_folders(spec: RunSpec) -> list:
    if spec.checkpoint_dir is None:
        return []
    if len(spec.stages) == 1:
        return [spec.checkpoint_dir]
    return [str(Path(spec.checkpoint_dir) / f"stage-{i}-{s.kind}") for i, s in enumerate(spec.stages) if s.resumes]


def apply_stages(spec: RunSpec, run: Loaded, checkpoints: list) -> list:
    """Run every stage in order on run.model; returns their StageResults."""
    identity = {"model": spec.model, "calib_data": list(spec.calib_data), "nsamples": spec.nsamples,
                "seqlen": spec.seqlen, "seed": spec.seed}
    results = []
    for i, (stage, checkpoint) in enumerate(zip(spec.stages, checkpoints)):
        if checkpoint == "later":
            checkpoint = (stage.open_checkpoint(str(Path(spec.checkpoint_dir) / f"stage-{i}-{stage.kind}"), run,
                                                identity) if stage.resumes else None)
        results.append(stage.apply(run, checkpoint))
    return results


def run(spec: RunSpec) -> dict:
    """Execute a run spec; returns its report (llmprune.json). Local data is read under the run's cap."""
    from .data import max_data_bytes

    with max_data_bytes(spec.max_data_bytes):
        return _run(spec)


def _run(spec: RunSpec) -> dict:
    started = time.perf_counter()
    prepared = prepare(spec)
    folder = target_folder(spec)
    estimate = estimate_memory(spec, prepared)
    if prepared["group"] is None or prepared["group"].main:  # every check passed: lock the output for the run
        from .guard import claim_output

        claim_output(folder, spec.overwrite)
    if spec.stream:
        return run_streamed(spec, prepared, folder, estimate, started)
    loaded = load(spec, prepared)
    checkpoints = open_checkpoints(spec, loaded)
    measured = {"dense": measure(loaded, loaded.model, dense=True, speed=spec.measures_speed(),
                                 new_tokens=_new_tokens(spec))}
    from .evaluate import count_parameters, weight_bytes

    loaded.parameters_before, loaded.bytes_before = count_parameters(loaded.model), weight_bytes(loaded.model)
    results, memory = _apply_measured(spec, loaded, checkpoints)
    final = next((r.model for r in reversed(results) if r.model is not None), loaded.model)
    for stage in spec.stages:
        stage.before_measure(final)
    measured["after"] = measure(loaded, final, dense=False, speed=spec.measures_speed(), new_tokens=_new_tokens(spec))
    for stage in spec.stages:
        stage.after_measure(final, measured["after"].get("perplexity"), measured["after"].get("speed"))
    report = reports.build(spec, loaded, results, measured, memory, estimate)
    report["timings"]["total_before_save_s"] = time.perf_counter() - started
    return write(spec, loaded, report, results, folder, started)


def _new_tokens(spec: RunSpec) -> int:
    return max([64] + [stage.speed_new_tokens for stage in spec.stages])


def _apply_measured(spec: RunSpec, loaded: Loaded, checkpoints: list) -> tuple[list, dict]:
    """apply_stages with the peak memory it took (host RSS, and CUDA when computing there)."""
    import torch

    from .memory import PeakRSS

    if loaded.compute.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.compute)
    with PeakRSS() as rss:
        results = apply_stages(spec, loaded, checkpoints)
    memory = {"rss_before_prune_bytes": rss.start, "rss_peak_prune_bytes": rss.peak,
              "rss_growth_prune_bytes": rss.growth}
    if loaded.compute.type == "cuda":
        memory["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(loaded.compute)
    return results, memory


def write(spec: RunSpec, loaded: Loaded, report: dict, results: list, folder: Path, started: float) -> dict:
    """The one writer: the output folder (weights, config, tokenizer, card, llmprune.json, the
    stages' own files, the recipe), then the summary, then the optional upload."""
    from . import distributed
    from .checkpoint import remove_checkpoint
    from .save import save_folder

    if loaded.group is not None and not loaded.group.main:  # only the main process writes
        distributed.barrier()
        return report

    def extra_files(tmp: Path) -> None:
        if spec.recipe is not None:
            (tmp / reports.RECIPE_FILE).write_text(spec.recipe["yaml"], encoding="utf-8")
        for result in results:
            if result.extra_files is not None:
                result.extra_files(tmp)

    report["save_format"] = spec.save_format
    if spec.save_format == "sparse":
        report["storage"] = "sparse safetensors: pruned linear weights as non-zero values plus a bitmask"
    saved = save_folder(loaded.model, loaded.tokenizer, folder, report, reports.card(spec, report), spec.overwrite,
                        extra_files=extra_files, save_format=spec.save_format)
    for checkpoint in checkpoint_folders(spec):  # the output is complete: the checkpoints have served
        remove_checkpoint(checkpoint)
    if spec.checkpoint_dir is not None and len(spec.stages) > 1:
        remove_checkpoint(spec.checkpoint_dir)
    reports.print_summary(reports.summary_rows(spec, report, results, saved, started))
    publish(spec, saved)
    distributed.barrier()
    return report


def publish(spec: RunSpec, folder: Path) -> None:
    if spec.push_to_hub:  # after the local folder is complete; a failure leaves it as it is
        from .publish import push_folder

        print(f"  published  {push_folder(folder, spec.push_to_hub, private=spec.private)}", flush=True)


def run_streamed(spec: RunSpec, prepared: dict, folder: Path, estimate, started: float) -> dict:
    """--stream: prune layer by layer from the checkpoint's shards into the output folder's shards
    (written atomically, by the main process only). No perplexity: the whole model is never in
    memory; evaluate the output folder on its own."""
    from contextlib import nullcontext

    from transformers import AutoTokenizer

    from . import data, distributed
    from .memory import PeakRSS, allocate_large_blocks_with_mmap, release_free_heap
    from .models.loading import resolve_model
    from .save import atomic_folder, write_companions

    source = Path(resolve_model(spec.model)).expanduser()
    if not source.is_dir():
        raise UsageError(f"--stream reads a local model folder (or a built-in alias), got {spec.model!r}")
    stage, group = spec.stages[0], prepared["group"]
    allocate_large_blocks_with_mmap()  # freed tensors go back to the system at once
    loaded = Loaded(spec, None, None, prepared["compute"], prepared["dtype"], group=group)
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
    if spec.needs_data():
        loaded.calibration = data.calibration_ids(tokenizer, spec.calib_data, spec.nsamples, spec.seqlen, spec.seed)
    del tokenizer  # tens of MiB while pruning; read again to be saved
    release_free_heap()  # tokenising the whole text left freed blocks behind
    loaded.timings["data_s"] = time.perf_counter() - t
    main = group is None or group.main
    with (atomic_folder(folder, spec.overwrite) if main else nullcontext(None)) as tmp:
        with PeakRSS() as rss:
            pruned, config = stage.stream(source, tmp, loaded.calibration, loaded)
        from .stages import StageResult

        storage = ("sparse safetensors: pruned linear weights as non-zero values plus a bitmask, sharded with an "
                   "index") if spec.save_format == "sparse" else ("dense safetensors with zeros (no sparse format), "
                                                                  "sharded with an index")
        result = StageResult(pruned.as_dict(), pruned.seconds, storage=storage)
        memory = {"rss_before_prune_bytes": rss.start, "rss_peak_prune_bytes": rss.peak,
                  "rss_growth_prune_bytes": rss.growth}
        report = reports.build(spec, loaded, [result], {"dense": {}, "after": {}}, memory, estimate)
        report["save_format"] = spec.save_format
        report["timings"]["total_before_save_s"] = time.perf_counter() - started
        if main:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
            write_companions(tmp, config, tokenizer, report, reports.card(spec, report))
            if spec.save_format == "sparse":
                from .sparse_format import names_from_config, sparsify_folder

                sparsify_folder(tmp, names_from_config(tmp))
    distributed.barrier()
    if main:
        reports.print_summary(reports.summary_rows(spec, report, [result], folder, started, streamed=True))
    return report

"""Recovery after pruning: distil the pruned model (the student) from the dense one (the teacher).

The student keeps its shape and its exact zeros:

- LoRA (through peft): every adapted linear layer computes ``W x + (M * s B A) x``, where ``M`` is
  the 0/1 mask of W's nonzeros (``W != 0``), so training only ever sees a delta that cannot touch a
  removed weight; the merge is ``W <- where(M, W + s B A, W)``, which leaves every zero (and its
  sign bit) exactly as it was. This is SQFT's "train with the masked delta"; peft 0.21 has no such
  option, so each adapted ``lora.Linear`` gets a masked forward and delta here.
- Full fine-tuning: the gradient of every parameter with zeros is multiplied by its mask before
  the optimiser step (AdamW with no weight decay then moves no masked weight, to the bit).

Structured students (fewer heads, narrower FFNs, fewer or uneven layers) train as they are: no
shape and no config changes. The loss is a weighted sum of

- KL(teacher || student) of the next-token distributions at temperature T (times T^2);
- the per-layer normalised hidden-state MSE of SquareHead, sum_l ||h_s - h_t||^2 / ||h_t||^2 over
  corresponding layers (same count, or the teacher's kept layers when layers were removed);
- the plain language-model loss (cross entropy of the next token).

The loop runs through accelerate (CPU, one GPU, data parallel under ``accelerate launch``, mixed
precision: bf16 or fp16 autocast on a GPU, bf16 on the CPU when asked for). Data order is fixed
by the seed: the training windows are a seeded permutation of non-overlapping windows of the
training text, and step s reads the windows s*G .. (s+1)*G-1 (G = batch x accumulation x
processes; ``window_rows`` says which process reads which). ``RecoverCheckpoint`` commits the trainable tensors, the
optimiser state, the step, the RNG state and the curve every N steps, so an interrupted run resumes
to bitwise the same final weights.
"""

from __future__ import annotations

import json
import math
import time
import types
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError


@dataclass
class Settings:
    """The recovery options (``recover_<name>`` in llmprune.stages.recover), checked."""

    tokens: int = 100_000
    data: list = field(default_factory=lambda: ["default"])
    teacher: str | None = None
    mode: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list | None = None
    lr: float | None = None
    warmup: float = 0.05
    seqlen: int = 256
    batch: int = 4
    accumulation: int = 1
    seed: int = 0
    kl: float = 1.0
    temperature: float = 1.0
    hidden: float = 0.0
    lm: float = 0.0
    curve_every: int = 0
    curve_tokens: int = 8192
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    mixed_precision: str = "auto"

    @classmethod
    def from_values(cls, values: dict, prefix: str = "recover_") -> Settings:
        names = {f.name for f in fields(cls)}
        given = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
        return cls(**{k: v for k, v in given.items() if k in names})

    @property
    def learning_rate(self) -> float:
        """The given rate, else 2e-4 for LoRA and 2e-5 for full fine-tuning."""
        return self.lr if self.lr is not None else (2e-4 if self.mode == "lora" else 2e-5)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"lr": self.learning_rate}


# --- checks made before any training ------------------------------------------------------------------


def check_teacher(student_config, student_source: str | None, teacher: str, trust_remote_code: bool = False) -> None:
    """Refuse a teacher that cannot teach this student: another vocabulary or tokenizer, another
    hidden size. Reads only configs and tokenizers."""
    from transformers import AutoConfig, AutoTokenizer

    from .models.loading import resolve_model

    source = resolve_model(teacher)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as error:  # not a model: one line
        raise UsageError(f"--teacher {teacher!r} is not a model: {' '.join(str(error).split())[:200]}") from None
    if getattr(config, "vocab_size", None) != student_config.vocab_size:
        raise UsageError(f"--teacher {teacher!r} has a vocabulary of {getattr(config, 'vocab_size', None)} tokens, "
                         f"the student {student_config.vocab_size}: distillation needs the same tokenizer")
    if getattr(config, "hidden_size", None) != student_config.hidden_size:
        raise UsageError(f"the student's hidden size {student_config.hidden_size} differs from the teacher's "
                         f"{getattr(config, 'hidden_size', None)} ({teacher!r}); recovery expects the teacher the "
                         "student was pruned from")
    if student_source:
        try:
            theirs = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code).get_vocab()
            ours = AutoTokenizer.from_pretrained(student_source, trust_remote_code=trust_remote_code).get_vocab()
        except Exception as error:
            why = " ".join(str(error).split())[:200]
            raise UsageError(f"cannot read the tokenizers to compare them: {why}") from None
        if theirs != ours:
            raise UsageError(f"--teacher {teacher!r} has another tokenizer than the student (their vocabularies "
                             "differ)")


def layer_pairs(student_layers: int, teacher_layers: int, removed: list | None) -> list[tuple[int, int]] | None:
    """(student layer, teacher layer) pairs whose outputs correspond, or None when there is no
    obvious mapping: the same count pairs i with i; a student with layers removed pairs its i-th
    layer with the i-th of the teacher's kept layers, when the removed indices are known."""
    if student_layers == teacher_layers:
        return [(i, i) for i in range(student_layers)]
    if removed is not None and teacher_layers - len(removed) == student_layers:
        kept = [i for i in range(teacher_layers) if i not in set(removed)]
        return list(enumerate(kept))
    return None


# --- data ----------------------------------------------------------------------------------------------


def training_windows(tokenizer, sources, tokens: int, seqlen: int, seed: int, per_step: int) -> torch.Tensor:
    """[n, seqlen] training windows in the order they are read: seeded permutations of the
    non-overlapping windows of the training text, one after another until ``tokens`` tokens
    (rounded up to whole steps of ``per_step`` windows) are covered."""
    from . import data

    texts = data.load_texts(sources, "calibration")
    ids = data._encode(tokenizer, "\n\n".join(texts))  # [T]
    available = ids.numel() // seqlen
    if available < 1:
        raise UsageError(f"the training text has {ids.numel()} tokens, fewer than one --recover-seqlen window of "
                         f"{seqlen}")
    windows = ids[: available * seqlen].view(available, seqlen)
    needed = math.ceil(tokens / (seqlen * per_step)) * per_step
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(available, generator=generator) for _ in range(math.ceil(needed / available))])
    return windows[order[:needed]]


# --- what trains: masked LoRA or masked full fine-tuning -----------------------------------------------


def default_targets(model) -> list[str]:
    """The decoder's linear layers, by their last name (q_proj, ..., down_proj), as the adapter says."""
    from .models.adapters import adapter_for

    names = [name for group in adapter_for(model).input_groups for name in group]
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))


def _masked_forward(self, x, *args, **kwargs):
    """lora.Linear.forward with the delta masked: W x + (M * s B A) x ([..., in] -> [..., out]).
    Without dropout the two are one matrix product, (W + M * s B A) x: three products per layer
    in forward and backward, as for full fine-tuning, instead of five."""
    name = self.active_adapters[0]
    base = self.base_layer
    if isinstance(self.lora_dropout[name], nn.Identity):
        weight = base.weight + _masked_delta(self, name).to(base.weight.dtype)
        return F.linear(x, weight, base.bias)
    result = base(x, *args, **kwargs)
    x = self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype))
    return result + F.linear(x, _masked_delta(self, name)).to(result.dtype)


def _masked_delta(self, name: str) -> torch.Tensor:
    """[out, in] M * s B A."""
    delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
    return delta * self.llmprune_mask


def add_masked_lora(model, settings: Settings):
    """The peft model with LoRA adapters on ``settings.targets`` (default: every decoder linear);
    the adapters of layers that hold zeros get the masked forward. Seeded: A's initialisation
    draws from the global RNG."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    targets = settings.targets or default_targets(model)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", init_lora_weights=True)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:  # target modules not found
        raise UsageError(f"--recover-targets: {' '.join(str(error).split())[:200]}") from None
    for module in peft_model.modules():
        if isinstance(module, LoraLinear):
            weight = module.base_layer.weight
            mask = weight != 0
            if not bool(mask.all()):
                module.register_buffer("llmprune_mask", mask.to(weight.dtype), persistent=False)
                module.forward = types.MethodType(_masked_forward, module)
    return peft_model


def merge_masked_lora(peft_model) -> nn.Module:
    """W <- where(W != 0, W + s B A, W) in every adapted layer, then the plain model back
    (the adapters removed, nothing else changed)."""
    from peft.tuners.lora import Linear as LoraLinear

    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLinear):
                name = module.active_adapters[0]
                weight = module.base_layer.weight
                delta = (module.lora_B[name].weight.float() @ module.lora_A[name].weight.float()) * module.scaling[name]
                weight.copy_(torch.where(weight != 0, (weight.float() + delta).to(weight.dtype), weight))
    return peft_model.unload()


def zero_masks(model) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, bool mask of its nonzeros) for every trainable matrix that holds zeros."""
    found = []
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dim() >= 2:
            mask = parameter.detach() != 0
            if not bool(mask.all()):
                found.append((parameter, mask))
    return found


def decoder_zeros(model) -> dict:
    """Zeros among the decoder's linear weights (what pruning removed): count, total, fraction."""
    from .models.adapters import adapter_for

    adapter = adapter_for(model)
    zeros = total = 0
    for layer in adapter.layers(model):
        for group in adapter.linear_groups(layer):
            for _, linear in group:
                zeros += int((linear.weight == 0).sum())
                total += linear.weight.numel()
    return {"zeros": zeros, "weights": total, "sparsity": zeros / max(total, 1)}


# --- the loss ------------------------------------------------------------------------------------------


def distillation_loss(student_out, teacher_out, input_ids, settings: Settings, pairs) -> tuple[torch.Tensor, dict]:
    """The weighted loss of one batch and its parts (floats). Logits [B, T, V]; hidden states
    ([B, T, H] per layer, index 0 = embeddings) only when the hidden weight is > 0."""
    parts, total = {}, 0.0
    if settings.kl > 0:
        t = settings.temperature
        student = F.log_softmax(student_out.logits.float() / t, dim=-1).flatten(0, 1)  # [B*T, V]
        teacher = F.log_softmax(teacher_out.logits.float() / t, dim=-1).flatten(0, 1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t
        total, parts["kl"] = total + settings.kl * kl, float(kl.detach())
    if settings.hidden > 0:
        terms = []
        for s, t_index in pairs:
            hs, ht = student_out.hidden_states[s + 1].float(), teacher_out.hidden_states[t_index + 1].float()
            terms.append((hs - ht).pow(2).sum() / ht.pow(2).sum().clamp_min(1e-12))
        hidden = torch.stack(terms).mean()
        total, parts["hidden"] = total + settings.hidden * hidden, float(hidden.detach())
    if settings.lm > 0:
        logits = student_out.logits[:, :-1].float().flatten(0, 1)
        lm = F.cross_entropy(logits, input_ids[:, 1:].flatten())
        total, parts["lm"] = total + settings.lm * lm, float(lm.detach())
    parts["loss"] = float(total.detach()) if torch.is_tensor(total) else float(total)
    return total, parts


def learning_rate_at(step: int, steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of the steps, then cosine decay to 0.
    ``step`` counts from 0."""
    warm = int(round(warmup * steps))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(steps - warm, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


# --- resuming ------------------------------------------------------------------------------------------


class RecoverCheckpoint:
    """--checkpoint-dir for recovery, on llmprune.checkpoint.LayerCheckpoint: one committed file
    (the checkpoint's "layer 0") holds the trainable tensors, the optimiser state, the RNG state and
    (as a uint8 tensor) a JSON of the step, optimiser settings and curve. Each save replaces it
    atomically and records its digest in checkpoint.json, so a cut or changed file is refused."""

    def __init__(self, folder, fingerprint: dict):
        from .checkpoint import LayerCheckpoint

        self.layers = LayerCheckpoint(folder, fingerprint)
        self.saved = self.layers.open() > 0

    def load(self) -> dict | None:
        if not self.saved:
            return None
        tensors = self.layers.load_layer(0)
        meta = json.loads(bytes(tensors.pop("meta.json").tolist()).decode("utf-8"))
        return {"tensors": tensors, "meta": meta}

    def save(self, step: int, tensors: dict, meta: dict) -> None:
        """Commit the state after ``step`` optimiser steps (the step is inside ``meta``)."""
        encoded = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        self.layers.save_layer(0, {**tensors, "meta.json": encoded}, None)
        self.saved = True


def training_state(model, optimizer) -> tuple[dict, dict]:
    """(tensors, JSON) of what resuming needs: trainable parameters, AdamW state, RNG state."""
    tensors = {f"param.{name}": p.detach() for name, p in model.named_parameters() if p.requires_grad}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups}


def restore_training_state(model, optimizer, tensors: dict, meta: dict) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("param."):
                parameters[key[len("param."):]].copy_(value)
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# --- the training loop ---------------------------------------------------------------------------------


@dataclass
class Work:
    """What one recovery works on. ``windows`` [n, seqlen] in reading order; ``evaluation`` [T]
    held-out tokens for the curve (None: no curve); ``on_step(step)`` is called after every
    optimiser step (a test stops a run there)."""

    student: nn.Module
    teacher: nn.Module
    windows: torch.Tensor
    evaluation: torch.Tensor | None = None
    eval_seqlen: int = 256
    bos: int | None = None
    device: torch.device | None = None  # None: the CPU
    progress: bool = True
    checkpoint: RecoverCheckpoint | None = None
    pairs: list | None = None
    on_step: object = None


def mixed_precision(settings: Settings, device: torch.device) -> str:
    """accelerate's mixed_precision. "auto": bf16 on a GPU that has it, else fp16; none on the CPU
    (where bf16 autocast is asked for explicitly: it runs, but is not faster than float32 on every
    CPU). Either way the weights and AdamW's state stay in the model's dtype (float32 master
    weights); autocast runs the forward's matrix products in the lower precision."""
    check_mixed_precision(settings.mixed_precision, device)
    if settings.mixed_precision != "auto":
        return settings.mixed_precision
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_mixed_precision(choice: str, device: torch.device) -> None:
    """Refuse a mixed precision the compute device cannot autocast to: fp16 anywhere but CUDA
    (accelerate has no fp16 autocast on the CPU), bf16 on a GPU without it."""
    if choice == "fp16" and device.type != "cuda":
        raise UsageError("--recover-mixed-precision fp16 needs a CUDA device; on the CPU use bf16 (CPU autocast) or no")
    if choice == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--recover-mixed-precision bf16: this GPU has no bfloat16; use fp16 or no")


def _accelerator(device: torch.device, precision: str):
    """An Accelerator on ``device`` with this mixed precision. accelerate keeps one state per
    process and refuses an Accelerator whose mixed precision (or CPU flag) differs from the first
    one's; an earlier recovery in this process (another precision, another device) is over, so its
    state is dropped (the process group, kept apart in PartialState, stays)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = device.type != "cuda"
    state = AcceleratorState._shared_state
    if state and (state.get("_mixed_precision") != precision or (cpu and state["device"].type != "cpu")):
        AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=precision)


def prepare_student(student, settings: Settings):
    """(the model that trains, masks for full fine-tuning): LoRA with masked deltas, or every
    parameter trainable with its zeros' gradients masked."""
    torch.manual_seed(settings.seed)
    if settings.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.mode == "lora":
        return add_masked_lora(student, settings), []
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return student, zero_masks(student)


def train(work: Work, settings: Settings) -> tuple[nn.Module, dict]:
    """Distil ``work.student`` from ``work.teacher``; returns (the merged student, its report)."""
    device = work.device or torch.device("cpu")
    accelerator = _accelerator(device, mixed_precision(settings, device))
    model, masks = prepare_student(work.student, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The model itself, without DDP and without the autocast accelerate patches into its forward:
    # training autocasts explicitly (_accumulate), while the curve and the merged model that is
    # handed on compute in the model's own dtype, as the teacher's and the final perplexity do.
    plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    teacher = work.teacher.to(accelerator.device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = settings.batch * settings.accumulation * world
    steps = work.windows.shape[0] // per_step
    state = {"step": 0, "curve": [], "losses": [], "seconds": 0.0, "teacher_perplexity": None}
    saved = work.checkpoint.load() if work.checkpoint is not None else None
    if saved is not None:
        restore_training_state(plain, optimizer, saved["tensors"], saved["meta"])
        state.update(saved["meta"]["state"])
    main = accelerator.is_main_process
    # The curve is measured by the main process alone, on the model without its DDP wrapper: the
    # wrapper's forward broadcasts buffers to the other processes, which are not in a forward then
    # (a broadcast they never join hangs the run, or pairs with another collective of theirs).
    if main and work.evaluation is not None and saved is None:
        state["teacher_perplexity"] = _held_out(teacher, work)
        state["curve"].append(_point(plain, work, 0, 0, None))
    every = settings.curve_every or max(1, steps // 10)
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=state["step"], desc="recover: steps", disable=not (work.progress and main))
    tokens_per_step = per_step * work.windows.shape[1]
    started = time.perf_counter() - state["seconds"]
    model.train()
    for step in range(state["step"], steps):
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, steps, settings.learning_rate, settings.warmup)
        parts = _accumulate(model, teacher, work, settings, accelerator, step, rank, world)
        accelerator.clip_grad_norm_(trainable, 1.0)
        for parameter, mask in masks:  # removed weights get no update (AdamW then leaves them as they are)
            parameter.grad.mul_(mask)
        optimizer.step()
        state["losses"].append(parts["loss"])
        state["step"], state["seconds"] = step + 1, time.perf_counter() - started
        done = state["step"] == steps
        if main and work.evaluation is not None and (state["step"] % every == 0 or done):
            state["curve"].append(_point(plain, work, state["step"], state["step"] * tokens_per_step, state["losses"]))
            state["losses"] = []
        bar.set_postfix(loss=f"{parts['loss']:.4f}", tok_s=f"{state['step'] * tokens_per_step / state['seconds']:.0f}")
        bar.update(1)
        if work.checkpoint is not None and main and (state["step"] % settings.checkpoint_every == 0 or done):
            tensors, meta = training_state(plain, optimizer)
            work.checkpoint.save(state["step"], tensors, {**meta, "state": state})
        if work.on_step is not None:
            work.on_step(state["step"])
    bar.close()
    accelerator.wait_for_everyone()
    merged = merge_masked_lora(plain) if settings.mode == "lora" else plain
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    if settings.gradient_checkpointing:
        merged.gradient_checkpointing_disable()
    merged.eval()
    report = {"steps": steps, "tokens": steps * tokens_per_step, "seconds": state["seconds"],
              "tokens_per_s": steps * tokens_per_step / max(state["seconds"], 1e-9), "processes": world,
              "mixed_precision": accelerator.mixed_precision, "trainable_parameters": sum(p.numel() for p in trainable),
              "curve": state["curve"], "teacher_perplexity": state["teacher_perplexity"]}
    return merged, report


def window_rows(step: int, micro: int, rank: int, world: int, settings: Settings) -> slice:
    """The rows of the windows one process reads in one micro-batch. Step s reads the G = batch x
    accumulation x world windows s*G .. (s+1)*G-1; micro-batch m of that step is the run of
    batch x world windows from (s*accumulation + m) * batch * world, of which rank r takes the r-th
    ``batch``. So the processes read disjoint windows, and together, in every micro-batch, exactly
    the windows one process with ``batch x world`` windows per micro-batch would read."""
    first = ((step * settings.accumulation + micro) * world + rank) * settings.batch
    return slice(first, first + settings.batch)


def _accumulate(model, teacher, work: Work, settings: Settings, accelerator, step: int, rank: int, world: int) -> dict:
    """Forward and backward of one optimiser step's micro-batches (this process's share); the
    mean of their loss parts over every process's windows (the processes' means averaged: their
    shares are equal)."""
    from contextlib import nullcontext

    totals: dict = {}
    hidden = settings.hidden > 0
    for micro in range(settings.accumulation):
        ids = work.windows[window_rows(step, micro, rank, world, settings)]
        if work.bos is not None:  # as the perplexity protocol: BOS before every window
            ids = torch.cat([torch.full((ids.shape[0], 1), work.bos, dtype=ids.dtype), ids], dim=1)
        ids = ids.to(accelerator.device)
        last = micro == settings.accumulation - 1
        with accelerator.no_sync(model) if not last else nullcontext():
            with torch.no_grad(), accelerator.autocast():
                teacher_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            with accelerator.autocast():
                student_out = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
                loss, parts = distillation_loss(student_out, teacher_out, ids, settings, work.pairs)
            accelerator.backward(loss / settings.accumulation)
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value / settings.accumulation
    if world > 1:
        names = sorted(totals)
        means = accelerator.reduce(torch.tensor([totals[k] for k in names], dtype=torch.float64,
                                                device=accelerator.device), reduction="mean")
        totals = dict(zip(names, means.tolist()))
    return totals


def _held_out(model, work: Work) -> float:
    from .evaluate import perplexity

    was_training = model.training
    model.eval()
    try:
        return perplexity(model, work.evaluation, work.eval_seqlen, work.bos, next(model.parameters()).device,
                          progress=False).perplexity
    finally:
        model.train(was_training)


def _point(model, work: Work, step: int, tokens: int, losses: list | None) -> dict:
    """One point of the curve: held-out perplexity after ``tokens`` training tokens."""
    loss = sum(losses) / len(losses) if losses else None
    return {"step": step, "tokens": tokens, "perplexity": _held_out(model, work), "train_loss": loss}


def plot_curve(report: dict, path, title: str) -> None:
    """A PNG: held-out perplexity against training tokens, with the teacher's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["curve"]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([p["tokens"] for p in curve], [p["perplexity"] for p in curve], marker="o", label="student")
    if report.get("teacher_perplexity"):
        axes.axhline(report["teacher_perplexity"], color="grey", linestyle="--", label="teacher (dense)")
    axes.set_xlabel("training tokens")
    axes.set_ylabel("held-out perplexity")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- the memory estimate, before anything is loaded ----------------------------------------------------


def estimate_recovery(student: str, teacher: str, settings: Settings, prepared: dict):
    """A memory.MemoryEstimate of a recovery: teacher and student weights, the trainable state
    (float32 parameters, gradients, two AdamW moments, the zero masks) and one micro-batch's
    activations: the logits (teacher, student, their log-softmax and its gradient: [B, T, V] float32
    each) and per layer the tensors the backward pass keeps (about 8 hidden-size and 3 FFN-size
    vectors per token; with gradient checkpointing, one hidden-size vector per layer plus one layer's
    set). None when a config cannot be read (loading then says why)."""
    from transformers import AutoConfig

    from .memory import MemoryEstimate, model_sizes
    from .models.loading import DTYPES, resolve_model

    try:
        student_config = AutoConfig.from_pretrained(resolve_model(student))
        teacher_config = AutoConfig.from_pretrained(resolve_model(teacher))
        student_sizes, teacher_sizes = model_sizes(student_config), model_sizes(teacher_config)
    except Exception:
        return None
    dtype_bytes = DTYPES[prepared["dtype"]].itemsize
    c = student_config
    hidden, inter = c.hidden_size, getattr(c, "intermediate_size", 4 * c.hidden_size)
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    if settings.mode == "lora":  # rank x (in + out) per adapted matrix: q, k, v, o, gate, up, down
        per_layer = (hidden + heads * head_dim) * 2 + (hidden + kv * head_dim) * 2 + (hidden + inter) * 3
        trainable = settings.rank * per_layer * student_sizes["layers"]
        masks = student_sizes["layers"] * student_sizes["layer"] * dtype_bytes
    else:
        trainable, masks = student_sizes["total"], student_sizes["total"]
    tokens = settings.batch * (settings.seqlen + 1)
    per_layer_kept = (hidden if settings.gradient_checkpointing else 8 * hidden + 3 * inter) * 4
    activations = tokens * (4 * c.vocab_size * 4 + student_sizes["layers"] * per_layer_kept
                            + (8 * hidden + 3 * inter) * 4)
    parts = {"teacher": teacher_sizes["total"] * dtype_bytes, "student": student_sizes["total"] * dtype_bytes,
             "trainable state (parameters, gradients, AdamW)": trainable * 4 * 4, "zero masks": masks,
             "activations": activations}
    import psutil
    import torch

    host_available = psutil.virtual_memory().available
    compute = prepared["compute"]
    if compute.type == "cuda":
        free, _ = torch.cuda.mem_get_info(compute)
        return MemoryEstimate({}, parts, host_available, free)
    return MemoryEstimate(parts, {}, host_available, None)


def refuse_recovery(estimate, force: bool) -> None:
    """One UsageError naming the parts and what to change, unless the estimate fits or ``force``."""
    if estimate.fits or force:
        return
    on_device = estimate.device_available is not None and estimate.device > estimate.device_available
    need, have = (estimate.device, estimate.device_available) if on_device else (estimate.host, estimate.host_available)
    parts = estimate.device_parts if on_device else estimate.parts
    detail = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in parts.items() if size)
    raise UsageError(f"estimated peak memory of the recovery {need / 2**30:.2f} GiB ({detail}) exceeds the "
                     f"{have / 2**30:.2f} GiB available on {'the CUDA device' if on_device else 'the host'}; try a "
                     "smaller --recover-batch or --recover-seqlen, --recover-gradient-checkpointing, or "
                     "--recover-mode lora; or pass --force to run anyway")

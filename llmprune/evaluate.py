"""Perplexity with a declared protocol, and model size counting.

Protocol: the evaluation texts are joined with "\\n\\n" and tokenised once without special
tokens; the token stream is cut into non-overlapping windows of ``seqlen`` tokens (a shorter
tail is dropped, as in the SparseGPT/Wanda evaluation); when the tokenizer itself adds a BOS
token to encoded text (i.e. the model was trained expecting one), BOS is prepended to every
window so all ``seqlen`` tokens are predicted, otherwise the first token of each window is
context only. Perplexity = exp(total NLL / number of predicted tokens), summed in float64.

A window whose loss is NaN or infinite (finite logits always give a finite loss) stops the
measurement with a NumericalError naming the first module whose output went non-finite, as
pruning does: a model with NaN weights has no perplexity, and ``nan`` is not one to report.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import NumericalError


@dataclass
class Perplexity:
    perplexity: float
    nll_sum: float
    predicted_tokens: int
    windows: int
    seqlen: int
    bos_prepended: bool
    seconds: float

    @property
    def protocol(self) -> str:
        bos = "BOS prepended to each window" if self.bos_prepended else "no BOS"
        return (f"{self.windows} non-overlapping windows of {self.seqlen} tokens, {bos}, "
                f"{self.predicted_tokens} predicted tokens, ppl = exp(sum NLL / predicted tokens)")

    def as_dict(self) -> dict:
        return {**asdict(self), "protocol": self.protocol}


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when encoding text with special tokens starts with the tokenizer's BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    encoded = tokenizer("a", add_special_tokens=True).input_ids
    return len(encoded) > 0 and encoded[0] == bos


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, seqlen: int, bos_token_id: int | None = None,
               device: torch.device | str | None = None, progress: bool = True) -> Perplexity:
    """token_ids: [T] evaluation stream. Returns the perplexity under the module's protocol."""
    started = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    windows = token_ids.numel() // seqlen
    if windows < 1:
        raise ValueError(f"evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}")
    nll_sum = 0.0
    predicted = 0
    for w in tqdm(range(windows), desc="perplexity: windows", disable=not progress):
        window = token_ids[w * seqlen:(w + 1) * seqlen]
        if bos_token_id is not None:
            window = torch.cat([torch.tensor([bos_token_id], dtype=window.dtype), window])
        window = window.unsqueeze(0).to(device)  # [1, seqlen (+1)]
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()  # [positions, vocab]
        targets = window[0, 1:]
        nll = F.cross_entropy(logits, targets, reduction="sum").double().item()
        if not math.isfinite(nll):
            raise NumericalError(f"non-finite values (NaN or inf) in {first_non_finite_module(model, window)} "
                                 f"(perplexity window {w})")
        nll_sum += nll
        predicted += targets.numel()
    mean = nll_sum / predicted
    return Perplexity(perplexity=math.exp(mean) if mean < 709 else math.inf, nll_sum=nll_sum,
                      predicted_tokens=predicted, windows=windows, seqlen=seqlen,
                      bos_prepended=bos_token_id is not None, seconds=time.perf_counter() - started)


@torch.no_grad()
def first_non_finite_module(model: nn.Module, input_ids: torch.Tensor) -> str:
    """The first module, in the order modules finish, whose output holds NaN/inf when the model
    runs on input_ids ([1, T]); "the model's output" when every module's own output is finite."""
    found = []

    def hook(name):
        def check(module, args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) and output else output
            if (not found and isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                    and not torch.isfinite(tensor).all()):
                found.append(name)
        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else "the model's output"


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with a NaN or infinite weight (a NumericalError naming the first parameter):
    every measurement of it would be NaN."""
    from .placement import stored_tensor

    for name, parameter in model.named_parameters():
        if parameter.is_meta:  # offloaded by an accelerate device map: read it from the store
            parameter = stored_tensor(model, name)
        if parameter.is_floating_point() and not torch.isfinite(parameter).all():
            raise NumericalError(f"non-finite values (NaN or inf) in the weights of {name}")


def count_parameters(model: nn.Module) -> dict:
    """Unique parameters (tied weights once) and how many of them are exactly zero."""
    from .placement import stored_tensor

    seen, total, zeros = set(), 0, 0
    for name, parameter in model.named_parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        if parameter.is_meta:  # offloaded by an accelerate device map: read it from the store
            parameter = stored_tensor(model, name)
        zeros += int((parameter == 0).sum())
    return {"parameters": total, "zeros": zeros, "nonzero": total - zeros}


@torch.no_grad()
def measure_speed(model: nn.Module, device: torch.device | str | None = None, prompt_tokens: int = 512,
                  new_tokens: int = 64, repeats: int = 3, progress: bool = False) -> dict:
    """Prefill tokens/s (one ``prompt_tokens`` prompt) and decode tokens/s (``new_tokens`` greedy
    tokens with the KV cache, through ``generate``), best of ``repeats`` after one warm-up, at the
    current thread count. Decode time = time(prompt + 1 + new_tokens) - time(prompt + 1).
    progress: a bar over the rounds (the measurement takes minutes on a big model)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens),
                           generator=torch.Generator().manual_seed(0)).to(device)

    def timed(generated: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=generated,
                       min_new_tokens=generated, do_sample=False, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    prefill, decode = [], []
    for attempt in tqdm(range(repeats + 1), desc="speed", disable=not progress, leave=False):
        first = timed(1)
        full = timed(1 + new_tokens)
        if attempt:  # the first round warms up
            prefill.append(prompt_tokens / first)
            decode.append(new_tokens / max(full - first, 1e-9))
    return {"prefill_tokens_per_s": max(prefill), "decode_tokens_per_s": max(decode),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": torch.get_num_threads()}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters and buffers saved with the model."""
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in unique.values())

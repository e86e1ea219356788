"""Lossless mode: self-speculative greedy decoding (draft with the early-exit path, verify with the
full model), so the tokens are exactly the full model's greedy tokens.

One round, with n tokens in the cache and the next token t (the full model's choice) not yet in it:
  1. draft: feed t, then each drafted token, through the first d layers only (the exit at layer d,
     its fitted map, the final norm and the LM head): k tokens d_1..d_k. Only layers < d write
     keys/values, and those are exactly the full model's (the layers are the same).
  2. verify: crop the cache to n and run the full model once on [t, d_1..d_k]: its greedy choices
     p_1..p_{k+1}. Accept the drafts while d_i == p_i (m of them), emit d_1..d_m and p_{m+1}, and
     crop the cache to n + 1 + m. Every emitted token is a full-model greedy choice.
Plain decoding is used instead when calibration predicts that drafting is slower on this machine
(acceptance too low for the draft's cost), and a generation switches to plain decoding when the
acceptance it observes predicts that. Sampling, beam search and batches > 1 use the full model's
own ``generate`` (exact, not sped up). This file is copied into dynamic folders with
modeling_llmprune_dynamic.py and imports only torch and transformers.
"""

from __future__ import annotations

import functools
import time

import torch


def expected_tokens(acceptance: float, draft_tokens: int) -> float:
    """Tokens emitted per round when each draft is accepted with probability ``acceptance``
    independently: 1 + a + a^2 + ... + a^k."""
    return sum(acceptance ** i for i in range(draft_tokens + 1))


def expected_speedup(acceptance: float, draft_tokens: int, draft_cost: float, verify_cost: float) -> float:
    """Speed relative to plain decoding; costs are relative to one plain decoding step."""
    return expected_tokens(acceptance, draft_tokens) / (draft_tokens * draft_cost + verify_cost)


def _crop(cache, length: int) -> None:
    """Keep the first ``length`` positions in every layer of the cache (layers may hold different
    counts: drafting writes only the layers below the draft exit)."""
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)
        elif getattr(layer, "is_sliding", False) and getattr(layer, "is_initialized", False):
            layer.crop(0)  # a sliding-window layer recording its past: back to the window


def _plain_step(model, state, token, cache):
    state.mode = "full"
    return model(input_ids=token.view(1, 1), cache=cache, use_cache=True).logits[0, -1].argmax()


@torch.no_grad()
def speculative_generate(model, input_ids: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0,
                         eos_token_id=None, attention_mask=None) -> torch.Tensor:
    """Greedy tokens of the full model for one row ``input_ids`` [1, T] -> [1, T + new]."""
    from transformers import DynamicCache

    state = model.llmprune_dynamic
    draft = state.settings["lossless"]
    draft_tokens = draft["draft_tokens"]
    eos = set() if eos_token_id is None else set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
    previous_mode = state.mode
    cache = DynamicCache(config=model.config)
    try:
        state.mode = "full"
        logits = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True,
                       logits_to_keep=1).logits
        token = logits[0, -1].argmax()
        emitted = [token]
        cached = input_ids.shape[1]
        drafting = bool(draft.get("drafting"))
        if drafting:  # sliding-window layers must keep what a rejected draft pushed out of the window
            cache.activate_past_recording()
        rounds = drafted = accepted = 0

        def done():
            return len(emitted) >= max_new_tokens or (len(emitted) >= min_new_tokens and int(emitted[-1]) in eos)

        while not done():
            if not drafting:
                token = _plain_step(model, state, token, cache)
                cached += 1
                emitted.append(token)
                continue
            k = min(draft_tokens, max_new_tokens - len(emitted))
            state.mode = "draft"
            drafts, feed = [], token
            for _ in range(k):
                feed = model(input_ids=feed.view(1, 1), cache=cache, use_cache=True).logits[0, -1].argmax()
                drafts.append(feed)
            _crop(cache, cached)
            state.mode = "full"
            verify = torch.stack([token, *drafts])[None]                         # [1, k + 1]
            choices = model(input_ids=verify, cache=cache, use_cache=True).logits[0].argmax(-1)  # [k + 1]
            m = 0
            while m < k and int(drafts[m]) == int(choices[m]):
                m += 1
            _crop(cache, cached + 1 + m)
            cached += 1 + m
            new = [*drafts[:m], choices[m]]
            for item in new:  # stop at an end-of-sequence token, as plain decoding would
                emitted.append(item)
                if done():
                    break
            token = choices[m]
            rounds, drafted, accepted = rounds + 1, drafted + k, accepted + m
            if rounds >= 8 and draft.get("draft_cost") and expected_speedup(
                    accepted / drafted, draft_tokens, draft["draft_cost"], draft["verify_cost"]) < 0.97:
                drafting = False  # drafting has been slower than plain decoding here: stop it
                state.stats["fell_back"] += 1
        state.stats["rounds"] += rounds
        state.stats["drafted"] += drafted
        state.stats["accepted"] += accepted
    finally:
        state.mode = previous_mode
    new_tokens = torch.stack(emitted[:max_new_tokens]).view(1, -1).to(input_ids)
    return torch.cat([input_ids, new_tokens], dim=1)


def lossless_generate(model, original_generate, inputs=None, *args, **kwargs):
    """``generate`` of a lossless dynamic model: greedy batch-1 calls are self-speculative; anything
    else is the full model's own ``generate``."""
    state = model.llmprune_dynamic
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    config = kwargs.get("generation_config") or model.generation_config
    sample = kwargs.get("do_sample", getattr(config, "do_sample", False))
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
    unsupported = {"streamer", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                   "return_dict_in_generate", "output_scores", "output_logits", "num_return_sequences",
                   "repetition_penalty", "bad_words_ids", "no_repeat_ngram_size", "inputs_embeds"}
    mask = kwargs.get("attention_mask")
    plain = (args or sample or beams != 1 or input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1
             or any(kwargs.get(name) is not None for name in unsupported)
             or (mask is not None and not bool(mask.all())))
    if plain:
        previous, state.mode = state.mode, "full"
        try:
            return original_generate(inputs, *args, **kwargs)
        finally:
            state.mode = previous
    max_new = kwargs.get("max_new_tokens") or getattr(config, "max_new_tokens", None)
    if max_new is None:
        max_new = (kwargs.get("max_length") or config.max_length) - input_ids.shape[1]
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    return speculative_generate(model, input_ids, max_new_tokens=max(1, int(max_new)),
                                min_new_tokens=int(kwargs.get("min_new_tokens") or 0), eos_token_id=eos,
                                attention_mask=mask)


def install_lossless_generate(model) -> None:
    original = type(model).generate.__get__(model)
    model.generate = functools.partial(lossless_generate, model, original)


@torch.no_grad()
def _step_seconds(model, state, mode, prompt, feed_tokens, repeats=3):
    """Best time of one cached forward of ``feed_tokens`` tokens after ``prompt`` [1, T], in ``mode``."""
    from transformers import DynamicCache

    best = float("inf")
    for _ in range(repeats + 1):
        state.mode = "full"
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        state.mode = mode
        feed = prompt[:, :feed_tokens]
        if feed.device.type == "cuda":
            torch.cuda.synchronize(feed.device)
        started = time.perf_counter()
        model(input_ids=feed, cache=cache, use_cache=True, logits_to_keep=feed_tokens)
        if feed.device.type == "cuda":
            torch.cuda.synchronize(feed.device)
        best = min(best, time.perf_counter() - started)
    return best


def choose_draft(model, fitted, device, max_draft_tokens: int = 8) -> dict:
    """Pick the draft exit layer d and draft length k with the best predicted speed, from the
    teacher-forced acceptance at each exit (fitted.table, held-out rows) and step times measured
    here; drafting is switched off when no choice is predicted to beat plain decoding."""
    state = model.llmprune_dynamic
    rows = fitted.holdout_rows
    acceptance = {e: float(fitted.table.agree[rows, j].float().mean()) for j, e in enumerate(fitted.exit_layers)}
    prompt = fitted.holdout[:1, :min(64, fitted.holdout.shape[1])].to(device)
    previous = state.mode
    try:
        full = _step_seconds(model, state, "full", prompt, 1)
        verify = {k: _step_seconds(model, state, "full", prompt, k + 1) / full
                  for k in range(1, min(max_draft_tokens, prompt.shape[1] - 1) + 1)}
        best = None
        for e in fitted.exit_layers:
            state.set(lossless={"draft_exit_layer": e})
            draft_cost = _step_seconds(model, state, "draft", prompt, 1) / full
            for k, verify_cost in verify.items():
                speed = expected_speedup(acceptance[e], k, draft_cost, verify_cost)
                if best is None or speed > best["expected_speedup"]:
                    best = {"draft_exit_layer": e, "draft_tokens": k, "acceptance_estimate": acceptance[e],
                            "draft_cost": draft_cost, "verify_cost": verify_cost, "expected_speedup": speed}
    finally:
        state.mode = previous
    best["drafting"] = best["expected_speedup"] > 1.0
    return best

"""The perplexity protocol against a naive computation, and parameter counting."""

from __future__ import annotations

import math

import pytest
import torch

from llmprune.evaluate import count_parameters, perplexity, tokenizer_adds_bos

from conftest import tiny_model


def naive_perplexity(model, ids, seqlen, bos=None):
    """Token by token: -log p(next | prefix) from full-window logits, float64, summed."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - seqlen + 1, seqlen):
        window = ids[start:start + seqlen].tolist()
        if bos is not None:
            window = [bos] + window
        with torch.no_grad():
            logits = model(torch.tensor([window])).logits[0].double()
        for position in range(len(window) - 1):
            total -= torch.log_softmax(logits[position], -1)[window[position + 1]].item()
            count += 1
    return math.exp(total / count), count


@pytest.mark.parametrize("bos", [None, 1])
def test_perplexity_matches_naive_computation(bos):
    model = tiny_model()
    ids = torch.randint(2, 512, (100,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seqlen=32, bos_token_id=bos, progress=False)
    expected, count = naive_perplexity(model, ids, 32, bos)
    assert result.windows == 3  # 100 // 32; the 4-token tail is dropped
    assert result.predicted_tokens == count == (3 * 32 if bos is not None else 3 * 31)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert ("BOS prepended" in result.protocol) == (bos is not None)


def test_perplexity_refuses_text_shorter_than_a_window():
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_model(), torch.arange(10), seqlen=32, progress=False)


def test_bos_is_used_only_when_the_tokenizer_adds_it(tokenizer, bos_tokenizer):
    assert not tokenizer_adds_bos(tokenizer)
    assert tokenizer_adds_bos(bos_tokenizer)


def test_count_parameters_counts_tied_weights_once_and_zeros():
    model = tiny_model(tie_word_embeddings=True)
    unique = {id(p): p.numel() for p in model.parameters()}
    counts = count_parameters(model)
    assert counts["parameters"] == sum(unique.values())
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:2] = 0
    assert count_parameters(model)["zeros"] == counts["zeros"] + 2 * 128

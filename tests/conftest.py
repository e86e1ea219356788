"""Shared fixtures: tiny random models built from configs (no network), a small real tokenizer,
and the real built-in SmolLM2 folder for the few end-to-end tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
SMALL_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
              "fortune, must be in want of a wife. ") * 200

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              tie_word_embeddings=False)


def tiny_config(model_type: str = "llama", **overrides):
    """A small config of the given family; Gemma 3 mixes sliding and full attention layers."""
    from transformers import AutoConfig

    extra = {}
    if model_type == "gemma3_text":
        extra = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                     query_pre_attn_scalar=16)
    if model_type == "mistral":
        extra = dict(sliding_window=16)
    return AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides})


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    return model.eval()


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer (vocab 512) trained in-process on real text; adds no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = SMALL_TEXT
    if AUSTEN.is_dir():
        with gzip.open(AUSTEN / "emma.txt.gz", "rt", encoding="utf-8") as handle:
            text = handle.read(100_000)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def bos_tokenizer(tokenizer):
    """The same tokenizer, prepending BOS when special tokens are asked for (as Llama's does)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    """A saved tiny Llama with tokenizer: an ordinary local HF model folder."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path):
    """A real-text calibration/evaluation file (Austen when available)."""
    return write_text_sample(tmp_path / "text.txt")


def write_text_sample(path):
    """Write 60k characters of Persuasion (or SMALL_TEXT without the Austen data) to path."""
    text = SMALL_TEXT
    if AUSTEN.is_dir():
        with gzip.open(AUSTEN / "persuasion.txt.gz", "rt", encoding="utf-8") as handle:
            text = handle.read(60_000)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2_folder():
    """The built-in model converted to safetensors (once, into the user cache)."""
    from llmprune.models.loading import builtin_model_folder

    return builtin_model_folder("llama")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer):
    """A saved tiny random Llama with the test tokenizer (a local HF folder)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    """SMALL_TEXT in a .txt file (calibration or evaluation data)."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    return path

"""Loading llmprune's sparse checkpoints: each pruned linear weight is stored as its non-zero values
plus a packed bitmask, every other tensor as it is.

This file is copied into sparse output folders and named by ``auto_map`` in config.json, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads them; it imports
nothing but torch, numpy and transformers. llmprune's own loader (``llmprune.models.loading``)
imports the installed copy of this module instead, so it never runs the folder's code.

The folder on disk:

- ``config.json``: the dense model's config with ``model_type`` = "llmprune_sparse" (unknown to
  transformers, so plain loading fails with a request for ``trust_remote_code`` instead of building
  a model with missing weights), ``auto_map`` naming this file, and ``llmprune_sparse`` = {format,
  version, base_model_type}.
- ``model.sparse.safetensors`` (or ``model-0000i-of-0000N.sparse.safetensors`` with
  ``model.sparse.safetensors.index.json``): no file is called ``model.safetensors``, so loading
  the folder with a family class directly (``LlamaForCausalLM.from_pretrained``) fails too. A
  weight ``W`` [out, in] of any dtype is stored as ``W.sparse_values`` (1-D, W's dtype, the kept
  entries in row-major order) and ``W.sparse_bitmask`` (uint8, ceil(numel / 8) bytes, bit ``i % 8``
  of byte ``i // 8`` set when flat entry ``i`` is kept, least significant bit first); its shape is
  in the file's metadata. An entry is kept when its bits are not all zero, so -0.0 survives.
- Decoding checks that the bitmask has the right length, that no padding bit is set, and that the
  number of values equals the number of set bits, naming the tensor otherwise.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

MODEL_TYPE = "llmprune_sparse"
FORMAT = "values+bitmask"
VERSION = 1
SINGLE_FILE = "model.sparse.safetensors"
INDEX_FILE = "model.sparse.safetensors.index.json"
VALUES, BITMASK = ".sparse_values", ".sparse_bitmask"
SHAPES_KEY = "llmprune_sparse_shapes"  # safetensors metadata: {dense name: shape}, JSON text
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BASE_CONFIG = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig


class SparseFormatError(ValueError):
    """A sparse folder that cannot be decoded (corrupted, truncated, or of another version)."""


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """bool [numel] -> uint8 [ceil(numel / 8)], least significant bit first."""
    return torch.from_numpy(np.packbits(keep.reshape(-1).numpy(), bitorder="little"))


def decode(name: str, values: torch.Tensor, bitmask: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The dense tensor ``name`` of ``shape`` from its kept values and bitmask; SparseFormatError
    (naming it) when they do not fit together."""
    numel = int(np.prod(shape, dtype=np.int64))
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 1 or bitmask.numel() != (numel + 7) // 8:
        raise SparseFormatError(f"{name}: bitmask has {bitmask.numel()} {str(bitmask.dtype).removeprefix('torch.')} "
                                f"entries, expected {(numel + 7) // 8} uint8 for shape {list(shape)}")
    bits = np.unpackbits(bitmask.numpy(), bitorder="little")  # uint8 [8 * bytes]
    if bits[numel:].any():
        raise SparseFormatError(f"{name}: bitmask sets bits beyond the tensor's {numel} entries")
    positions = np.flatnonzero(bits[:numel].view(np.bool_))  # int64 [kept]: where the values go, in order
    if values.dim() != 1 or values.numel() != positions.size:
        raise SparseFormatError(f"{name}: {values.numel()} values stored but its bitmask keeps {positions.size}")
    # numpy has no bfloat16: the bits are moved as integers of the same width. np.zeros takes
    # zeroed pages from the system (no fill pass), and numpy runs on one thread, which on a busy
    # machine is faster than torch's multi-threaded fill.
    width = values.element_size()
    dense = np.zeros(numel, dtype=f"<i{width}")
    np.put(dense, positions, values.contiguous().view(_INT_VIEW[width]).numpy())
    return torch.from_numpy(dense).view(values.dtype).view(shape)


def weight_files(folder: Path) -> list[Path]:
    """The sparse weight files of ``folder``, in order."""
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    raise SparseFormatError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def read_file(path: Path) -> dict:
    """One sparse safetensors file -> {name: dense tensor}, the encoded weights decoded."""
    from safetensors import safe_open

    tensors, encoded_parts = {}, []
    with safe_open(str(path), framework="pt") as handle:
        shapes = json.loads((handle.metadata() or {}).get(SHAPES_KEY, "{}"))
        names = set(handle.keys())
        for name, shape in shapes.items():
            if name + VALUES not in names or name + BITMASK not in names:
                raise SparseFormatError(f"{name}: {path.name} lacks its {VALUES[1:]} or {BITMASK[1:]}")
            encoded_parts.append((name, handle.get_tensor(name + VALUES), handle.get_tensor(name + BITMASK), shape))
        # numpy's unpack, nonzero and put release the GIL: decoding on the process's threads is
        # about as many times faster. map keeps the order, so the first bad tensor is the one named.
        with ThreadPoolExecutor(max(1, min(8, torch.get_num_threads()))) as pool:
            tensors.update(zip(shapes, pool.map(lambda part: decode(*part), encoded_parts)))
        encoded = {n + VALUES for n in shapes} | {n + BITMASK for n in shapes}
        for name in sorted(names - encoded):
            if name.endswith((VALUES, BITMASK)):
                raise SparseFormatError(f"{name}: no shape for it in {path.name}'s metadata")
            tensors[name] = handle.get_tensor(name)
    return tensors


def read_state_dict(folder) -> dict:
    """Every tensor of a sparse folder, dense, by its checkpoint name."""
    state = {}
    for path in weight_files(Path(folder)):
        state.update(read_file(path))
    return state


def dense_config(config: dict):
    """The family config (e.g. LlamaConfig) of a sparse folder's config.json contents."""
    info = config.get("llmprune_sparse") or {}
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise SparseFormatError(f"sparse format {info.get('format')!r} version {info.get('version')!r} is not "
                                f"{FORMAT!r} version {VERSION}")
    base = info.get("base_model_type")
    if base not in CONFIG_MAPPING:
        raise SparseFormatError(f"sparse folder of model type {base!r}, which this transformers does not know")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "llmprune_sparse")}
    return CONFIG_MAPPING[base].from_dict(fields)


def family_class(config):
    """The family's causal LM class for a dense config."""
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type])


def load(folder, **kwargs):
    """A dense model from a local sparse folder: the family's own ``from_pretrained`` given the
    decoded state dict (kwargs such as ``dtype`` go to it), so it is bitwise what the dense folder
    would load as."""
    folder = Path(folder)
    config = dense_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    for key in ("config", "trust_remote_code", "adapter_kwargs", "_from_auto", "code_revision"):
        kwargs.pop(key, None)
    return family_class(config).from_pretrained(None, config=config, state_dict=read_state_dict(folder), **kwargs)


def _local_folder(name, kwargs: dict) -> Path:
    """A local folder, or the Hub repository's files downloaded to the cache."""
    if os.path.isdir(name):
        return Path(name)
    from huggingface_hub import snapshot_download

    hub = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    return Path(snapshot_download(str(name), **hub))


class LlmpruneSparseConfig(_BASE_CONFIG):
    """The config of a sparse folder: the dense config's fields, kept as they are."""

    model_type = MODEL_TYPE


class LlmpruneSparseForCausalLM(transformers.PreTrainedModel):
    """Not a model of its own: ``from_pretrained`` returns the family's model (e.g.
    LlamaForCausalLM) with the decoded weights."""

    config_class = LlmpruneSparseConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        for key in ("subfolder", "force_download", "proxies"):
            kwargs.pop(key, None)
        folder = _local_folder(pretrained_model_name_or_path, kwargs)
        kwargs.pop("local_files_only", None)
        return load(folder, **kwargs)

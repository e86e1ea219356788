"""Sparse checkpoints: an output folder whose pruned linear weights are stored as their non-zero
values plus a packed bitmask (any dtype), everything else unchanged. The on-disk format, and the
loader that ``trust_remote_code`` runs, are in ``llmprune/models/modeling_llmprune_sparse.py``.

A folder is written dense first (``save_pretrained``) and then rewritten here, inside the writer's
temporary folder, so sparse output has the same atomicity as dense output; ``convert`` copies a
folder into a temporary one and rewrites it the same way, in either direction.

At 50% sparsity (or 2:4) a float32 weight costs 0.5 + 1/32 of its dense bytes, bfloat16 0.5 + 1/16.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import UsageError
from .models import modeling_llmprune_sparse as fmt

MODELING_FILE = "modeling_llmprune_sparse.py"
_INT_VIEW = {2: "int16", 4: "int32", 8: "int64", 1: "int8"}


def is_sparse_folder(folder) -> bool:
    try:
        config = json.loads((Path(folder).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == fmt.MODEL_TYPE


def folder_bytes(folder) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).expanduser().rglob("*") if p.is_file())


def encode(weight):
    """weight (any dtype, any shape) -> (values [kept], bitmask uint8 [ceil(numel / 8)]). An entry is
    kept when any of its bits is set: exact zeros are dropped, -0.0 and NaN are kept."""
    import torch

    flat = weight.detach().to("cpu").contiguous().reshape(-1)
    keep = flat.view(getattr(torch, _INT_VIEW[flat.element_size()])) != 0
    return flat[keep], fmt.pack_bits(keep)


def pruned_weight_names(model) -> list[str]:
    """Checkpoint names of the decoder's linear weights (what the pruning methods prune)."""
    from .models.adapters import adapter_for

    adapter = adapter_for(model)
    prefix = _layers_prefix(model, adapter)
    return [f"{prefix}.{index}.{name}.weight" for index, layer in enumerate(adapter.layers(model))
            for group in adapter.linear_groups(layer) for name, _ in group]


def _layers_prefix(model, adapter) -> str:
    layers = adapter.layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def names_from_config(folder: Path) -> list[str]:
    """pruned_weight_names of the model a dense folder holds, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return pruned_weight_names(model)


def check_can_be_sparse(config) -> None:
    """Refuse (before any work) models the sparse format does not describe: ones whose modelling code
    is not the family's own (uneven layers, dynamic wrappers)."""
    if getattr(config, "llmprune_layer_sizes", None) or getattr(config, "auto_map", None):
        raise UsageError("--save-format sparse: this model needs its own modelling code (uneven layers or a "
                         "dynamic wrapper); save it dense")


def _dense_files(folder: Path) -> list[Path]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    raise UsageError(f"{folder} holds no model.safetensors (or index): not a dense safetensors model folder")


def sparsify_folder(folder, names) -> dict:
    """Rewrite the dense model folder ``folder`` in place: the tensors ``names`` become values +
    bitmask. Refuses (UsageError, nothing changed) when that would not make them smaller: a model
    with no zeros to gain from. Returns {"dense_bytes", "sparse_bytes", "tensors"} for the encoded ones."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, wanted = Path(folder), set(names)
    files = _dense_files(folder)
    _check_gain(files, wanted)
    stats = {"dense_bytes": 0, "sparse_bytes": 0, "tensors": 0}
    weight_map, outputs = {}, []
    for number, path in enumerate(files):
        target = folder / (fmt.SINGLE_FILE if len(files) == 1 else
                           f"model-{number + 1:05d}-of-{len(files):05d}.sparse.safetensors")
        tensors, shapes = {}, {}
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if name in wanted:
                    values, bitmask = encode(tensor)
                    tensors[name + fmt.VALUES], tensors[name + fmt.BITMASK] = values, bitmask
                    shapes[name] = list(tensor.shape)
                    stats["dense_bytes"] += tensor.numel() * tensor.element_size()
                    stats["sparse_bytes"] += values.numel() * values.element_size() + bitmask.numel()
                    stats["tensors"] += 1
                else:
                    tensors[name] = tensor
        save_file(tensors, str(target), metadata={"format": "pt", fmt.SHAPES_KEY: json.dumps(shapes)})
        weight_map.update({name: target.name for name in tensors})
        outputs.append(target)
        path.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    if len(files) > 1:
        total = sum(p.stat().st_size for p in outputs)
        (folder / fmt.INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                          "weight_map": dict(sorted(weight_map.items()))}, indent=2)
                                             + "\n", encoding="utf-8")
    _write_sparse_config(folder)
    shutil.copyfile(Path(fmt.__file__), folder / MODELING_FILE)
    return stats


def _check_gain(files: list[Path], wanted: set) -> None:
    """UsageError unless values + bitmask of the ``wanted`` tensors take fewer bytes than dense."""
    import torch
    from safetensors import safe_open

    dense = sparse = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in wanted & set(handle.keys()):
                tensor = handle.get_tensor(name)
                view = tensor.reshape(-1).view(getattr(torch, _INT_VIEW[tensor.element_size()]))
                dense += tensor.numel() * tensor.element_size()
                sparse += int((view != 0).sum()) * tensor.element_size() + (tensor.numel() + 7) // 8
    if not dense:
        raise UsageError("--save-format sparse: the model has no decoder linear weights to store sparse")
    if sparse >= dense:
        raise UsageError(f"--save-format sparse: no zeros to gain from (values + bitmask would take "
                         f"{sparse / dense:.2f}x the dense bytes of the decoder's linear weights); save it dense")


def _write_sparse_config(folder: Path) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    base = config["model_type"]
    config = {"model_type": fmt.MODEL_TYPE, **{k: v for k, v in config.items() if k != "model_type"}}
    config["auto_map"] = {"AutoConfig": f"{MODELING_FILE[:-3]}.LlmpruneSparseConfig",
                          "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.LlmpruneSparseForCausalLM"}
    config["llmprune_sparse"] = {"format": fmt.FORMAT, "version": fmt.VERSION, "base_model_type": base}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def densify_folder(folder) -> None:
    """Rewrite the sparse folder ``folder`` in place as an ordinary dense one."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    base = fmt.dense_config(config).model_type  # checks format and version
    files = fmt.weight_files(folder)
    weight_map = {}
    for number, path in enumerate(files):
        tensors = fmt.read_file(path)
        name = "model.safetensors" if len(files) == 1 else f"model-{number + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        path.unlink()
    (folder / fmt.INDEX_FILE).unlink(missing_ok=True)
    if len(files) > 1:
        total = sum((folder / n).stat().st_size for n in set(weight_map.values()))
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n",
            encoding="utf-8")
    dense = {"model_type": base, **{k: v for k, v in config.items()
                                    if k not in ("model_type", "auto_map", "llmprune_sparse")}}
    config_path.write_text(json.dumps(dense, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / MODELING_FILE).unlink(missing_ok=True)


def load_sparse(folder, dtype=None, **kwargs):
    """The dense model of a sparse folder, with llmprune's installed loader (no code from the folder).
    dtype: a torch dtype (default: as from_pretrained decides for the dense folder)."""
    try:
        return fmt.load(Path(folder).expanduser(), **({} if dtype is None else {"dtype": dtype}), **kwargs)
    except fmt.SparseFormatError as error:
        raise UsageError(f"cannot load sparse folder {os.fspath(folder)!r}: {error}") from None


def convert(source, to: str, output, overwrite: bool = False) -> Path:
    """Write a copy of the model folder ``source`` to ``output`` with its weights stored ``to``
    ("dense" or "sparse"), atomically; every other file is copied unchanged."""
    from .save import atomic_folder, check_output_folder

    source = Path(os.fspath(source)).expanduser()
    if not (source / "config.json").is_file():
        raise UsageError(f"{os.fspath(source)!r} is not a model folder (no config.json)")
    sparse = is_sparse_folder(source)
    if (to == "sparse") == sparse:
        raise UsageError(f"{os.fspath(source)!r} is already stored {to}")
    target = check_output_folder(output, overwrite, model=str(source))  # never inside or over the source
    if target == source.resolve():
        raise UsageError("--output must differ from the folder converted")
    if to == "sparse":
        from transformers import AutoConfig

        check_can_be_sparse(AutoConfig.from_pretrained(source))
        names = names_from_config(source)
        _check_gain(_dense_files(source), set(names))
    else:
        fmt.weight_files(source)
    with atomic_folder(target, overwrite) as tmp:
        for path in source.iterdir():
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp / path.name)
        try:
            sparsify_folder(tmp, names) if to == "sparse" else densify_folder(tmp)
        except fmt.SparseFormatError as error:
            raise UsageError(f"cannot convert {os.fspath(source)!r}: {error}") from None
        _record_storage(tmp, "dense" if to == "sparse" else "sparse", to)
    return target


def _record_storage(folder: Path, old: str, new: str) -> None:
    """An llmprune output's report and model card, told that its weights are now stored ``new``."""
    from .jsonreport import report_json
    from .save import CARD_STORAGE

    report_path, card_path = folder / "llmprune.json", folder / "README.md"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    if isinstance(report, dict):
        report["save_format"] = new
        report_path.write_text(report_json(report, indent=2, default=str) + "\n", encoding="utf-8")
    if card_path.is_file():
        card = card_path.read_text(encoding="utf-8")
        card_path.write_text(card.replace(CARD_STORAGE[old], CARD_STORAGE[new]), encoding="utf-8")

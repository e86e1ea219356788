"""Models spread by accelerate (``device_map``): over several GPUs, the CPU, and disk offload.

transformers loads such a model with accelerate's ``AlignDevicesHook`` on its modules: a hook
moves a module's inputs to its execution device and, for offloaded modules, reads the weights
from an offload store (a dict of CPU tensors, or files on disk) before the forward pass and
drops them back to the meta device after it. Two consequences for a pruner:

- a decoder layer must run where accelerate put it (never ``layer.to(device)``), and its
  statistics must live on that layer's execution device;
- a change made to an offloaded weight is lost when the hook drops it (this is what happens
  inside accelerate's ``align_module_device``): ``onloaded`` writes every tensor back to the
  offload store (``.dat`` files for disk offload, never the source checkpoint), including new
  shapes and modules replaced by structured surgery, which get their hook back.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks place (some of) this model's modules."""
    return any(hasattr(module, "_hf_hook") for module in model.modules())


def _offload_hook(module: nn.Module):
    hook = getattr(module, "_hf_hook", None)
    return hook if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None else None


def execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else its first real
    parameter's device, else ``default``."""
    for sub in module.modules():
        device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return default


def stored_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The value of an offloaded (meta) tensor ``name`` of ``model``, read from the offload store
    of the innermost module whose hook holds it."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut]))
        hook = _offload_hook(owner)
        if hook is not None:
            return hook.weights_map[".".join(parts[cut:])]
    raise RuntimeError(f"{name} is on the meta device and no offload store holds it")


def _module_tensors(module: nn.Module, hook) -> list[str]:
    """The names (relative to ``module``) of the tensors ``hook`` loads from its store."""
    from accelerate.utils import named_module_tensors

    return [name for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                     recurse=hook.place_submodules, remove_non_persistent=True)]


def _store(weights_map, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` into an offload store under ``name`` (relative to the store's prefix)."""
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    dataset = getattr(weights_map, "dataset", weights_map)
    key = getattr(weights_map, "prefix", "") + name
    value = tensor.detach().to("cpu").contiguous().clone()
    if isinstance(dataset, OffloadedWeightsLoader):
        if key in dataset.state_dict:  # CPU offload: tensors held in memory
            dataset.state_dict[key] = value
        else:  # disk offload: our own .dat file in the offload folder (never the source checkpoint)
            if dataset.save_folder is None:
                raise RuntimeError(f"cannot write {key} back: the disk offload store has no folder")
            offload_weight(value, key, dataset.save_folder, index=dataset.index)
            dataset.all_keys = list(dict.fromkeys([*dataset.all_keys, key]))
    elif isinstance(dataset, dict):
        dataset[key] = value
    else:
        raise RuntimeError(f"cannot write {key} back to an offload store of type {type(dataset).__name__}")


@contextmanager
def onloaded(module: nn.Module, hold: bool = False):
    """Inside: every offloaded tensor of ``module`` is real, on its execution device, and may be
    changed in place or replaced (new shapes, new biases, new submodules). On normal exit, every
    such tensor is written back to its offload store and dropped to meta again, so the next
    forward pass and ``save_pretrained`` see the change. On an exception nothing is written.
    ``hold``: the hooks stop loading and dropping the weights at every forward pass meanwhile
    (a layer visited by many calibration batches is read from the store once, not per batch)."""
    from accelerate.hooks import add_hook_to_module
    from accelerate.utils import set_module_tensor_to_device

    hooked = [(name, sub, hook) for name, sub in module.named_modules() if (hook := _offload_hook(sub)) is not None]
    for _, sub, hook in hooked:
        for name in _module_tensors(sub, hook):
            set_module_tensor_to_device(sub, name, hook.execution_device, value=hook.weights_map[name])
        if hold:
            hook.offload = False
    written = False
    try:
        yield module
        for name, old, hook in hooked:
            sub = module.get_submodule(name) if name else module
            for tensor_name, tensor in list(sub.named_parameters()) + list(sub.named_buffers()):
                if tensor_name in _module_tensors(sub, hook) or sub is not old:
                    _store(hook.weights_map, tensor_name, tensor)
            if sub is not old:  # replaced by surgery: the new module is offloaded like the old one
                add_hook_to_module(sub, hook)
        written = True
    finally:
        for name, old, hook in hooked:
            hook.offload = True
            sub = module.get_submodule(name) if name else module
            if sub is old or written:
                for tensor_name in _module_tensors(sub, hook):
                    set_module_tensor_to_device(sub, tensor_name, "meta")


def parse_max_memory(text: str | None) -> dict | None:
    """'0=20GiB,cpu=60GiB' -> {0: '20GiB', 'cpu': '60GiB'} (accelerate's max_memory)."""
    if text is None:
        return None
    result = {}
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+|cpu|disk|cuda:\d+)\s*=\s*(\d+(?:\.\d+)?\s*(?:[KMGT]i?B|B)?)\s*", part,
                             flags=re.IGNORECASE)
        if not match:
            raise UsageError(f"--max-memory must look like 0=20GiB,cpu=60GiB (device=size, ...), got {text!r}")
        device, size = match.group(1).lower(), match.group(2).replace(" ", "")
        key = int(device.split(":")[-1]) if device[0].isdigit() or device.startswith("cuda:") else device
        result[key] = int(size) if size.isdigit() else size.upper().replace("IB", "iB")
    return result


def parse_device_map(value: str | None):
    """auto | balanced | balanced_low_0 | sequential | FILE.json ({module name: device}) -> what
    from_pretrained takes."""
    if value is None:
        return None
    if value in DEVICE_MAPS:
        return value
    path = Path(value).expanduser()
    if path.suffix != ".json" or not path.is_file():
        raise UsageError(f"--device-map must be one of {', '.join(DEVICE_MAPS)} or an existing .json file, "
                         f"got {value!r}")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"--device-map {value!r}: not readable JSON ({error})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise UsageError(f"--device-map {value!r}: must be a JSON object {{module name: device}}")
    for name, device in mapping.items():
        if not (device in ("cpu", "disk") or isinstance(device, int) and not isinstance(device, bool)
                or isinstance(device, str) and re.fullmatch(r"cuda:\d+", device)):
            raise UsageError(f"--device-map {value!r}: {name!r} -> {device!r}; devices are GPU numbers, cpu or disk")
    return mapping


def size_in_bytes(size) -> int:
    """'20GiB', '500MB', 123 -> bytes."""
    from accelerate.utils import convert_file_size_to_int

    return convert_file_size_to_int(size)
